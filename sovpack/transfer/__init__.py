"""Crossing the gap: a bundle exported as volumes (or one stream), and imported back (docs/transfer.md).

Export (`export`): check the signed bundle, write it as one tar stream (`archive`) cut into
numbered volumes (`media`), each hashed as written; the `index` describing them comes last.

Import (`import_`), every phase leaving the installed store untouched until the last:

1. read the `index` (a stream: its sovpack.json, read first); if this very bundle is installed,
   that is the result and nothing more is read; refuse an old version early
2. read the volumes once, in order, as one stream (`media`), checking each as it passes
   (`stream_check`; `volume_check` checks them on their own, for `check-volumes`)
3. unpack the tar stream safely (`archive`) into files hashed as written (`reassembly`), in a
   work directory that survives a kill (`import_workdir`)
4. verify the reassembled bundle fully, then install it into the store by one rename and write
   its record (store/record.py)
"""
