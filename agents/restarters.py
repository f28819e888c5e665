"""Stopping and starting a resource in place: a process by its commands, PostgreSQL by its driver."""

from __future__ import annotations

import subprocess
from typing import Any, Protocol

from agents.config import PostgresResource, ProcessResource, Resource


class Restarter(Protocol):
    """How to stop and start one resource in place (fixed by config, never from the network)."""

    def stop(self) -> None: ...

    def start(self) -> None: ...

    def hold(self) -> str | None:
        """Why the resource must be left alone right now (None: recovery may act)."""
        ...


class ProcessRestarter:
    """Runs the configured `start` argv; stops the process found by name or pid file."""

    def __init__(self, r: ProcessResource) -> None:
        assert r.start is not None
        self.r = r
        self.argv = list(r.start)
        self._child: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._reap()
        self._child = subprocess.Popen(
            self.argv, cwd=self.r.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )
        # A start command may daemonize (exits 0) or run in the foreground: only an early
        # non-zero exit is a failed start; the next check decides the rest.
        try:
            code = self._child.wait(timeout=min(self.r.timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            return
        if code != 0:
            raise RuntimeError(f"start command {self.argv[0]} exited with code {code}")

    def stop(self) -> None:
        import psutil

        from agents.monitors.process import ProcessMonitor

        result = ProcessMonitor(self.r.process_name, self.r.pidfile).check()
        pid = result.facts.get("pid")
        if result.ok and isinstance(pid, int):
            try:
                proc = psutil.Process(pid)
                proc.terminate()
                proc.wait(timeout=max(1.0, self.r.timeout_s))
            except psutil.TimeoutExpired:
                proc.kill()
            except psutil.Error:
                pass
        self._reap()

    def hold(self) -> str | None:
        return None

    def _reap(self) -> None:
        if self._child is not None and self._child.poll() is not None:
            self._child = None


def postgres_driver(r: PostgresResource) -> Any:
    """The PostgreSQL driver for a resource; the control API shares it (and its lock)."""
    from agents.drivers.postgres import PostgresDriver

    password = None
    if r.password is not None:
        from drflow.secret_refs import resolve

        password = resolve(r.password)
    return PostgresDriver(datadir=r.datadir, port=r.port, host=r.host, bin_dir=r.bin_dir,
                          run_as=r.run_as, dbname=r.dbname, user=r.user, password=password)


class PostgresRestarter:
    """Restarts PostgreSQL through the driver, unless the orchestrator is working on it."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def stop(self) -> None:
        # Only a server that still runs (hung) needs stopping; after a crash this is a no-op.
        if self.driver.status().get("running"):
            self.driver.stop(mode="fast")

    def start(self) -> None:
        self.driver.start()

    def hold(self) -> str | None:
        if self.driver.busy():
            return "a control API verb is changing the instance"
        if self.driver.held_down:
            return "stopped on purpose through the control API (stays down until start)"
        return None


def build_restarter(r: Resource, drivers: dict[str, Any]) -> Restarter | None:
    if isinstance(r, ProcessResource) and r.start is not None:
        return ProcessRestarter(r)
    if isinstance(r, PostgresResource):
        drivers[r.name] = postgres_driver(r)
        return PostgresRestarter(drivers[r.name])
    return None
