"""Prefect tasks, one module per system touched: vSphere, PostgreSQL, DNS, Slack, agents, gateway."""
