"""Fetch: a pinned, checked download from the Hugging Face Hub into a bundle (docs/fetch.md).

Phases:

1. `spec`: what to fetch, from the command line (`REPO[@REV]`, `--include`, `--gguf`) or a TOML spec
2. `plan`: resolve each revision to its commit, list the files there, select, refuse early
3. `download`: download with proof into a resumable staging directory, publish by one rename
4. `hub`: the edge, huggingface_hub (the only module here that speaks to the network)
"""
