"""The declared library API: what `import sovpack` offers, and docs/library.md's script run for real."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import sovpack

ROOT = Path(__file__).resolve().parent.parent


def test_every_declared_name_is_importable_and_listed_once():
    exported = set(sovpack._EXPORTS)
    assert set(sovpack.__all__) == exported | {"__version__"} and len(sovpack.__all__) == len(exported) + 1
    for name in exported:
        assert getattr(sovpack, name) is not None
    assert (ROOT / "sovpack" / "py.typed").is_file()


def test_each_entry_point_says_what_it_raises():
    functions = [getattr(sovpack, n) for n in sovpack.__all__[1:] if callable(getattr(sovpack, n))]
    entry_points = [f for f in functions if not isinstance(f, type)]
    assert len(entry_points) >= 12
    for function in entry_points:
        assert "Raises" in (function.__doc__ or ""), function.__qualname__


def test_importing_sovpack_imports_nothing_heavy():
    heavy = ("cryptography", "rich", "typer", "huggingface_hub", "sovpack")
    code = f"import sys, sovpack; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['sovpack']"


def test_the_documented_script_runs(model_dir, tmp_path):
    doc = (ROOT / "docs" / "library.md").read_text()
    script = tmp_path / "trip.py"
    script.write_text(re.search(r"```python\n(.*?)```", doc, re.DOTALL).group(1))
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, str(script), str(model_dir), str(work)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"exported tiny-model v1 as \d+ volume\(s\)", lines[0])
    assert lines[1] == "installed: tiny-model v1, signed by ['officer-a']"
    assert lines[2].startswith("refused (exit code 1): ") and "config.json" in lines[2]
