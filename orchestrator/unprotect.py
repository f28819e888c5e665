"""`drflow unprotect GROUP`: the group no longer protected, its database still serving.

The order matters: the group leaves the config first (the gateway stops watching it, so the
agents going quiet starts no failover), then the serving side stops waiting for a synchronous
standby (its writes must not hang once the standby is gone), then the agents go.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from drflow.config import DrflowConfig, GroupConfig, NodeConfig
from drflow.config.edit import remove_group
from drflow.etcd import EtcdError
from drflow.leader_keys import sync_key
from drflow.secrets import SecretRef
from flows.runtime import Runtime
from orchestrator import agent_push
from tasks.replication import set_sync_names
from tasks.vsphere import connect, find_vm
from tasks.vsphere_guest import GuestLogin
from tasks.vsphere_provision import destroy

Progress = Callable[[str], None]


class UnprotectError(RuntimeError):
    pass


def _serving(rt: Runtime, g: GroupConfig) -> NodeConfig | None:
    for node in (g.primary, g.standby):
        try:
            with rt.db(g, node).connect(timeout=3) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if row is not None and not row[0]:
                return node
        except Exception:
            continue
    return None


def _wait_dropped(cfg: DrflowConfig, group: str, progress: Progress) -> None:
    url = f"{cfg.gateway.client_url}/v1/groups"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if group not in httpx.get(url, timeout=3).json():
                return
        except (httpx.HTTPError, ValueError):
            progress(f"  the gateway at {url} does not answer: it takes the change when it "
                     "starts")
            return
        time.sleep(0.3)
    raise UnprotectError(f"the gateway at {url} still watches {group} after 15 s; the agents "
                         "were left running (stopping them would look like a failure). Is the "
                         "running orchestrator using this config file?")


def _forget_sync_key(rt: Runtime, group: str, done: list[str], progress: Progress) -> None:
    """The sync key has no lease: left behind, it would name this group's old standby to a
    group protected again under the same name, whose failover would refuse to promote another
    standby until its primary's agent rewrote the key. Removed once the agents are gone (the
    primary's would write it again); the leader key goes with the agent's lease."""
    if rt.etcd is None:
        return
    key = sync_key(group)
    try:
        if rt.etcd.delete(key):
            done.append(f"the sync key {key} removed from etcd")
    except EtcdError as exc:
        progress(f"  could not remove {key} from etcd ({exc}): remove it by hand "
                 f"(etcdctl del {key})")


def unprotect_group(config: Path, group: str, *, remove_standby: bool = False,
                    guest_user: str = "root",
                    guest_password_ref: str = "env:DRFLOW_GUEST_PASSWORD",
                    progress: Progress = print) -> list[str]:
    from drflow.config import load_config

    rt = Runtime(cfg=load_config(config), path=str(config))
    g = rt.cfg.group(group)
    done: list[str] = []
    serving = _serving(rt, g)
    remove_group(config, group)
    done.append(f"group {group} removed from {config}")
    progress(f"group {group} removed from the config; waiting for the gateway to let it go")
    _wait_dropped(rt.cfg, group, progress)
    if serving is not None:
        set_sync_names.fn(rt.db(g, serving), "")
        done.append(f"{serving.vm} no longer waits for a synchronous standby")
    else:
        progress("  neither side answers as a primary: synchronous_standby_names left as is")
    login = GuestLogin(guest_user, rt.secret(SecretRef(ref=guest_password_ref)))
    other = g.standby if serving is g.primary else g.primary
    for node in (g.primary, g.standby):
        if remove_standby and node is other:
            continue
        vc = rt.vcenter(node.site)
        try:
            si = connect(vc)
            guest = agent_push.Guest(si, vc.url, find_vm(si, node.vm, vc.datacenter), login,
                                     vc.verify_tls)
            agent_push.check(guest, agent_push.REMOVE, f"removing the agent from {node.vm}")
            done.append(f"the agent removed from {node.vm}")
        except Exception as exc:
            progress(f"  could not remove the agent from {node.vm}: {rt.scrub(str(exc))}; "
                     "remove /opt/drflow and the drflow-agent service there by hand")
    _forget_sync_key(rt, group, done, progress)
    if remove_standby and destroy(rt.vcenter(other.site), other.vm):
        done.append(f"VM {other.vm} and its data removed at {other.site}")
    from orchestrator.protect import record_path

    record_path(config, group).unlink(missing_ok=True)
    return done

