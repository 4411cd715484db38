"""The bundle: a directory whose every file is listed, with its size and SHA-256, in signed metadata.

Phases, in the order a bundle lives through them:

- make one: `pack` (a local model directory; fetch and quantize build theirs the same way)
- describe it: `metadata` (sovpack.json), `directory` (the files on disk), `gguf_parts` (the
  parts of a split GGUF model, which are only whole together)
- sign it: `keys` (ECDSA PEM files, key ids), `signature` (OpenSSF model-signing v1.0 files), `sign`
- check it: `trust` (trusted keys, threshold; store/target.py chooses which apply), `verify`
  (signatures, inventory, digests, formats, expiry, in that order), `describe` (what `inspect` shows, without keys or hashing)
"""
