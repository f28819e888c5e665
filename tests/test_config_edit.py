"""drflow.yaml changed in place: a group added or removed, comments and layout kept, never a
half-written or invalid file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from drflow.config import load_config
from drflow.config.edit import EditError, add_group, remove_group
from tests.test_config import GOOD

COMMENTED = "# drflow for the bank's order databases: ask #dba-oncall before editing\n" + \
    GOOD.replace("groups:\n", "groups:\n  # orders: the main book, sync, RPO 5 s\n", 1)

CRM: dict[str, Any] = {
    "name": "crm", "application": "postgres", "replication": "sync", "rpo_budget_s": 5,
    "database": {"name": "postgres", "user": "drflow",
                 "password": {"ref": "aws-sm:drflow-lab/postgres#password"}},
    "primary": {"site": "prod", "vm": "crm-prod", "host": "127.0.0.1", "port": 5441},
    "standby": {"site": "dr", "vm": "crm-dr", "host": "127.0.0.1", "port": 5442},
    "dns": {"zone_id": "Z123", "record": "crm.db.lab.drflow.internal.", "ttl": 30},
}


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "drflow.yaml"
    p.write_text(COMMENTED)
    p.chmod(0o640)
    return p


def test_a_group_added_keeps_the_files_comments_layout_and_mode(cfg: Path) -> None:
    add_group(cfg, CRM)
    text = cfg.read_text()
    assert text.startswith(COMMENTED.rstrip("\n"))  # everything before, byte for byte
    assert "# orders: the main book, sync, RPO 5 s" in text
    before = [g.name for g in load_config(cfg.with_name("drflow.yaml.bak")).groups]
    assert [g.name for g in load_config(cfg).groups] == [*before, "crm"]
    assert cfg.stat().st_mode & 0o777 == 0o640
    assert cfg.with_name("drflow.yaml.bak").read_text() == COMMENTED
    assert remove_group(cfg, "crm")
    assert cfg.read_text() == COMMENTED
    assert not remove_group(cfg, "crm")


def test_a_change_that_would_not_load_is_refused_and_writes_nothing(cfg: Path) -> None:
    with pytest.raises(EditError, match="already has a group named 'orders'"):
        add_group(cfg, {**CRM, "name": "orders"})
    bad = {**CRM, "primary": {**CRM["primary"], "port": 99999}}
    with pytest.raises(EditError, match="would not be valid") as err:
        add_group(cfg, bad)
    assert "port" in str(err.value)
    assert cfg.read_text() == COMMENTED
    assert not cfg.with_name("drflow.yaml.bak").exists()


def test_a_file_written_by_pyyaml_keeps_its_list_style(cfg: Path) -> None:
    """`- item` under its key, as PyYAML (and `drflow lab up`) write lists: kept so."""
    import yaml

    text = yaml.safe_dump(yaml.safe_load(COMMENTED), sort_keys=False)
    cfg.write_text(text)
    add_group(cfg, CRM)
    assert cfg.read_text().startswith(text.rstrip("\n"))
    assert "\n- name: crm\n" in cfg.read_text()
    assert remove_group(cfg, "crm")
    assert cfg.read_text() == text
