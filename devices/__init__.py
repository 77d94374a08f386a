"""Device side: the simulator of the classic data model, the flow-controlled publisher and its CLI."""
