"""What `drflow protect` reads before it plans: the database over SQL, both vCenters, the DNS
record. Reads only: a refused or dry-run protection changes nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from orchestrator.protect_build import Setting
from orchestrator.protect_plan import DrSite, Primary
from tasks.postgres import Db
from tasks.vsphere import VCenter, connect, vms_by_name


class ObserveError(RuntimeError):
    """Something protect must read could not be read; the message says what to check."""


@dataclass(frozen=True)
class Database:
    """The primary as PostgreSQL reports it."""

    role: str
    version: str
    datadir: str
    data_bytes: int
    wal_log_hints: bool
    data_checksums: bool
    synchronous_standby_names: str
    settings: list[Setting]


def database(db: Db) -> Database:
    try:
        with db.connect() as conn:
            def one(q: str) -> Any:
                row = conn.execute(q).fetchone()
                return row[0] if row else None

            recovery = bool(one("SELECT pg_is_in_recovery()"))
            rows = conn.execute("SELECT sourcefile, name, setting FROM pg_file_settings "
                                "WHERE error IS NULL AND sourcefile IS NOT NULL "
                                "ORDER BY sourcefile, seqno").fetchall()
            return Database(
                role="standby" if recovery else "primary",
                version=str(one("SHOW server_version")).split()[0],
                datadir=str(one("SHOW data_directory")),
                data_bytes=int(one("SELECT sum(pg_database_size(oid)) FROM pg_database") or 0),
                wal_log_hints=one("SHOW wal_log_hints") == "on",
                data_checksums=one("SHOW data_checksums") == "on",
                synchronous_standby_names=str(one("SHOW synchronous_standby_names") or ""),
                settings=[Setting(str(r[0]), str(r[1]), str(r[2])) for r in rows])
    except Exception as exc:
        if isinstance(exc, ObserveError):
            raise
        raise ObserveError(f"cannot read the database at {db}: {str(exc).strip().splitlines()[0]}"
                           " — check the address, port and the database login (`--db-user`, "
                           "`--db-password-ref`); reading pg_file_settings needs a superuser or "
                           "pg_read_all_settings") from None


@dataclass(frozen=True)
class PrimaryVm:
    vm: Any
    address: str | None
    cpus: int
    memory_mb: int


def primary_vm(vc: VCenter, name: str) -> PrimaryVm:
    found = vms_by_name(connect(vc), vc.datacenter)
    vm = found.get(name)
    if name in found and vm is None:
        raise ObserveError(f"several VMs are named {name!r} in {vc}: rename the others")
    if vm is None:
        raise ObserveError(f"no VM named {name!r} in {vc}: check the name (as vCenter shows it) "
                           "and `--site`")
    if vm.runtime.powerState != "poweredOn":
        raise ObserveError(f"VM {name} is {vm.runtime.powerState}: power it on first")
    hw = vm.config.hardware
    return PrimaryVm(vm, vm.guest.ipAddress, int(hw.numCPU), int(hw.memoryMB))


def dr_site(vc: VCenter, site: str, template: str, host: str, standby_vm: str,
            standby_address: str, made_before: bool) -> DrSite:
    """`made_before`: an earlier run of this protection created the standby VM (its record says
    so); only then is a VM of that name one to finish rather than a clash."""
    si = connect(vc)
    found = vms_by_name(si, vc.datacenter)
    tpl = found.get(template)
    hosts = _hosts(si)
    h = hosts.get(host)
    free = None
    if h is not None:
        spaces = [ds.summary.freeSpace for ds in h.datastore if ds.summary.accessible]
        free = max(spaces) if spaces else None
    vm = found.get(standby_vm)
    return DrSite(site=site, template_found=tpl is not None and bool(tpl.config.template),
                  host_found=h is not None, free_bytes=free,
                  vm_exists=standby_vm in found,
                  vm_is_ours=made_before and vm is not None and not vm.config.template and (
                      vm.guest.ipAddress in (None, standby_address)))


def _hosts(si: Any) -> dict[str, Any]:
    view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.HostSystem],
                                                      True)
    try:
        return {h.name: h for h in view.view}
    finally:
        view.DestroyView()


def primary(vm: str, site: str, pvm: PrimaryVm, address: str, port: int,
            d: Database) -> Primary:
    return Primary(vm=vm, site=site, role=d.role, address=address, port=port, datadir=d.datadir,
                   version=d.version, data_bytes=d.data_bytes, wal_log_hints=d.wal_log_hints,
                   data_checksums=d.data_checksums, cpus=pvm.cpus, memory_mb=pvm.memory_mb,
                   synchronous_standby_names=d.synchronous_standby_names)
