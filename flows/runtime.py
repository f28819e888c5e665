"""What a runbook needs from the configuration, resolved once per process and kept warm."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from drflow.audit import AuditStore, open_store
from drflow.config import DrflowConfig, GroupConfig, NodeConfig, load_config
from drflow.etcd import Client as EtcdClient
from drflow.secrets import aws_client_kwargs
from tasks.postgres import Db
from tasks.slack import SlackTarget
from tasks.vsphere import VCenter

if TYPE_CHECKING:
    from mypy_boto3_route53 import Route53Client

CONFIG_ENV = "DRFLOW_CONFIG"


@dataclass
class Runtime:
    cfg: DrflowConfig
    path: str
    _lock: threading.Lock = field(default_factory=threading.Lock)

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


_runtimes: dict[str, Runtime] = {}
_runtimes_lock = threading.Lock()


def runtime(config_path: str | None = None) -> Runtime:
    """The Runtime for a config file (argument, else $DRFLOW_CONFIG), cached per process."""
    path = config_path or os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"no drflow config: pass config_path or set {CONFIG_ENV}")
    path = str(Path(path).resolve())
    with _runtimes_lock:
        rt = _runtimes.get(path)
        if rt is None:
            rt = _runtimes[path] = Runtime(cfg=load_config(path), path=path)
        return rt
