"""A vCenter that accepts connections and never answers (hung vpxd, a frozen VM) bounds the
login, and a read stuck on it does not hold the process's exit."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from drflow.vsphere import login


@pytest.fixture()
def silent_server() -> Iterator[int]:
    """Accepts TCP connections (the kernel's backlog) and never reads or answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_login_to_a_vcenter_that_never_answers_fails_within_its_timeout(
        silent_server: int, scheme: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as err:
        login(f"{scheme}://127.0.0.1:{silent_server}/sdk", "admin",
              SecretStr("s3cret-login-pw"), verify_tls=False, timeout_s=0.5)
    took = time.monotonic() - t0
    assert took < 5.0, took
    assert "s3cret-login-pw" not in str(err.value)
    assert "127.0.0.1" in str(err.value)


def test_a_read_stuck_in_a_daemon_worker_does_not_hold_the_exit(silent_server: int) -> None:
    code = textwrap.dedent(f"""
        import socket
        from drflow.daemon_worker import DaemonWorker
        def stuck():
            s = socket.create_connection(("127.0.0.1", {silent_server}))
            s.recv(1)  # never answered
        DaemonWorker("reader").submit(stuck)
        import time; time.sleep(0.3)
    """)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert time.monotonic() - t0 < 10
