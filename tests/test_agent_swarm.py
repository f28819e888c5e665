"""The swarm that speaks for the agents of inventory-only groups in a scale run is seen by a real
gateway and etcd as agents are: signed heartbeats accepted, a primary known per group, leader keys
bound to leases that lapse when it stops."""

from __future__ import annotations

import signal
import time

import pytest

from drflow.etcd import Client
from drflow.leader_keys import Leader, leader_key
from lab import agent_swarm
from tests.harness import start_env, stop_env, wait_for

pytestmark = pytest.mark.lab

NAMES = ["load001", "load002", "load003"]


def test_the_swarm_is_heard_holds_its_keys_and_loses_its_site(prefect_api: str) -> None:
    env = start_env(groups=1, gateway=False, inventory_only=NAMES)
    swarm = None
    try:
        spec = agent_swarm.configure(env.lab_dir, env.state, NAMES)
        swarm, figures_path = agent_swarm.start(env.lab_dir, spec)
        etcd = Client(env.state["etcd"]["endpoints"])
        for name in NAMES:
            kv = wait_for(lambda n=name: etcd.get_kv(leader_key(n)), 30, f"{name}'s leader key")
            assert Leader.decode(kv.value).agent_id == f"{name}-dr"
            assert kv.lease, "the leader key is bound to a lease"
        env.start_gateway()
        env.wait_all_heard()
        wait_for(lambda: all(env.groups_status().get(n, {}).get("primary") == f"{n}-dr"
                             for n in NAMES), 30, "the swarm's primaries heard by the gateway")
        # The figures are written every 2 s: start from a write that already shows every node
        # beating (two rounds), not one from before the gateway answered.
        before = wait_for(lambda: (f := agent_swarm.read_figures(figures_path)).get(
            "heartbeats", 0) >= 2 * 2 * len(NAMES) and f, 10, "the swarm's beats heard")
        time.sleep(4.0)
        after = agent_swarm.read_figures(figures_path)
        assert after["heartbeats"] - before["heartbeats"] >= 2 * len(NAMES) * 3, (before, after)
        # A beat sent as the gateway closes its keep-alive connection is sent again at once (as
        # an agent's): a failure is a beat not answered within 3 s, a few on a loaded machine.
        assert after["heartbeat_failures"] - before["heartbeat_failures"] <= len(NAMES), \
            (before, after)
        assert after["lease_deadline_misses"] == 0 and after["leader_keys_lost"] == 0, after
        assert env.audit_records("incident.open") == []

        swarm.send_signal(signal.SIGUSR1)  # prod lost: the standbys there fall silent
        wait_for(lambda: agent_swarm.read_figures(figures_path).get("site_lost_at"), 10,
                 "the swarm losing prod")
        lost = agent_swarm.read_figures(figures_path)["heartbeats"]
        time.sleep(3.0)
        # Only the three primaries beat now: about one each per second.
        assert agent_swarm.read_figures(figures_path)["heartbeats"] - lost <= 4 * len(NAMES)

        env.stop_gateway()  # what follows would be a takeover for each group
        swarm.terminate()
        swarm.wait(10)
        # Nobody renews the leases any more: the keys lapse with them.
        wait_for(lambda: all(etcd.get_kv(leader_key(n)) is None for n in NAMES), 10,
                 "the leader keys gone with their leases")
    finally:
        if swarm is not None and swarm.poll() is None:
            swarm.kill()
        stop_env(env)
