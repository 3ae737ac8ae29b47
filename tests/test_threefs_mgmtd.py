"""3FS mgmtd: chain placement, the public-state transition table, state surviving a restart."""

from __future__ import annotations

import random

import pytest

from storage.threefs.kv import SqliteKV
from storage.threefs.mgmtd.manager import Manager, next_public_state, place_chains
from storage.threefs.mgmtd.routing import LocalState, TargetState

from threefs_storage_fixtures import FakeClock


def test_create_chains_places_replicas_on_distinct_nodes():
    rng = random.Random(0)
    for _ in range(200):
        replicas = rng.randint(1, 4)
        nodes = {n: [] for n in range(rng.randint(replicas, 7))}
        next_target = 1
        for n in nodes:
            for _ in range(rng.randint(1, 5)):
                nodes[n].append(next_target)
                next_target += 1
        total = next_target - 1
        try:
            chains = place_chains(nodes, replicas)
        except ValueError as exc:
            assert "replicas" in str(exc)
            assert total % replicas or max(map(len, nodes.values())) > total // replicas
            continue
        node_of = {t: n for n, ts in nodes.items() for t in ts}
        assert sorted(t for c in chains for t in c) == list(range(1, total + 1))
        for chain in chains:
            assert len(chain) == replicas and len({node_of[t] for t in chain}) == replicas
    with pytest.raises(ValueError, match="replicas=3"):
        Manager().create_chains({1: [1, 2, 3], 2: [4, 5, 6]}, replicas=3)
    table = Manager().create_chains({1: [11, 12], 2: [21, 22], 3: [31, 32]}, replicas=3)
    assert [c.version for c in table.chains.values()] == [1, 1] and table.version == 1


def test_transition_table():
    S, Y, W, L, O = (TargetState.SERVING, TargetState.SYNCING, TargetState.WAITING, TargetState.LASTSRV,
                     TargetState.OFFLINE)
    up, online, off = LocalState.UPTODATE, LocalState.ONLINE, LocalState.OFFLINE
    assert next_public_state(off, S, S, True) is O
    assert next_public_state(off, S, None, False) is L
    assert next_public_state(off, L, None, False) is L
    assert next_public_state(online, O, S, True) is W
    assert next_public_state(online, W, S, True) is Y
    assert next_public_state(online, W, L, False) is W
    assert next_public_state(online, Y, O, False) is W
    assert next_public_state(up, Y, S, True) is S
    assert next_public_state(up, W, S, True) is W  # up-to-date never skips a resync
    assert next_public_state(online, L, None, False) is S
    assert next_public_state(off, Y, S, True) is O


def test_manager_state_survives_restart(tmp_path):
    clock = FakeClock()
    kv = SqliteKV(str(tmp_path / "kv.sqlite"))
    manager = Manager(kv, heartbeat_timeout=2.0, clock=clock)
    manager.create_chains({1: [11, 12], 2: [21, 22], 3: [31, 32]}, replicas=3)
    for node in (1, 2, 3):
        manager.register_node(node, f"127.0.0.1:{9000 + node}")
    manager.mark_offline(21)
    before = manager.routing()
    assert before.target_states[21] is TargetState.OFFLINE
    assert before.chain(before.chain_of(21)).targets[-1] == 21

    again = Manager(SqliteKV(str(tmp_path / "kv.sqlite")), heartbeat_timeout=2.0, clock=clock)
    assert again.routing() == before
    assert again.create_chains({1: [11, 12], 2: [21, 22], 3: [31, 32]}, replicas=3) == before.chain_table
    clock.now += 3.0  # nobody heartbeats to the new manager: all offline, one lastsrv per chain
    after = again.check()
    for chain_id in after.chain_table.chain_ids:
        states = [after.target_states[t] for t in after.chain(chain_id).targets]
        assert states.count(TargetState.LASTSRV) == 1 and states.count(TargetState.OFFLINE) == 2
    assert Manager(kv).routing() == after


def test_a_standby_changes_nothing_while_the_leader_holds_its_lease(tmp_path):
    """Two mgmtd members on one sqlite KV: only the lease holder serves and writes; a standby answers
    NotPrimary naming the leader; after the lease lapses the standby takes over with the stored state,
    and the old leader (even one whose clock lags and still believes it leads) can write nothing."""
    from storage.threefs.errors import NotPrimary
    from storage.threefs.mgmtd.election import LeaderElection
    from storage.threefs.mgmtd.state import STATE_KEY

    path = str(tmp_path / "kv.sqlite")
    wall_a, wall_b = FakeClock(), FakeClock()  # each member's wall clock: a's will lag b's
    a = Manager(SqliteKV(path), clock=FakeClock(), election=LeaderElection(SqliteKV(path), "a", 5.0, wall_a))
    b = Manager(SqliteKV(path), clock=FakeClock(), election=LeaderElection(SqliteKV(path), "b", 5.0, wall_b))
    with pytest.raises(NotPrimary):
        a.routing()  # not elected yet
    assert a.campaign("127.0.0.1:1") and not b.campaign("127.0.0.1:2")
    a.create_chains({1: [11], 2: [21], 3: [31]}, replicas=3)
    for node in (1, 2, 3):
        a.register_node(node, f"127.0.0.1:{9000 + node}")
    kv = SqliteKV(path)
    stored = kv.transact(lambda txn: txn.get(STATE_KEY))
    for call in (b.routing, lambda: b.mark_offline(21), lambda: b.heartbeat(2, {}), b.check,
                 lambda: b.register_node(2, "127.0.0.1:1")):
        with pytest.raises(NotPrimary, match="127.0.0.1:1") as raised:
            call()
        assert raised.value.leader == "127.0.0.1:1"
    wall_b.now = 4.9
    assert not b.campaign("127.0.0.1:2")  # the lease has 0.1 s left
    wall_a.now = wall_b.now = 4.0
    assert a.campaign("127.0.0.1:1")  # renewed until 9.0
    wall_b.now = 8.9
    assert not b.campaign("127.0.0.1:2")
    assert kv.transact(lambda txn: txn.get(STATE_KEY)) == stored  # the standby wrote nothing

    # a stops renewing (paused); b's clock passes the lease; a's lags and still thinks it leads
    wall_b.now = 9.5
    assert b.campaign("127.0.0.1:2")
    assert b.routing().target_states[21] is TargetState.SERVING  # loaded from the KV store
    wall_a.now = 8.0
    with pytest.raises(NotPrimary, match="127.0.0.1:2"):
        a.mark_offline(21)  # fenced inside its transaction
    assert kv.transact(lambda txn: txn.get(STATE_KEY)) == stored
    wall_a.now = 9.6
    with pytest.raises(NotPrimary):
        a.routing()
    assert not a.campaign("127.0.0.1:1")
    b.mark_offline(21)
    assert Manager(kv).routing().target_states[21] is TargetState.OFFLINE
    b.resign()
    assert a.campaign("127.0.0.1:1") and a.routing().target_states[21] is TargetState.OFFLINE
    wall_a.now = 9.6 + 5.0  # a leader that stopped renewing (a paused process) stops serving at expiry
    with pytest.raises(NotPrimary):
        a.routing()


