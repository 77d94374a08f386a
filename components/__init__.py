"""Sensor hub services: plain-Python core and thin WAMP adapters."""
