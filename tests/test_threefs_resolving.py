"""ResolvingClient: follows a service to its new address, and resends only what cannot run twice wrongly."""

from __future__ import annotations

import threading

import pytest

from storage.threefs.errors import NodeUnavailable, NotPrimary
from storage.threefs.net.resolving import ResolvingClient
from storage.threefs.net.transport import RpcClient, RpcServer
from storage.threefs.net.wire_types import threefs_codec

CODEC, SECRET = threefs_codec(), b"resolving-test-secret".ljust(32, b".")


def serve(obj) -> RpcServer:
    return RpcServer(obj, codec=CODEC, secret=SECRET).serve_in_thread()


def connect(address: str) -> RpcClient:
    return RpcClient(address, timeout=5, codec=CODEC, secret=SECRET)


class Counter:
    def __init__(self, name: str, hang: threading.Event | None = None, leader: str = "") -> None:
        self.name, self.calls, self._hang, self._leader = name, 0, hang, leader

    def bump(self) -> str:
        self.calls += 1
        if self._hang is not None:
            self._hang.wait(5)  # the server dies while the call is in flight
        if self._leader:
            raise NotPrimary(f"{self.name} is a standby", self._leader)
        return self.name


def restart(where: list, old: RpcServer, new: RpcServer) -> None:
    where[0] = new.address
    old.shutdown()


def test_a_call_follows_a_restart_and_is_resent_only_when_it_never_left_or_is_idempotent():
    hang = threading.Event()
    old, new = serve(Counter("old", hang)), serve(Counter("new"))
    where = [old.address]
    client = ResolvingClient(lambda: where[0], connect)
    try:
        threading.Timer(0.3, restart, (where, old, new)).start()  # dies mid-call, listens elsewhere
        with pytest.raises(NodeUnavailable):
            client.bump()  # it may have run: not sent again
        assert old.obj.calls == 1 and new.obj.calls == 0
        assert client.bump() == "new"  # the next call never reaches the dead address: it goes to the new one
        hang.set()
    finally:
        client.disconnect()
        old.shutdown()
        new.shutdown()


def test_an_idempotent_call_is_resent_after_a_lost_reply_and_a_standby_redirects():
    hang = threading.Event()
    old, new = serve(Counter("old", hang)), serve(Counter("new"))
    standby = serve(Counter("standby", leader=new.address))
    where = [old.address]
    client = ResolvingClient(lambda: where[0], connect, idempotent={"bump"})
    other = ResolvingClient(lambda: standby.address, connect)
    try:
        threading.Timer(0.3, restart, (where, old, new)).start()
        assert client.bump() == "new" and old.obj.calls == 1 and new.obj.calls == 1
        assert other.bump() == "new" and standby.obj.calls == 1  # NotPrimary named the leader
        where[0] = new.address
        new.shutdown()
        with pytest.raises(NodeUnavailable):
            client.bump()  # the address did not change: the service is down, the caller decides
    finally:
        hang.set()
        client.disconnect()
        other.disconnect()
        for server in (old, new, standby):
            server.shutdown()


class Relay:
    """A service that fails the way a server fails when *its* own call to another server cannot connect."""

    def __init__(self) -> None:
        self.calls = 0

    def bump(self) -> str:
        self.calls += 1
        raise NodeUnavailable("127.0.0.1:9: cannot connect for 'read': ConnectionRefusedError(111)")


def test_a_server_s_own_connect_failure_is_not_mistaken_for_a_request_that_never_left():
    """The server ran the call (and failed inside it); its NodeUnavailable comes back with the words of a
    connect failure, but only a failure in this process before sending counts as "never sent"."""
    relay, other = serve(Relay()), serve(Counter("other"))
    where = [relay.address]
    client = ResolvingClient(lambda: where[0], connect)
    try:
        fail = relay.obj.bump

        def move_then_fail():
            where[0] = other.address  # the service "moved" while the call ran: a resend would go there
            return fail()

        relay.obj.bump = move_then_fail
        with pytest.raises(NodeUnavailable, match="cannot connect for"):
            client.bump()
        assert relay.obj.calls == 1 and other.obj.calls == 0  # not resent: it had run
    finally:
        client.disconnect()
        relay.shutdown()
        other.shutdown()
