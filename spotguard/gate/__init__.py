"""The gate: an optional local reverse proxy that journals in-flight requests and refuses new ones once draining."""
