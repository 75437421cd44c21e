"""The gate: an optional local reverse proxy that journals in-flight requests and refuses new ones
once draining (``proxy.py``); the journal the snapshot step reads (``journal.py``)."""
