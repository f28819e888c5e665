"""What a runbook needs from the configuration, resolved once per process and kept warm.

The config file is read again when it changes on disk (a group added, say): `runtime()` then
returns a new Runtime that keeps the old one's clients whose sections did not change, so the
warm path stays warm. A file that does not validate leaves the last good Runtime in use.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from drflow.audit import AuditStore, open_store
from drflow.config import ConfigError, DrflowConfig, GroupConfig, NodeConfig, load_config
from drflow.etcd import Client as EtcdClient
from drflow.secrets import aws_client_kwargs
from tasks.postgres import Db
from tasks.slack import SlackTarget
from tasks.vsphere import VCenter

if TYPE_CHECKING:
    from mypy_boto3_route53 import Route53Client

CONFIG_ENV = "DRFLOW_CONFIG"
log = logging.getLogger("drflow.runtime")

# What identifies one version of the file on disk: (st_mtime_ns, st_size, st_ino). An editor
# that replaces the file (a new inode) or rewrites it in place (mtime, size) both show.
FileKey = tuple[int, int, int]


@dataclass
class Runtime:
    cfg: DrflowConfig
    path: str
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # The previous Runtime's audit store, when its section is unchanged (see `audit`).
    _inherited_audit: AuditStore | None = field(default=None, repr=False)

    def secret(self, ref: Any) -> SecretStr:
        return self.cfg.secret(ref)

    def vcenter(self, site: str) -> VCenter:
        vc = self.cfg.sites[site].vcenter
        return VCenter(url=vc.url, user=vc.username, password=self.secret(vc.password),
                       datacenter=vc.datacenter, verify_tls=vc.verify_tls)

    def db(self, group: GroupConfig, node: NodeConfig, host: str | None = None,
           port: int | None = None) -> Db:
        return Db(host=host or node.host, port=port or node.port, dbname=group.database.name,
                  user=group.database.user, password=self.secret(group.database.password))

    @cached_property
    def route53(self) -> Route53Client:
        import boto3

        return boto3.client("route53", **aws_client_kwargs(self.cfg.aws))

    @cached_property
    def etcd(self) -> EtcdClient | None:
        """The etcd holding the leader and sync keys; None when the config has none (then a
        failover fences through vSphere only)."""
        e = self.cfg.etcd
        if e is None:
            return None
        return EtcdClient([str(u) for u in e.endpoints], timeout=e.timeout_s)

    @cached_property
    def slack(self) -> SlackTarget:
        s = self.cfg.slack
        return SlackTarget(api_url=s.api_url, channel=s.channel, token=self.secret(s.bot_token))

    @cached_property
    def audit(self) -> AuditStore:
        if self._inherited_audit is not None:
            # One store per process; it must also scrub the secrets the new config added.
            self._inherited_audit.add_secret_values(self.secret_values)
            return self._inherited_audit
        a = self.cfg.audit
        return open_store(a.url, password=self.secret(a.password) if a.password else None,
                          secret_values=self.secret_values)

    @cached_property
    def secret_values(self) -> list[SecretStr]:
        """Every secret of the config, to scrub from anything written or sent."""
        return [self.secret(ref) for _, ref in self.cfg.refs()]

    def scrub(self, text: str) -> str:
        for s in self.secret_values:
            v = s.get_secret_value()
            if v:
                text = text.replace(v, "***")
        return text


# Cached clients and the config sections they are made from: a reloaded Runtime keeps each
# one whose section is unchanged (a new Route 53 client or etcd connection costs an incident).
_KEPT: dict[str, str] = {"route53": "aws", "etcd": "etcd", "slack": "slack"}


def successor(old: Runtime, cfg: DrflowConfig) -> Runtime:
    """The Runtime of a changed config: the old one's clients where their section is the same."""
    new = Runtime(cfg=cfg, path=old.path)
    for attr, section in _KEPT.items():
        if attr in old.__dict__ and getattr(old.cfg, section) == getattr(cfg, section):
            new.__dict__[attr] = old.__dict__[attr]
    same_refs = old.cfg.refs() == cfg.refs() and old.cfg.aws == cfg.aws
    if same_refs and "secret_values" in old.__dict__:
        new.__dict__["secret_values"] = old.secret_values
    if old.cfg.audit == cfg.audit:
        if same_refs and "audit" in old.__dict__:
            new.__dict__["audit"] = old.audit
        else:
            new._inherited_audit = old.__dict__.get("audit") or old._inherited_audit
    return new


def file_key(path: str) -> FileKey | None:
    """The version of the file on disk; None when it cannot be read (removed, say)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


@dataclass
class _Loaded:
    rt: Runtime
    seen: FileKey | None  # the version last read, valid or not: each version is read once


_runtimes: dict[str, _Loaded] = {}
_runtimes_lock = threading.Lock()


def runtime(config_path: str | None = None) -> Runtime:
    """The Runtime for a config file (argument, else $DRFLOW_CONFIG), cached per process and
    reloaded when the file changed. An invalid first load raises ConfigError; an invalid change
    keeps the last good Runtime (logged once per version of the file)."""
    path = config_path or os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"no drflow config: pass config_path or set {CONFIG_ENV}")
    path = str(Path(path).resolve())
    # Stat before reading: a change made while reading shows as another version next time.
    key = file_key(path)
    with _runtimes_lock:
        loaded = _runtimes.get(path)
        if loaded is None:
            loaded = _runtimes[path] = _Loaded(Runtime(cfg=load_config(path), path=path), key)
        elif key != loaded.seen:
            loaded.seen = key
            _reload(loaded, path)
        return loaded.rt


def _reload(loaded: _Loaded, path: str) -> None:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        # A run must not fail because someone is editing the file: the last good config holds.
        log.warning("%s changed but is not valid; still using the version loaded before:\n%s",
                    path, exc)
        return
    if cfg != loaded.rt.cfg:
        loaded.rt = successor(loaded.rt, cfg)
        log.info("%s changed: configuration reloaded", path)
