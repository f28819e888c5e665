"""The runbooks as Prefect flows, their pure decisions and what they need to run."""
