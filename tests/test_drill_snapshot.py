"""Drills that snapshot the standby: a lab whose data directories are btrfs subvolumes.

The copy is an atomic btrfs snapshot of the standby's data directory; these tests check that
it passes the same checks as a copied standby, that it is refused or fails (never copies the
database instead, never touches production) when it cannot be made or is not the standby's.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab import pg_storage
from tests.conftest import new_lab_dir
from tests.test_drill import Writer

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(pg_storage.available() is not None,
                       reason=f"no btrfs here: {pg_storage.available()}"),
]
GROUP = "orders"


@pytest.fixture(scope="module")
def snap_lab(prefect_api: str) -> Iterator[dict[str, Any]]:
    from lab import manager

    lab_dir = new_lab_dir("drflow-snap-")
    state = manager.up(lab_dir, groups=1, replication="sync", progress=lambda _m: None,
                       agents=False, pg_storage="btrfs")
    try:
        cfg = yaml.safe_load((lab_dir / "drflow.yaml").read_text())
        cfg["drill"]["port_range"] = [43000, 43999]
        yield {"lab": state, "dir": lab_dir, "cfg": cfg,
               "work_dir": Path(cfg["drill"]["work_dir"])}
    finally:
        manager.down(lab_dir, progress=lambda _m: None)


@pytest.fixture(autouse=True)
def _no_flow_heartbeats() -> Iterator[None]:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _config(env: dict[str, Any], name: str, **changes: Any) -> str:
    cfg = yaml.safe_load(yaml.safe_dump(env["cfg"]))
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if section == "drill":
            cfg["drill"][field] = value
        else:  # standby__datadir
            cfg["groups"][0][section][field] = value
    path = env["dir"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def _drill(config: str) -> dict[str, Any]:
    from flows.drill import drill

    result: dict[str, Any] = drill(GROUP, config_path=config, raise_on_failure=False)
    return result


def _production(env: dict[str, Any]) -> dict[str, Any]:
    from lab import postgres as lpg

    pair = env["lab"]["postgres"][GROUP]
    primary = lpg.Instance.from_dict(pair["primary"])
    standby = lpg.Instance.from_dict(pair["standby"])
    with lpg.admin_conn(primary) as c:
        repl = c.execute("select application_name, state, sync_state from pg_stat_replication "
                         "order by 1").fetchall()
    return {"roles": (lpg.role(primary), lpg.role(standby)), "replication": repl,
            # the same postmasters: neither was restarted nor signalled
            "pids": (primary.pidfile.read_text().split()[0],
                     standby.pidfile.read_text().split()[0])}


def _subvolumes(env: dict[str, Any]) -> list[str]:
    out = subprocess.run(["btrfs", "subvolume", "list", "-o", str(env["dir"] / "pg")],
                         capture_output=True, text=True, check=True).stdout
    return sorted(line.split(" path ")[-1] for line in out.splitlines())


def _nothing_left(env: dict[str, Any], subvolumes: list[str]) -> None:
    from tasks import pg_copy

    assert pg_copy.leftover_copies(env["work_dir"], GROUP) == []
    assert pg_copy.processes_under(env["work_dir"]) == []
    assert _subvolumes(env) == subvolumes


def test_snapshot_drill_passes_under_writes_and_leaves_production_as_it_was(
        snap_lab: dict[str, Any]) -> None:
    before, subvolumes = _production(snap_lab), _subvolumes(snap_lab)
    with Writer(snap_lab["lab"], GROUP) as writer:
        result = _drill(_config(snap_lab, "auto"))
        during = len(writer.acked)
    assert result["outcome"] == "passed", result["reason"]
    assert writer.errors == [] and writer.stored() == writer.acked and during > 50
    assert result["copy_method"] == "snapshot"
    steps = {s["name"]: s for s in result["steps"]}
    assert steps["check the copy method"]["reason"] == (
        "copy-on-write snapshot of the standby's data directory")
    assert "btrfs snapshot of" in steps["copy the standby"]["reason"]
    assert "nothing read through the standby" in steps["copy the standby"]["reason"]
    # The copy held the standby's newest completed transaction and every table (check_copy).
    assert "there and on the copy" in steps["check the copy"]["reason"]
    assert result["rpo_s"] is not None and result["rto_s"] is not None
    assert _production(snap_lab) == before
    _nothing_left(snap_lab, subvolumes)


def test_snapshot_of_a_directory_that_is_not_the_standby_fails_and_touches_nothing(
        snap_lab: dict[str, Any]) -> None:
    """groups[].standby.datadir naming the primary's data directory: a snapshot of a primary
    is refused after the fact (its control file is not in recovery), and removed."""
    before, subvolumes = _production(snap_lab), _subvolumes(snap_lab)
    primary_dir = snap_lab["lab"]["postgres"][GROUP]["primary"]["datadir"]
    result = _drill(_config(snap_lab, "wrong", standby__datadir=primary_dir))
    assert result["outcome"] == "failed"
    assert "step 'copy the standby' failed" in result["reason"]
    assert "is not a standby's data directory" in result["reason"]
    assert _production(snap_lab) == before
    _nothing_left(snap_lab, subvolumes)


def test_snapshot_required_but_impossible_refuses_without_copying(
        snap_lab: dict[str, Any]) -> None:
    elsewhere = Path(tempfile.mkdtemp(prefix="drflow-snap-work-", dir="/tmp"))
    try:
        elsewhere.chmod(0o755)
        result = _drill(_config(snap_lab, "required", drill__copy_method="snapshot",
                                drill__work_dir=str(elsewhere)))
        assert result["outcome"] == "refused"
        assert (f"copy method: drill.copy_method is snapshot, but drill.work_dir {elsewhere} "
                "is not on btrfs") in result["reason"]
        assert all(s["name"].startswith("check ") for s in result["steps"])
        assert not any(p.name != "locks" for p in elsewhere.iterdir())  # nothing built
    finally:
        subprocess.run(["rm", "-rf", str(elsewhere)], check=False)
