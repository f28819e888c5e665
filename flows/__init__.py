"""The runbooks as Prefect flows, their pure decisions and what they need to run."""

from flows import prefect_tls

# Every process that runs a runbook imports this package first: its Prefect clients share one
# TLS context from the start (flows/prefect_tls.py says why).
prefect_tls.install()
