"""What `drflow protect` will do for one database VM, or why it will not (pure: no I/O).

Given what was observed of the primary (through its agent and over SQL), of the DR site and of
the existing configuration, and what the operator asked, it returns the steps in order, each
with what it changes, or the refusals, each naming what to change first. Nothing is created
when there is a refusal: a refused protection leaves everything as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A standby's data directory is a copy of the primary's; the copy needs headroom to catch up
# with what is written during it (WAL kept meanwhile), and the filesystem must not fill.
ROOM_FACTOR = 1.3
STEPS = ("push the agent", "discover", "create the standby VM", "seed and cluster", "DNS",
         "config", "prove it")


@dataclass(frozen=True)
class Primary:
    """The database as its agent and PostgreSQL report it."""

    vm: str
    site: str
    role: str  # primary | standby
    address: str | None
    port: int
    datadir: str
    version: str | None  # server_version, e.g. "15.8"
    data_bytes: int
    wal_log_hints: bool
    data_checksums: bool
    cpus: int
    memory_mb: int
    synchronous_standby_names: str = ""


@dataclass(frozen=True)
class DrSite:
    """What the DR site offers the standby."""

    site: str
    template_found: bool
    host_found: bool
    free_bytes: int | None  # room on the standby's datastore, if known
    vm_exists: bool  # a VM by the standby's name exists already (a re-run, or a clash)
    vm_is_ours: bool  # …and it is the one an earlier run of this protection made


@dataclass(frozen=True)
class Ask:
    group: str
    standby_vm: str
    standby_address: str
    replication: str  # sync | async
    dns_record: str


@dataclass(frozen=True)
class Known:
    """What drflow's configuration already holds."""

    groups: frozenset[str] = frozenset()
    vms: frozenset[str] = frozenset()  # VMs of configured groups, either side
    records: frozenset[str] = frozenset()  # DNS records of configured groups


@dataclass(frozen=True)
class Step:
    name: str
    does: str


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refusals


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def plan(p: Primary, dr: DrSite, ask: Ask, known: Known) -> Plan:
    out = Plan()
    no = out.refusals.append
    if p.role != "primary":
        no(f"{p.vm}'s PostgreSQL on port {p.port} is a {p.role}, not a primary: protect the "
           "primary it follows")
    if not (p.wal_log_hints or p.data_checksums):
        no(f"{p.vm}'s PostgreSQL has neither wal_log_hints nor data checksums: a failed-over "
           "old primary could not be rewound (pg_rewind needs one), only copied again; set "
           "`wal_log_hints = on` and restart it, then run protect again")
    if p.site == dr.site:
        no(f"{p.vm} is at {p.site}, the site asked for the standby: protect to another site")
    if ask.group in known.groups:
        no(f"a protection group named {ask.group!r} exists already: choose another name "
           f"(`--group`), or `drflow unprotect {ask.group}` first")
    if p.vm in known.vms:
        no(f"{p.vm} is already in a protection group")
    if ask.dns_record in known.records:
        no(f"DNS record {ask.dns_record} already belongs to a protection group")
    if not dr.template_found:
        no(f"no VM template to create {ask.standby_vm} from at {dr.site}: name one "
           "(`--template`)")
    if not dr.host_found:
        no(f"no such ESXi host at {dr.site} for {ask.standby_vm}: name one (`--standby-host`)")
    if dr.vm_exists and not dr.vm_is_ours:
        no(f"a VM named {ask.standby_vm} exists at {dr.site} and was not made by this "
           "protection: choose another name (`--standby-vm`), or remove it")
    need = int(p.data_bytes * ROOM_FACTOR)
    if dr.free_bytes is not None and dr.free_bytes < need:
        no(f"too little room at {dr.site} for the standby: {_gb(dr.free_bytes)} free, "
           f"{_gb(need)} needed ({_gb(p.data_bytes)} of data and headroom); free some, or "
           "choose another datastore")
    if ask.replication not in ("sync", "async"):
        no(f"replication must be sync or async, not {ask.replication!r}")
    if out.refusals:
        return out
    made = "finish" if dr.vm_exists else "clone"
    out.steps = [
        Step("push the agent", f"copy drflow's agent into {p.vm} through VMware Tools (it "
             "starts as a service once the standby streams)"),
        Step("discover", f"read PostgreSQL {p.version or '?'} on {p.vm}:{p.port} (data "
             f"{p.datadir}, {_gb(p.data_bytes)}) and its resources through the agent"),
        Step("create the standby VM", f"{made} {ask.standby_vm} at {dr.site} from the template, "
             f"{p.cpus} vCPU and {p.memory_mb} MB like {p.vm}, address "
             f"{ask.standby_address}, powered on; push its agent"),
        Step("seed and cluster", f"copy {_gb(p.data_bytes)} from {p.vm} into {ask.standby_vm} "
             f"(base backup through the agents), stream {ask.replication}"
             + (f", name it in {p.vm}'s synchronous_standby_names" if ask.replication == "sync"
                else "") + f", wait until it caught up; start {p.vm}'s agent"),
        Step("DNS", f"create (or check) {ask.dns_record} → {p.address or p.vm}"),
        Step("config", f"add group {ask.group} to drflow.yaml (its comments kept), check it, "
             "and have the running orchestrator take it"),
        Step("prove it", f"run one DR drill of {ask.group} and print its report"),
    ]
    return out