def test_a_leader_that_wins_again_after_a_pause_serves_its_successor_s_state(tmp_path):
    """a leads, is paused past its lease without noticing, b takes over and marks a target offline, b dies;
    when a wins the lease again it must load b's state, not serve (and save) its own stale table."""
    from storage.threefs.mgmtd.election import LeaderElection

    path = str(tmp_path / "kv.sqlite")
    wall_a, wall_b = FakeClock(), FakeClock()
    a = Manager(SqliteKV(path), clock=FakeClock(), election=LeaderElection(SqliteKV(path), "a", 5.0, wall_a))
    b = Manager(SqliteKV(path), clock=FakeClock(), election=LeaderElection(SqliteKV(path), "b", 5.0, wall_b))
    assert a.campaign("127.0.0.1:1")
    a.create_chains({1: [11], 2: [21], 3: [31]}, replicas=3)
    version = a.routing().chain_table.version
    wall_b.now = 5.5
    assert b.campaign("127.0.0.1:2")  # a's lease lapsed while it was paused
    b.mark_offline(21)
    wall_a.now = wall_b.now = 11.0  # b died without resigning; its lease has lapsed too
    assert a.campaign("127.0.0.1:1")
    assert a.routing().target_states[21] is TargetState.OFFLINE
    assert a.routing().chain_table.version > version


def test_a_storage_routing_lease_runs_from_when_the_heartbeat_was_sent(tmp_path):
    """Storage serves on its last heartbeat's routing for T/2 counted from the send (never past the point
    mgmtd, counting T from the arrival, could declare it offline); routing from other calls is adopted
    but extends nothing; older routing never replaces newer."""
    from storage.threefs.errors import TargetNotServing
    from storage.threefs.storage.routing_lease import LeasedManager, RoutingLease

    clock = FakeClock()
    manager = Manager(heartbeat_timeout=2.0, clock=clock)
    manager.create_chains({1: [11], 2: [21], 3: [31]}, replicas=3)
    lease = RoutingLease(1.0, clock)
    leased = LeasedManager(manager, lease, clock)
    with pytest.raises(TargetNotServing, match="fenced"):
        lease.routing()  # no heartbeat yet
    with pytest.raises(ValueError, match="duration"):
        RoutingLease(0)
    leased.heartbeat(1, {11: LocalState.UPTODATE})
    first = lease.routing()
    clock.now = 0.9
    leased.mark_offline(21)
    assert lease.routing().target_states[21] is TargetState.OFFLINE  # adopted ...
    clock.now = 1.0
    with pytest.raises(TargetNotServing, match="fenced"):
        lease.routing()  # ... but the lease ran out 1.0 s after the heartbeat was sent
    lease.renew(first, sent_at=0.95)  # a slow heartbeat's older reply: renews, keeps the newer routing
    assert lease.routing().target_states[21] is TargetState.OFFLINE
    clock.now = 1.95  # 1.0 s after it was sent, however late the reply came
    with pytest.raises(TargetNotServing, match="fenced"):
        lease.routing()


def test_an_old_mgmtd_json_moves_into_the_kv_store_once(tmp_path):
    from storage.threefs.mgmtd.state import import_state_file

    manager = Manager(SqliteKV(str(tmp_path / "old.sqlite")))
    manager.create_chains({1: [11], 2: [21], 3: [31]}, replicas=3)
    manager.mark_offline(21)
    old_state = SqliteKV(str(tmp_path / "old.sqlite")).transact(lambda txn: txn.get(b"MGMT/state"))
    (tmp_path / "mgmtd.json").write_bytes(old_state)  # the file format is the stored document
    kv = SqliteKV(str(tmp_path / "new.sqlite"))
    assert import_state_file(kv, tmp_path / "mgmtd.json")
    assert Manager(kv).routing() == manager.routing()
    assert not (tmp_path / "mgmtd.json").exists() and (tmp_path / "mgmtd.json.imported").exists()
    assert not import_state_file(kv, tmp_path / "mgmtd.json")
