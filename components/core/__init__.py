"""The core: readings, settings, sealing, ingest and query. It imports no WAMP code."""
