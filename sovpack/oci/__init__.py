"""One network, many hosts: bundles pushed to and pulled from an OCI registry (docs/oci.md).

Push (`push`): check the bundle as export does, lay it out as a CNCF ModelPack artifact
(`layout`: one raw layer per file, digest = signed SHA-256, plus sovpack.json and the
signatures), send only the blobs the registry lacks by chunked, resumable uploads (`upload`:
continued from the byte the registry confirms, or afresh when it cancelled the upload), then the
manifest.

Pull (`pull`), leaving the installed store untouched until the last phase:

1. read and check the manifest (`layout`); fetch sovpack.json; refuse a rollback, or stop if
   this very bundle is installed, before any file moves
2. fetch the signatures and the files the store lacks, each blob hashed as it streams and
   resumed where it stopped (`download`)
3. verify and install exactly as import does (transfer.import_.StagedImport)

The edges: `client` speaks the OCI distribution API over httpx2 (auth challenges, TLS),
`credentials` finds the user's registry credentials, `reference` parses REGISTRY/REPO:TAG.
This package talks to the network: the core never imports it.
"""
