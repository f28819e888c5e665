"""drflow.yaml changed while drflow runs: the gateway serves groups added to the file and refuses
groups removed from it within about a second, over real HTTP; an invalid edit changes nothing;
the runbooks' `runtime()` follows the file the same way."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from drflow import secrets
from drflow.config import load_config, parse_config
from drflow.config.edit import add_group, remove_group
from flows.runtime import runtime
from orchestrator.gateway import create_app
from orchestrator.gateway.from_config import settings_from_config
from orchestrator.gateway.reload import ConfigReloader, plan_reload
from tests.test_gateway import (
    SECRET,
    Gateway,
    RecordingAudit,
    RecordingStarter,
    event,
    serve_app,
)
from tests.test_gateway_leases import (  # noqa: F401  (shared_etcd: a module fixture)
    Etcd,
    hold,
    leases_view,
    needs_etcd,
    shared_etcd,
    wait_until,
)

DB_PASSWORD = "db-pw-1c9e4b"  # a test value
NEW_DB_PASSWORD = "db-pw-new-77d2f0"  # a test value, of the group added in one test
_n = iter(range(1, 10_000))

HEAD = """\
sites:
  prod:
    vcenter: {{url: "http://127.0.0.1:18989/sdk", datacenter: prod, username: drflow,
              password: {{ref: "env:DRFLOW_TEST_VC_PASSWORD"}}}}
  dr:
    vcenter: {{url: "http://127.0.0.1:18989/sdk", datacenter: dr, username: drflow,
              password: {{ref: "env:DRFLOW_TEST_VC_PASSWORD"}}}}
slack:
  api_url: "http://127.0.0.1:18991/api/"
  channel: C0DRFLOW1
  bot_token: {{ref: "env:SLACK_BOT_TOKEN"}}
  signing_secret: {{ref: "env:DRFLOW_TEST_SLACK_SIGNING"}}
audit:
  url: "sqlite:///{audit}"
gateway:
  listen: "127.0.0.1:8088"
  webhook_secret: {{ref: "env:DRFLOW_WEBHOOK_SECRET"}}
  heartbeat_timeout_s: {timeout}
{etcd}groups:
"""


def group_yaml(name: str, port: int) -> str:
    return f"""\
  - name: {name}
    replication: sync
    rpo_budget_s: 5
    database: {{name: postgres, user: drflow, password: {{ref: "env:DRFLOW_TEST_DB_PASSWORD"}}}}
    primary: {{site: prod, vm: {name}-prod, host: 127.0.0.1, port: {port}}}
    standby: {{site: dr, vm: {name}-dr, host: 127.0.0.1, port: {port + 1}}}
    dns: {{zone_id: Z123, record: {name}.db.lab.drflow.internal., ttl: 30}}
    policy: {{auto_failover: true}}
