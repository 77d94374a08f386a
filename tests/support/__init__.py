"""What tests share: the harness (routers, processes, sessions), store fixtures, core fills."""
