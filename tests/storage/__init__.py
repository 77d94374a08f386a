"""The storage contract, run against every backend, and each backend's own tests."""
