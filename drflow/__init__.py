"""The core without Prefect: models, config, secrets, signing, audit, shared vSphere/PostgreSQL helpers."""
