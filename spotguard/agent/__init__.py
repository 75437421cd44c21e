"""The runner: polls sources, de-duplicates notices, persists state and starts drains."""
