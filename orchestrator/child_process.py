"""Stopping a server `drflow up` started (Prefect, etcd): politely, then for sure."""

from __future__ import annotations

import subprocess


def stop_child(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, up to `timeout` seconds to exit, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
