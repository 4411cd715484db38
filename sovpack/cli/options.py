"""Help texts of the options several commands share: one wording everywhere."""

STORE_HELP = "Store directory (default $SOVPACK_HOME or the platform data directory)."
THRESHOLD_HELP = "How many distinct trusted keys must have signed (default 1 with --trust, else the store's threshold)."
TRUST_HELP = "Trusted public key (.pub) or a directory of them; repeat for several. Default: the store's trusted keys."
