"""A single etcd member for `drflow up` on one machine, started and stopped with it as its local
Prefect is: only when drflow.yaml's `etcd.endpoints` is one loopback URL that nobody answers.

Anything else (three members elsewhere, or an etcd already answering there, such as the one
Debian's etcd-server package runs under systemd on 127.0.0.1:2379) is used as configured."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from drflow.etcd import Client, EtcdError
from orchestrator.child_process import stop_child


@dataclass
class LocalEtcd:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 10.0) -> None:
        stop_child(self.proc, timeout)


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def answers(url: str, timeout: float = 0.5) -> bool:
    """Does an etcd serve at url?"""
    try:
        Client(url, timeout).status()
        return True
    except EtcdError:
        return False


def to_start(endpoints: list[str]) -> str | None:
    """The URL `drflow up` should start a member on, or None: one loopback endpoint, silent."""
    if len(endpoints) != 1 or not is_loopback(endpoints[0]) or answers(endpoints[0]):
        return None
    return endpoints[0].rstrip("/")


def start_local_etcd(data_dir: Path, url: str, timeout: float = 30.0) -> LocalEtcd:
    """Start one etcd member serving clients at url (peers on the next port), its data in data_dir;
    return once it answers. An existing data dir is reused: the keys outlive a restart."""
    binary = shutil.which("etcd", path=f"{os.environ.get('PATH', '')}:/usr/bin:/usr/local/bin")
    if binary is None:
        raise RuntimeError("`etcd` is not installed: apt-get install etcd-server (then "
                           "`systemctl disable --now etcd` if you want drflow to run its own)")
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 2379
    peer = f"http://{host}:{port + 1}"
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)  # etcd warns (3.4) or refuses (3.5) otherwise
    log = data_dir.parent / "etcd.log"
    argv = [binary, "--name", "drflow", "--data-dir", str(data_dir),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"drflow={peer}", "--initial-cluster-state", "new",
            # 3.4's defaults, written out: the lease timing of docs/fencing.md is argued from them.
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--logger", "zap", "--log-outputs", "stderr"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"etcd exited with {proc.returncode} (is {host}:{port} or "
                               f"{port + 1} taken?); see {log}:\n{tail}")
        if answers(url):
            return LocalEtcd(url, proc, log)
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"etcd did not answer on {url} within {timeout:.0f} s; see {log}")


def maybe_start(config: Path, state_dir: Path, say: Callable[[str], object]) -> LocalEtcd | None:
    """What `drflow up` does: start the member when drflow.yaml asks for one (see to_start); data
    in <state dir>/etcd/data, log in <state dir>/etcd/etcd.log."""
    from drflow.config.loader import load_config

    cfg = load_config(config)
    if cfg.etcd is None:
        return None
    endpoints = [str(u).rstrip("/") for u in cfg.etcd.endpoints]
    url = to_start(endpoints)
    if url is None:
        say(f"etcd: {', '.join(endpoints)}")
        return None
    data = (state_dir / "etcd" / "data").resolve()
    say(f"starting a local etcd member on {url} (data in {data}) …")
    return start_local_etcd(data, url)
