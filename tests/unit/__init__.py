"""Tests of single modules and the static checks: no router, no network."""
