"""The orchestrator: the gateway, the runners of the flows and the `drflow` command line."""
