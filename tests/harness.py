"""The end-to-end harness lives with the lab (the demo and the benchmarks use it too)."""

from lab.harness import (
    DRFLOW,
    Env,
    Writer,
    dump,
    lab_secret_values,
    start_env,
    stop_env,
    wait_for,
)

__all__ = ["DRFLOW", "Env", "Writer", "dump", "lab_secret_values", "start_env", "stop_env", "wait_for"]
