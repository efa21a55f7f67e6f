"""A run on disk: its folder and numbering, the lock of its one writer, the transaction that
replaces an epoch's files together, the checkpoint file format, and the listing of runs."""
