"""``ResolvingClient``: an RPC client for a service whose address changes (a restarted server listens on a
new port; a standby mgmtd takes over from a dead leader).

It calls through an ``RpcClient`` for the address `resolve()` returned last. When a call fails in a way
that says "wrong address", it resolves again and, if the address changed, resends the call there:

  * the connection could not be made (refused, no handshake): the request cannot have reached a server,
    so resending is safe for any call;
  * the server answered ``NotPrimary`` (a standby mgmtd, which did nothing): it names the leader;
  * any other transport failure, for the methods listed `idempotent` only (a reply may have been lost
    after the server acted: only a call that may run twice is sent again).

Otherwise the error reaches the caller as it was. An address that did not change is not retried (the
service is down; the caller decides when to try again).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from storage.threefs.errors import NodeUnavailable, NotPrimary
from storage.threefs.net.transport import RemoteMethods

_MAX_SWITCHES = 3


def never_sent(error: NodeUnavailable) -> bool:
    """Whether a transport failure happened before the request could reach the server (``not_sent``)."""
    return getattr(error, "request_sent", True) is False


class ResolvingClient(RemoteMethods):
    """A proxy like ``RpcClient`` (``client.method(*args)``) that follows its service to a new address.

    Args:
      resolve: returns the service's current address "host:port"; may raise NodeUnavailable (unknown).
      connect: address -> an RpcClient-like object with ``call(method, *args, **kwargs)``, ``disconnect()``
        and ``address``.
      idempotent: methods that are safe to send twice (resent after any transport failure).
    """

    def __init__(self, resolve: Callable[[], str], connect: Callable[[str], Any],
                 idempotent: Iterable[str] = ()) -> None:
        self._resolve = resolve
        self._connect = connect
        self._idempotent = frozenset(idempotent)
        self._lock = threading.Lock()
        self._client: Any = None
        self._retired: list[Any] = []  # clients of old addresses: other threads may still be calling them
        self._closed = False

    @property
    def address(self) -> str:
        return self._current().address

    def call(self, method: str, *args, **kwargs) -> Any:
        """Calls `method` on the service wherever it listens now (see the module docstring)."""
        for switch in range(_MAX_SWITCHES + 1):
            client = self._current()
            try:
                return client.call(method, *args, **kwargs)
            except NotPrimary as exc:
                if switch == _MAX_SWITCHES or not self._switch(client, exc.leader):
                    raise
            except NodeUnavailable as exc:
                if switch == _MAX_SWITCHES or not (method in self._idempotent or never_sent(exc)):
                    raise
                if not self._switch(client, ""):
                    raise
        raise AssertionError("unreachable")

    def _current(self) -> Any:
        with self._lock:
            if self._closed:
                raise ValueError("ResolvingClient is closed")
            if self._client is None:
                self._client = self._connect(self._resolve())
            return self._client

    def _switch(self, failed: Any, hint: str) -> bool:
        """Points at the service's address now (`hint` if given, else resolved); False if it is the one
        that just failed (or none is known)."""
        try:
            address = hint or self._resolve()
        except NodeUnavailable:
            return False
        with self._lock:
            if self._closed or address == failed.address:
                return False
            if self._client is failed:
                self._client = self._connect(address)
                self._retired.append(failed)
            return True

    def disconnect(self) -> None:
        """Closes the connections (not ``close``: that name is the served object's)."""
        with self._lock:
            self._closed = True
            clients, self._client, self._retired = [self._client, *self._retired], None, []
        for client in clients:
            if client is not None:
                client.disconnect()

    def __repr__(self) -> str:
        return f"ResolvingClient({self._client!r})"
