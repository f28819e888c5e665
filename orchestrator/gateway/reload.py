"""Groups added to or removed from drflow.yaml, applied to a running gateway.

About once a second the file's version on disk (mtime, size, inode) is compared with the last
one read. A new version is validated and compared with the configuration the gateway runs
(`plan_reload`, pure); its groups — added, removed, or with changed nodes or policy — are
applied on the state thread (`GatewayService.apply_groups`), logged and audited
(`config.reload`). The other sections are read at start only: a change there is logged as
waiting for a restart. A version that does not validate is logged once, and the gateway keeps
the configuration it runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from drflow.config import ConfigError, DrflowConfig, load_config
from flows.runtime import FileKey, file_key
from orchestrator.gateway.from_config import group_settings
from orchestrator.gateway.settings import GatewaySettings, GroupPolicy, GroupRoster

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger("drflow.gateway.reload")

# What the gateway takes from these at start stays until it restarts: its listen address and
# secrets, heartbeat timeout and state store (gateway), the leader-key watch (etcd), the host
# watch's vCenters (sites), the alerter and Slack's signing secret (slack), its audit store.
# Not `aws` nor `drill`: the runbooks read those afresh at each run (flows.runtime).
RESTART_SECTIONS = ("sites", "slack", "audit", "gateway", "etcd")

# A version of the file: (st_mtime_ns, st_size, st_ino).
_UNREAD: FileKey = (-1, -1, -1)  # no file has it: the first poll always reads


@dataclass(frozen=True)
class ReloadPlan:
    """What a new version of the configuration changes for a running gateway."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()  # groups in both versions whose settings differ
    restart: tuple[str, ...] = ()  # sections whose change waits for a restart

    @property
    def groups_changed(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def summary(self) -> str:
        """`added groups crm, removed groups payments`."""
        parts = [f"{what} groups {', '.join(names)}" for what, names in (
            ("added", self.added), ("removed", self.removed), ("changed", self.changed)) if names]
        return ", ".join(parts) or "no group changed"


def plan_reload(old: DrflowConfig, new: DrflowConfig) -> ReloadPlan:
    """Compare the configuration a gateway runs with a new version of it."""
    before = {g.name: g for g in old.groups}
    after = {g.name: g for g in new.groups}
    return ReloadPlan(
        added=tuple(n for n in after if n not in before),
        removed=tuple(n for n in before if n not in after),
        changed=tuple(n for n in after if n in before and after[n] != before[n]),
        restart=tuple(s for s in RESTART_SECTIONS if getattr(old, s) != getattr(new, s)),
    )


class ConfigFile:
    """A config file read again whenever its version on disk changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._seen: FileKey | None = _UNREAD

    def poll(self) -> DrflowConfig | None:
        """The file's configuration when a version not read before validates; None when the
        file is unchanged, or invalid (logged once per version). Blocking."""
        # Stat before reading: a change made while reading shows as another version next time.
        key = file_key(self.path)
        if key == self._seen:
            return None
        self._seen = key
        try:
            return load_config(self.path)
        except ConfigError as exc:
            log.warning("%s changed but is not valid; the gateway keeps the configuration it "
                        "runs:\n%s", self.path, exc)
            return None


class ReloadableGateway(Protocol):
    """What the reloader uses of GatewayService."""

    settings: GatewaySettings

    async def in_state(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T: ...

    def apply_groups(self, groups: dict[str, GroupPolicy],
                     rosters: dict[str, GroupRoster]) -> None: ...

    def _record(self, action: str, target: str, parameters: dict[str, Any], outcome: str,
                reason: str) -> None: ...


class ConfigReloader:
    """Watches the file the gateway was started from and applies its groups' changes.

    `hooks` are called (in a worker thread, failures logged) with the configuration the gateway
    runs after each applied change: its groups as reloaded, its other sections as started."""

    def __init__(self, path: str | Path, started: DrflowConfig, interval_s: float = 1.0) -> None:
        self.file = ConfigFile(path)
        self.current = started
        self.interval_s = interval_s
        self.hooks: list[Callable[[DrflowConfig], None]] = []

    async def run(self, gw: ReloadableGateway) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check(gw)
            except Exception:  # a bug must not end the watch
                log.exception("reloading %s failed; still watching it", self.file.path)

    async def check(self, gw: ReloadableGateway) -> ReloadPlan | None:
        """Apply the file's groups if it changed and validates; the plan applied, if any."""
        new = await asyncio.to_thread(self.file.poll)
        if new is None:
            return None
        plan = plan_reload(self.current, new)
        if plan.restart:
            log.warning("%s changed in %s: the gateway applies that at its next restart (it "
                        "applies only groups while it runs)", self.file.path,
                        ", ".join(plan.restart))
        if not plan.groups_changed:
            return plan
        groups, rosters = group_settings(new)
        await gw.in_state(gw.apply_groups, groups, rosters)
        self.current = self.current.model_copy(update={"groups": new.groups})
        summary = f"config reloaded: {plan.summary()}"
        log.warning("%s (%s)", summary, self.file.path)
        gw._record("config.reload", self.file.path,
                   {"added": list(plan.added), "removed": list(plan.removed),
                    "changed": list(plan.changed), "restart_needed": list(plan.restart)},
                   "applied", summary)
        await asyncio.to_thread(self._run_hooks)
        return plan

    def _run_hooks(self) -> None:
        for hook in self.hooks:
            try:
                hook(self.current)
            except Exception:
                log.exception("a hook of the configuration reload failed")