"""


def group_dict(name: str, port: int, password_env: str = "DRFLOW_TEST_DB_PASSWORD") -> dict[str, Any]:
    """A group as `drflow.config.edit.add_group` takes it (as the file spells it)."""
    return {
        "name": name, "application": "postgres", "replication": "sync", "rpo_budget_s": 5,
        "database": {"name": "postgres", "user": "drflow",
                     "password": {"ref": f"env:{password_env}"}},
        "primary": {"site": "prod", "vm": f"{name}-prod", "host": "127.0.0.1", "port": port},
        "standby": {"site": "dr", "vm": f"{name}-dr", "host": "127.0.0.1", "port": port + 1},
        "dns": {"zone_id": "Z123", "record": f"{name}.db.lab.drflow.internal.", "ttl": 30},
        "policy": {"auto_failover": True},
    }


def config_text(tmp: Path, groups: list[str], timeout: float = 120,
                etcd_url: str | None = None) -> str:
    etcd = f'etcd: {{endpoints: ["{etcd_url}"], timeout_s: 0.5}}\n' if etcd_url else ""
    head = HEAD.format(audit=tmp / "audit.db", timeout=timeout, etcd=etcd)
    return head + "".join(group_yaml(g, 5500 + 2 * i) for i, g in enumerate(groups))


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in (("DRFLOW_WEBHOOK_SECRET", SECRET), ("DRFLOW_TEST_VC_PASSWORD", "vc-pw"),
                        ("SLACK_BOT_TOKEN", "xoxb-test"), ("DRFLOW_TEST_SLACK_SIGNING", "sig"),
                        ("DRFLOW_TEST_DB_PASSWORD", DB_PASSWORD),
                        ("DRFLOW_TEST_NEW_DB_PASSWORD", NEW_DB_PASSWORD)):
        monkeypatch.setenv(name, value)
    secrets.clear_cache()
    yield
    secrets.clear_cache()


@contextmanager
def gateway_from_file(path: Path, interval_s: float = 1.0) -> Iterator[Gateway]:
    """The gateway as `drflow gateway` builds it from a file, watching that file."""
    cfg = load_config(path)
    settings = settings_from_config(cfg, path.with_name("gw.sqlite"))
    starter, audit = RecordingStarter(), RecordingAudit()
    app = create_app(settings, starter, audit)
    app.state.gateway.config_watch = ConfigReloader(path, cfg, interval_s)
    with serve_app(app) as url:
        yield Gateway(url, app, starter, audit)


def beat(gw: Gateway, group: str, agent: str | None = None, role: str = "primary") -> int:
    r = gw.post(event("heartbeat", agent=agent or f"{group}-prod", group=group, role=role))
    return r.status_code


def until(pred: Any, timeout: float) -> float | None:
    """Seconds until `pred()` held, polling; None if it did not within `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def warnings_of(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and words in r.getMessage()]


# -- the pure decision ------------------------------------------------------------------------------


def test_plan_reload_names_groups_added_removed_changed_and_sections_needing_a_restart(
        tmp_path: Path) -> None:
    old = parse_config(config_text(tmp_path, ["orders", "payments", "stock"]))
    text = config_text(tmp_path, ["orders", "payments", "crm"], timeout=5)
    new = parse_config(text.replace("port: 5502", "port: 5602"))  # payments' primary moved
    plan = plan_reload(old, new)
    assert (plan.added, plan.removed, plan.changed) == (("crm",), ("stock",), ("payments",))
    assert plan.restart == ("gateway",)  # its heartbeat timeout
    assert plan.summary() == "added groups crm, removed groups stock, changed groups payments"
    # The runbooks read aws and drill at each run: no restart for those.
    same_groups = parse_config(config_text(tmp_path, ["orders", "payments", "stock"]).replace(
        "groups:\n", "drill: {work_dir: /var/tmp/other}\ngroups:\n", 1))
    plan = plan_reload(old, same_groups)
    assert not plan.groups_changed and plan.restart == ()
    assert plan_reload(old, old).summary() == "no group changed"


# -- the gateway, over real HTTP --------------------------------------------------------------------


def test_a_group_added_to_the_file_is_served_within_two_seconds(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "drflow.yaml"
    path.write_text(config_text(tmp_path, ["orders", "payments"]))
    with gateway_from_file(path) as gw:
        assert beat(gw, "orders") == 202
        refused = gw.post(event("heartbeat", agent="crm-prod", group="crm"))
        assert refused.status_code == 404 and refused.json()["reason"] == "unknown_group"
        add_group(path, group_dict("crm", 5600))
        took = until(lambda: beat(gw, "crm") == 202, 3.0)
        assert took is not None and took < 2.0, f"crm not served ({took})"
        # Its standby too; a VM of another group is no node of it.
        assert beat(gw, "crm", "crm-dr", "standby") == 202
        assert beat(gw, "crm", "orders-prod") == 403
        view = gw.groups()
        assert set(view) == {"orders", "payments", "crm"}
        assert view["crm"]["primary"] == "crm-prod"
        assert {a["agent_id"] for a in view["crm"]["agents"]} == {"crm-prod", "crm-dr"}
        assert view["crm"]["primary_heartbeat_age_s"] < 5
        assert beat(gw, "orders") == 202  # the others as before
    [record] = gw.audit.of("config.reload")
    assert record["target"] == str(path) and record["outcome"] == "applied"
    assert record["parameters"] == {"added": ["crm"], "removed": [], "changed": [],
                                    "restart_needed": []}
    assert record["reason"] == "config reloaded: added groups crm"
    assert any("config reloaded: added groups crm" in m for m in
               [r.getMessage() for r in caplog.records])


def test_a_group_removed_from_the_file_is_refused_and_leaves_the_views(tmp_path: Path) -> None:
    path = tmp_path / "drflow.yaml"
    path.write_text(config_text(tmp_path, ["orders", "payments"]))
    with gateway_from_file(path) as gw:
        assert beat(gw, "payments") == 202 and beat(gw, "orders") == 202
        assert gw.groups()["payments"]["primary"] == "payments-prod"
        assert remove_group(path, "payments")
        took = until(lambda: beat(gw, "payments") == 404, 3.0)
        assert took is not None and took < 2.0, f"payments still served ({took})"
        failed = gw.post(event("recovery_exhausted", agent="payments-prod", group="payments"))
        assert failed.status_code == 404 and failed.json()["reason"] == "unknown_group"
        assert set(gw.groups()) == {"orders"}
        metrics = httpx.get(gw.url + "/metrics", timeout=5).text
        assert 'agent_id="orders-prod"' in metrics and 'group="payments"' not in metrics
        assert beat(gw, "orders") == 202
        time.sleep(0.3)
        assert gw.starter.calls == []  # a forgotten primary is no silent primary either
    [record] = gw.audit.of("config.reload")
    assert record["parameters"]["removed"] == ["payments"]


def test_a_group_added_again_is_watched_from_its_stored_primary(tmp_path: Path) -> None:
    path = tmp_path / "drflow.yaml"
    both = config_text(tmp_path, ["orders", "payments"])
    path.write_text(both)
    with gateway_from_file(path) as gw:
        assert beat(gw, "payments") == 202
        path.write_text(config_text(tmp_path, ["orders"]))
        assert until(lambda: "payments" not in gw.groups(), 3.0) is not None
        path.write_text(both)
        assert until(lambda: "payments" in gw.groups(), 3.0) is not None
        # As after a start: armed from the state, its silence counted from now.
        view = gw.groups()["payments"]
        assert view["primary"] == "payments-prod"
        assert [(a["agent_id"], a["heard"]) for a in view["agents"]] == [("payments-prod", False)]
        assert beat(gw, "payments") == 202
        assert [r["parameters"]["added"] for r in gw.audit.of("config.reload")] == [
            [], ["payments"]]


def test_an_invalid_edit_keeps_the_running_configuration(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "drflow.yaml"
    good = config_text(tmp_path, ["orders"])
    path.write_text(good)
    with gateway_from_file(path) as gw:
        # crm added, but its standby at the primary's site: the whole version is refused.
        bad = good + group_yaml("crm", 5600).replace("site: dr", "site: prod")
        path.write_text(bad)
        time.sleep(2.5)  # two looks at least
        assert beat(gw, "orders") == 202
        assert gw.post(event("heartbeat", agent="crm-prod", group="crm")).status_code == 404
        invalid = warnings_of(caplog, "changed but is not valid")
        assert len(invalid) == 1, invalid  # once for this version, not at every look
        assert "groups[1].standby.site" in invalid[0]
        # Another invalid version (not even YAML) is reported once again.
        path.write_text(good + "  - name: [crm\n")
        assert until(lambda: len(warnings_of(caplog, "changed but is not valid")) == 2, 3.0)
        assert gw.audit.of("config.reload") == []
        assert set(gw.groups()) == {"orders"}
        # Fixed: applied.
        path.write_text(good + group_yaml("crm", 5600))
        assert until(lambda: beat(gw, "crm") == 202, 3.0) is not None
    assert len(gw.audit.of("config.reload")) == 1


def test_sections_read_at_start_wait_for_a_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "drflow.yaml"
    path.write_text(config_text(tmp_path, ["orders"], timeout=120))
    with gateway_from_file(path) as gw:
        path.write_text(config_text(tmp_path, ["orders", "crm"], timeout=7))
        assert until(lambda: beat(gw, "crm") == 202, 3.0) is not None
        assert gw.app.state.gateway.settings.heartbeat_timeout_s == 120
        [said] = warnings_of(caplog, "restart")
        assert "changed in gateway" in said, said
    [record] = gw.audit.of("config.reload")
    assert record["parameters"]["restart_needed"] == ["gateway"]


@needs_etcd
def test_the_leader_key_of_an_added_group_is_watched(
        shared_etcd: Etcd, tmp_path: Path) -> None:  # noqa: F811
    added = f"lease{next(_n)}"
    path = tmp_path / "drflow.yaml"
    path.write_text(config_text(tmp_path, ["orders"], etcd_url=shared_etcd.url))
    with gateway_from_file(path) as gw:
        add_group(path, group_dict(added, 5600))
        assert until(lambda: beat(gw, added) == 202, 3.0) is not None  # its primary named
        hold(shared_etcd.client(), added, agent=f"{added}-prod")
        assert wait_until(lambda: leases_view(gw, added)["leader_holder"] == f"{added}-prod", 3)
        # The key's lease runs out: the group's failover starts as for any other group.
        assert gw.starter.wait(1, 10), "no incident after the added group's leader key expired"
        incident = gw.starter.calls[0][1]
        assert incident.group == added and incident.kind.value == "lease_expired"
        metrics = httpx.get(gw.url + "/metrics", timeout=5).text
        assert f'drflow_gateway_leader_key_present{{group="{added}"}} 0.0' in metrics


# -- the runbooks' runtime() ------------------------------------------------------------------------


def test_runtime_returns_the_new_config_after_a_change(tmp_path: Path) -> None:
    path = tmp_path / "drflow.yaml"
    path.write_text(config_text(tmp_path, ["orders"], etcd_url="http://127.0.0.1:1"))
    rt = runtime(str(path))
    assert runtime(str(path)) is rt  # unchanged: the same warm Runtime
    etcd, audit = rt.etcd, rt.audit
    add_group(path, group_dict("crm", 5600, password_env="DRFLOW_TEST_NEW_DB_PASSWORD"))
    new = runtime(str(path))
    assert [g.name for g in new.cfg.groups] == ["orders", "crm"]
    assert new.cfg.group("crm").primary.vm == "crm-prod"
    # Its clients carried over where their sections did not change: still warm.
    assert new.etcd is etcd and new.audit is audit
    # The audit trail, shared with the gateway, now scrubs the added group's secret too.
    rec = new.audit.append("test", "probe", "crm", {"leak": NEW_DB_PASSWORD}, "ok",
                           f"password {NEW_DB_PASSWORD}")
    assert NEW_DB_PASSWORD not in rec.model_dump_json()
    assert runtime(str(path)) is new


def test_runtime_keeps_the_old_config_on_an_invalid_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "drflow.yaml"
    good = config_text(tmp_path, ["orders"])
    path.write_text(good)
    rt = runtime(str(path))
    path.write_text(good + "  - name: [crm\n")
    for _ in range(3):
        assert runtime(str(path)) is rt  # a run is never failed by an edit in progress
    invalid = warnings_of(caplog, "changed but is not valid")
    assert len(invalid) == 1, invalid
    path.unlink()  # removed: still the last good one
    assert runtime(str(path)) is rt
    path.write_text(good + group_yaml("crm", 5600))
    assert [g.name for g in runtime(str(path)).cfg.groups] == ["orders", "crm"]
