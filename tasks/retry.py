"""Which failures are worth retrying: the transient ones, never a refusal or a bug."""

from __future__ import annotations

from typing import Any

import psycopg

TRANSIENT_AWS_CODES = {"Throttling", "ThrottlingException", "PriorRequestNotComplete",
                       "RequestLimitExceeded", "ServiceUnavailable", "InternalFailure"}


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError | psycopg.OperationalError):
        return True
    try:
        from botocore.exceptions import ClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    if isinstance(exc, BotoConnectionError):
        return True
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code") in TRANSIENT_AWS_CODES
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only when the task failed on a transient error."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the state could not give its exception back: be conservative
        exc = e
    return isinstance(exc, BaseException) and is_transient(exc)
