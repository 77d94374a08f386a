"""Real routers, real component processes, real stores, from the outside."""
