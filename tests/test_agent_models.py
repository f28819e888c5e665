"""The guest agent's models without pydantic: what it loads, its secrets, its events' wire form.

pydantic costs about 20 MB resident in every protected VM; the agent's configuration, events and
verb arguments are msgspec Structs and its secrets `drflow.secret_refs`. The orchestrator keeps
pydantic: both sides must agree on references, values and the events' wire form.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import SecretStr as PydanticSecretStr

from drflow import secret_refs, secrets
from drflow.events import EventError, EventKind, HealthEvent

ROOT = Path(__file__).resolve().parent.parent


def test_everything_the_agent_runs_loads_no_pydantic(tmp_path: Path) -> None:
    """Every module of the agent imported, a full configuration parsed (every resource type, a
    control API, a lease, secret references), an event sent through the outbox's encoding, a verb's
    arguments checked, a secret resolved: pydantic is never imported."""
    config = tmp_path / "agent.yaml"
    config.write_text(textwrap.dedent("""\
        agent_id: vm-pg-1
        group: orders
        gateway:
          url: http://127.0.0.1:8080/v1/events
          webhook_secret: {ref: "env:WEBHOOK"}
          also: [http://127.0.0.2:8080/v1/events]
        control: {listen: "127.0.0.1:9101", secret: {ref: "env:WEBHOOK"},
                  peers: ["10.0.0.2:5432"]}
        lease: {etcd: [http://127.0.0.1:2379], lease_s: 3, standby_agents: {b: vm-pg-2}}
        resources:
          - {name: lo, type: ip, address: 127.0.0.1, interface: lo}
          - {name: data, type: volume, path: data, depends_on: [lo], min_free_pct: 1}
          - {name: pg, type: postgres, datadir: data/pg, password: {ref: "file:/nonexistent"},
             restart: {backoff_s: {initial: 0.5, max: 4}}}
          - {name: port, type: tcp, port: 5433, depends_on: [pg]}
          - {name: api, type: http, url: "http://127.0.0.1:8000/healthz"}
          - {name: worker, type: process, process_name: worker, start: [/bin/true]}
        """))
    code = textwrap.dedent(f"""
        import importlib, json, os, pkgutil, sys
        os.environ["WEBHOOK"] = "s3cret"
        import agents
        for m in pkgutil.walk_packages(agents.__path__, "agents."):
            importlib.import_module(m.name)
        from agents.config import load_config
        from agents.drivers import args_of
        from agents.drivers.pg_args import PromoteArgs
        from drflow.events import EventKind, HealthEvent
        from drflow.secret_refs import resolve
        cfg = load_config({str(config)!r})
        assert resolve(cfg.gateway.webhook_secret).get_secret_value() == "s3cret"
        HealthEvent(agent_id=cfg.agent_id, group=cfg.group, kind=EventKind.HEARTBEAT).to_json()
        args_of(PromoteArgs, {{"relax_sync": True}})
        print(json.dumps(sorted(sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    loaded = {m.split(".")[0] for m in json.loads(out.stdout.splitlines()[-1])}
    assert "agents" in loaded and "msgspec" in loaded
    assert loaded & {"pydantic", "pydantic_core", "pydantic_settings", "typer", "click"} == set()


def test_the_agents_secret_never_shows_itself(caplog: pytest.LogCaptureFixture) -> None:
    secret = secret_refs.SecretStr("hunter2-value")
    shown = [str(secret), repr(secret), f"{secret}", f"{secret!r}", f"{secret:>30}",
             "%s" % secret,  # noqa: UP031 -- old-style formatting, as logging does it
             json.dumps({"s": str(secret)}), str([secret]), str({"k": secret})]
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("secret %s %r", secret, secret)
    shown.append(caplog.text)
    for text in shown:
        assert "hunter2" not in text, text
    assert secret.get_secret_value() == "hunter2-value"
    assert secret == secret_refs.SecretStr("hunter2-value") and len(secret) == 13
    assert str(secret_refs.SecretStr("")) == ""


def test_both_kinds_of_reference_agree_and_share_one_cache(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    secrets.clear_cache()
    monkeypatch.setenv("DRFLOW_TEST_SECRET", "first")
    light = secret_refs.SecretRef("env:DRFLOW_TEST_SECRET")
    model = secrets.SecretRef(ref="env:DRFLOW_TEST_SECRET")
    agent_side = secret_refs.resolve(light)
    orchestrator_side = secrets.resolve(model)
    assert isinstance(orchestrator_side, PydanticSecretStr)
    assert agent_side.get_secret_value() == orchestrator_side.get_secret_value() == "first"
    # Cached for the life of the process, on both sides, until cleared (a rotation).
    monkeypatch.setenv("DRFLOW_TEST_SECRET", "second")
    assert secrets.resolve(model).get_secret_value() == "first"
    secret_refs.clear_cache()
    assert secret_refs.resolve(light).get_secret_value() == "second"
    assert secrets.resolve(model).get_secret_value() == "second"
    secrets.clear_cache()

    empty = tmp_path / "empty"
    empty.write_text("\n")
    for resolve, ref in ((secret_refs.resolve, secret_refs.SecretRef(f"file:{empty}")),
                         (secrets.resolve, secrets.SecretRef(ref=f"file:{empty}"))):
        with pytest.raises(secret_refs.SecretError, match="the value is empty"):
            resolve(ref)  # type: ignore[operator]


@pytest.mark.parametrize(("data", "why"), [
    ("hunter2", "inline secrets are not allowed"),
    (12345678, "inline secrets are not allowed"),
    ({"ref": "vault:x"}, "unknown secret reference scheme 'vault'"),
    ({"ref": "hunter2"}, "unknown secret reference scheme: must start with one of"),
    ({"ref": "Hunter2-Passw0rd:x"}, "unknown secret reference scheme: must start with one of"),
    ({"ref": "env:1X"}, "env: reference needs a variable name"),
    ({"ref": "file:relative"}, "file: reference needs an absolute path"),
    ({"ref": "aws-sm:#"}, "aws-sm: reference needs a secret id"),
    ({"ref": "env:X", "value": "hunter2"}, "a secret reference has only `ref`"),
    ({}, "must be a secret reference"),
])
def test_a_bad_reference_is_refused_alike_on_both_sides(data: object, why: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValueError, match=why) as light:
        secret_refs.SecretRef.parse(data)
    assert "hunter2" not in str(light.value)
    if data == {} or "only `ref`" in why:
        return  # pydantic says "Field required" / "Extra inputs are not permitted"
    with pytest.raises(ValidationError, match=why) as model:
        secrets.SecretRef.model_validate(data)
    assert "hunter2" not in str(model.value)


def test_an_event_the_agent_sends_is_the_event_the_gateway_reads() -> None:
    event = HealthEvent(agent_id="vm-pg-1", group="orders", kind=EventKind.RESOURCE_FAILED,
                        resource="pg", details={"attempt": 2, "error": "connection refused"})
    wire = json.loads(event.to_json())
    assert set(wire) == {"event_id", "agent_id", "group", "kind", "resource", "observed_at",
                         "details"}
    assert wire["kind"] == "resource_failed" and wire["observed_at"].endswith("Z")
    assert HealthEvent.from_json(event.to_json()) == event


@pytest.mark.parametrize(("body", "field", "says"), [
    ({"agent_id": "a", "group": "g", "kind": "reboot_everything"}, "kind", "Invalid enum value"),
    ({"group": "g", "kind": "heartbeat"}, "agent_id", "missing required field"),
    ({"agent_id": "a", "group": "g", "kind": "heartbeat", "cmd": "rm -rf /"}, "cmd",
     "unknown field"),
    ({"agent_id": "", "group": "g", "kind": "heartbeat"}, "agent_id", "length >= 1"),
    ({"agent_id": "a", "group": "g" * 201, "kind": "heartbeat"}, "group", "length <= 200"),
    ({"agent_id": "a", "group": "g", "kind": "heartbeat", "observed_at": "soon"}, "observed_at",
     "datetime"),
])
def test_a_bad_event_names_its_field_and_never_echoes_the_input(body: dict[str, object],
                                                                 field: str, says: str) -> None:
    with pytest.raises(EventError) as err:
        HealthEvent.from_json(json.dumps(body))
    assert err.value.field == field and says in err.value.message
    for value in ("reboot_everything", "rm -rf", "soon"):
        assert value not in str(err.value)
