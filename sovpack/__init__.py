"""sovpack: carry open-weight language models across an air gap, with proof."""

__version__ = "0.1.0"
