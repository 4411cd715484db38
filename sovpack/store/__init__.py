"""The store on the secure side (docs/store.md).

- `store`: installed bundles (read-only, identical files stored once), trusted keys and policy,
  the rollback high-water mark
- `record`: how each installed bundle was accepted (records/NAME/VERSION.json), as a typed record
- `target`: what a NAME_OR_BUNDLE argument names, and the one rule choosing the trust policy
  (verify, check-volumes, import, serve); `verify_target` audits the check of an installed bundle
- `listing`: what `sovpack list` says of an installed bundle
- `audit`: the hash-chained audit log every change to the store is written to
"""
