"""The WAMP adapters: storage subscriber, query callee, the router's authenticator, shared connection code."""
