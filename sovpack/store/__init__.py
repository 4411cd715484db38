"""The store on the secure side (docs/store.md).

- `store`: installed bundles (read-only, identical files stored once), trusted keys and policy,
  the rollback high-water mark
- `record`: how each installed bundle was accepted, as a typed record
- `audit`: the hash-chained audit log every change to the store is written to
"""
