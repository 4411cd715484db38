"""sovpack itself across the gap: an offline, verified runtime (docs/runtime.md).

- `build`: on the connected side, sovpack and every dependency as wheels, the lock of their
  SHA-256 (runtime-lock.json) and the installer, packed as the bundle `sovpack-runtime` with the
  wheels under the signed allowance `wheels/*.whl` (formats/wheel.py), then signed, exported
  and imported like any bundle
- `installer`: standard library only, the one file that also travels on the media as
  install-runtime.py: unpack the volumes, anchor the lock (the officer's signature through
  openssl, or its SHA-256 carried on paper), check every wheel, install into a fresh virtual
  environment with `pip --no-index`, switch PREFIX/current atomically
- `upgrade`: `sovpack runtime install NAME@V` from the store, under its trust, threshold and
  rollback rules (store/target.py), and `sovpack runtime rollback`; each recorded in the audit
  log before it happens
"""
