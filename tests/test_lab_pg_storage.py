"""The lab's optional btrfs storage for PostgreSQL: real loop-mounted images, a real lab."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab import manager, pg_storage
from lab import postgres as pg
from tests.conftest import new_lab_dir

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(pg_storage.available() is not None,
                       reason=f"no btrfs here: {pg_storage.available()}"),
]


def _mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in
               Path("/proc/self/mounts").read_text().splitlines())


def test_btrfs_image_mounts_makes_subvolumes_and_unmounts(tmp_path: Path) -> None:
    mnt = tmp_path / "pg"
    pg_storage.mount_btrfs(mnt, size_gb=1)
    try:
        assert _mounted(mnt) and pg_storage.is_btrfs(mnt)
        assert pg_storage.image_path(mnt) == tmp_path / "pg.btrfs.img"
        assert os.stat(mnt).st_mode & 0o777 == 0o755
        data = mnt / "data"
        pg_storage.make_datadir(data)
        assert os.stat(data).st_ino == 256 and pg_storage.is_subvolume(data)
        assert os.stat(data).st_mode & 0o777 == 0o700
        plain = mnt / "plain"
        plain.mkdir()
        assert not pg_storage.is_subvolume(plain)
        # destroy() removes a subvolume data directory (no server running: nothing to stop).
        (data / "base").mkdir()
        (data / "base" / "1").write_text("x")
        pg.destroy(pg.Instance(name="t", datadir=data, port=1, log=mnt / "server.log"))
        assert not data.exists()
    finally:
        pg_storage.unmount(mnt)
    assert not _mounted(mnt)
    assert not pg_storage.image_path(mnt).exists()
    pg_storage.unmount(mnt)  # safe to repeat


def test_make_datadir_off_btrfs_is_a_plain_directory(tmp_path: Path) -> None:
    assert not pg_storage.is_btrfs(tmp_path)
    pg_storage.make_datadir(tmp_path / "data")
    assert (tmp_path / "data").is_dir()
    assert os.stat(tmp_path / "data").st_mode & 0o777 == 0o700


def test_up_refuses_an_unknown_storage() -> None:
    lab_dir = Path(tempfile.gettempdir()) / "drflow-lab-never-made"
    with pytest.raises(manager.LabError, match="plain or btrfs"):
        manager.up(lab_dir, pg_storage="zfs", progress=lambda _m: None)
    assert not lab_dir.exists()


def test_down_unmounts_the_btrfs_of_a_lab_whose_lab_json_is_corrupt() -> None:
    lab_dir = new_lab_dir()
    lab_dir.mkdir()
    pg_storage.mount_btrfs(lab_dir / "pg", size_gb=1)
    (lab_dir / "lab.json").write_text("{not json")
    manager.down(lab_dir, progress=lambda _m: None)
    assert not _mounted(lab_dir / "pg")
    assert not lab_dir.exists()


@pytest.fixture(scope="module")
def btrfs_lab() -> Iterator[dict[str, Any]]:
    lab_dir = new_lab_dir()
    state = manager.up(lab_dir, groups=1, replication="sync", pg_storage="btrfs",
                       progress=lambda _m: None, agents=False)
    try:
        yield state
    finally:
        manager.down(lab_dir, progress=lambda _m: None)


def test_btrfs_lab_keeps_each_data_directory_in_a_subvolume(btrfs_lab: dict[str, Any]) -> None:
    lab_dir = Path(btrfs_lab["dir"])
    pg_dir = (lab_dir / "pg").resolve()
    assert json.loads((lab_dir / "lab.json").read_text())["pg_storage"] == "btrfs"
    assert _mounted(pg_dir)
    group = btrfs_lab["groups"][0]
    for role in ("primary", "standby"):
        datadir = Path(group[role]["datadir"])
        assert datadir.is_relative_to(pg_dir)
        assert os.stat(datadir).st_ino == 256, f"{role} {datadir} is not a subvolume"
        assert os.stat(datadir).st_mode & 0o777 == 0o700
        inst = pg.Instance.from_dict(btrfs_lab["postgres"][group["name"]][role])
        assert pg.role(inst) == role

    cfg = yaml.safe_load((lab_dir / "drflow.yaml").read_text())
    g = cfg["groups"][0]
    assert g["primary"]["datadir"] == group["primary"]["datadir"]
    assert g["standby"]["datadir"] == group["standby"]["datadir"]
    assert cfg["drill"]["work_dir"] == str(lab_dir / "pg" / "drill")

    # What a drill does with it: a snapshot of the standby, in the drill's work_dir.
    snap = Path(cfg["drill"]["work_dir"]) / "snap"
    snap.parent.mkdir(exist_ok=True)
    subprocess.run(["btrfs", "subvolume", "snapshot", g["standby"]["datadir"], str(snap)],
                   check=True, capture_output=True)
    assert (snap / "PG_VERSION").exists() and pg_storage.is_subvolume(snap)


def test_btrfs_lab_down_leaves_no_mount_and_no_directory(btrfs_lab: dict[str, Any]) -> None:
    # Last in the module: takes the fixture's lab down itself (the fixture's down then no-ops).
    lab_dir = Path(btrfs_lab["dir"])
    pg_dir = (lab_dir / "pg").resolve()
    manager.down(lab_dir, progress=lambda _m: None)
    assert not _mounted(pg_dir)
    assert str(lab_dir) not in Path("/proc/self/mounts").read_text()
    assert not lab_dir.exists()
