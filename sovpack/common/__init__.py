"""Building blocks every stage shares, knowing nothing of bundles, the network or the terminal.

- `files`: atomic writes, fsync, locks, free space, the errnos that mean "disk full"
- `pipeline`: threads (lanes), buffer rings and O_DIRECT files for reading once and writing once
- `hashing`: whole-file SHA-256 and shard digests checked on all cores
- `jsonfields`: typed access to untrusted JSON objects; `safepath`: untrusted relative paths
- `sizes`: byte sizes as people write them; `progress`: the progress protocol the CLI renders
"""
