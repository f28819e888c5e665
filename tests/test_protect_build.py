"""What `drflow protect` writes, without a lab: the standby's own identity and the agents'
configs (valid as the agent reads them)."""

from __future__ import annotations

from pathlib import Path

import yaml

from agents.config import parse_config
from orchestrator.protect_build import (
    Common,
    Node,
    Setting,
    agent_config,
    standby_datadir,
    standby_identity,
)

PRIMARY = Node("crm-prod", "prod", "10.1.0.21", 5433, "/srv/pg/crm/prod/data", 9101)
STANDBY = Node("crm-dr", "dr", "10.2.0.21", 5433, standby_datadir("15.8", "crm"), 9101)


def test_the_standby_gets_its_own_identity_for_files_outside_the_data_directory() -> None:
    rows = [
        Setting("/srv/pg/crm/prod/data/postgresql.conf", "wal_level", "replica"),
        Setting("/srv/pg/crm/prod/instance.conf", "port", "5433"),
        Setting("/srv/pg/crm/prod/instance.conf", "listen_addresses", "10.1.0.21, 127.0.0.1"),
        Setting("/srv/pg/crm/prod/instance.conf", "unix_socket_directories", "/srv/pg/crm/prod"),
        Setting("/srv/pg/crm/prod/instance.conf", "cluster_name", "crm-prod"),
        Setting("/srv/pg/crm/prod/instance.conf", "work_mem", "it's 4MB"),
        Setting("/etc/pg/extra.conf", "max_connections", "80"),
    ]
    files = {f.path: f.text for f in standby_identity(rows, PRIMARY, STANDBY)}
    # Inside the data directory: copied by the base backup, not written again.
    assert set(files) == {"/var/lib/postgresql/15/crm/instance.conf", "/etc/pg/extra.conf"}
    text = files["/var/lib/postgresql/15/crm/instance.conf"]
    assert "port = '5433'" in text
    assert "listen_addresses = '10.2.0.21, 127.0.0.1'" in text
    assert "unix_socket_directories = '/var/lib/postgresql/15/crm'" in text
    assert "cluster_name = 'crm-dr'" in text
    assert "work_mem = 'it''s 4MB'" in text  # PostgreSQL's quoting, kept as it was
    assert "max_connections = '80'" in files["/etc/pg/extra.conf"]


def test_both_agent_configs_are_valid_and_name_only_the_peer() -> None:
    common = Common(group="crm", gateway_urls=("http://10.2.0.5:8088", "http://10.3.0.5:8088"),
                    etcd=("http://10.2.0.6:2379",), lease_s=3, replication="sync",
                    db_user="drflow", db_name="postgres", bin_dir="/usr/lib/postgresql/15/bin")
    for me, peer in ((PRIMARY, STANDBY), (STANDBY, PRIMARY)):
        text = yaml.safe_dump(agent_config(me, peer, common))
        cfg = parse_config(text, base_dir=Path("/"))
        assert cfg.agent_id == me.vm and cfg.group == "crm"
        assert cfg.control is not None and cfg.control.peers == [f"{peer.address}:{peer.port}"]
        assert str(cfg.control_resource().datadir) == me.datadir
        assert cfg.gateway.also == ["http://10.3.0.5:8088/v1/events"]
        assert cfg.lease is not None and cfg.lease.replication == "sync"
