"""Per-cluster shared secret and the mutual HMAC challenge-response run on every new connection.

The secret is 32 random bytes in ``<cluster root>/secret`` (mode 0600): any process that can read the
cluster root may join the cluster; other local users may not. The handshake (before any RPC frame)::

    server -> client   b"3FA2" + server_nonce (32 random bytes)
    client -> server   HMAC-SHA256(secret, b"client" + server_nonce) + client_nonce (32 random bytes)
    server -> client   HMAC-SHA256(secret, b"server" + client_nonce)      (only if the client's MAC matched)

Each side checks the other's MAC with ``hmac.compare_digest``; a wrong MAC, wrong magic, EOF or a peer
silent past the deadline (the whole handshake, not each read) raises ``AuthenticationError``. Its subclass
``PeerUnresponsive`` says the peer never took part: it closed before its first message or the deadline
passed, so it may be down or hung rather than holding another secret (a client's transport reports that
as an unavailable node, which callers retry; a refused secret is not worth retrying). The handshake
authenticates the peers; it does not encrypt or sign the frames that follow.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import stat
import time
from pathlib import Path

SECRET_BYTES = 32
NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size
HANDSHAKE_MAGIC = b"3FA2"  # 2: frames carry request ids (several requests in flight per connection)
DEFAULT_TIMEOUT = 5.0


class AuthenticationError(ConnectionError):
    """The peer did not prove it holds the cluster's secret (or did not answer in time)."""


class PeerUnresponsive(AuthenticationError):
    """The peer sent nothing of the handshake before closing, or did not finish it by the deadline."""


def load_or_create_secret(root: Path) -> bytes:
    """The cluster's secret in ``root / "secret"``, created (32 random bytes, mode 0600) if absent.

    Creation is atomic: the bytes are written to a private temporary file which is then linked into
    place, so a concurrent reader sees no file or a whole one. A secret file of another length, or
    readable or writable by group or others, is refused with ``ValueError``.
    """
    path = Path(root) / "secret"
    if not path.exists():
        temporary = path.with_name(f".secret.{os.getpid()}.{secrets.token_hex(8)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(secrets.token_bytes(SECRET_BYTES))
                file.flush()
                os.fsync(file.fileno())
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        finally:
            temporary.unlink(missing_ok=True)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077:
        raise ValueError(f"{path}: the cluster secret must be a regular file with mode 0600 "
                         f"(it has mode {stat.filemode(info.st_mode)})")
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"{path}: the cluster secret must be {SECRET_BYTES} bytes, not {len(secret)}")
    return secret


def _mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int, deadline: float, what: str, first: bool = False) -> bytes:
    """n bytes from ``sock`` before ``deadline`` (monotonic): PeerUnresponsive when late, or on EOF before
    any byte of the peer's ``first`` message; AuthenticationError on any other EOF."""
    data = bytearray()
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerUnresponsive(f"handshake: timed out waiting for the {what}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(data))
        except TimeoutError as exc:
            raise PeerUnresponsive(f"handshake: timed out waiting for the {what}") from exc
        if not chunk:
            error = PeerUnresponsive if first and not data else AuthenticationError
            raise error(f"handshake: connection closed after {len(data)} of {n} bytes of the {what}")
        data += chunk
    return bytes(data)


def _send(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(max(deadline - time.monotonic(), 1e-3))
    try:
        sock.sendall(data)
    except TimeoutError as exc:
        raise PeerUnresponsive("handshake: timed out sending") from exc
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise PeerUnresponsive(f"handshake: the peer closed the connection ({exc})") from exc


def server_handshake(sock: socket.socket, secret: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Checks that the connecting client knows ``secret``, then proves the same to it.

    AuthenticationError if the client's proof is wrong, missing or late; the socket's timeout is restored.
    """
    deadline, previous_timeout = time.monotonic() + timeout, sock.gettimeout()
    try:
        server_nonce = secrets.token_bytes(NONCE_BYTES)
        _send(sock, HANDSHAKE_MAGIC + server_nonce, deadline)
        answer = _recv_exact(sock, MAC_BYTES + NONCE_BYTES, deadline, "client's proof", first=True)
        if not hmac.compare_digest(answer[:MAC_BYTES], _mac(secret, b"client", server_nonce)):
            raise AuthenticationError("handshake: the client's proof does not match the cluster secret")
        _send(sock, _mac(secret, b"server", answer[MAC_BYTES:]), deadline)
    finally:
        sock.settimeout(previous_timeout)


def client_handshake(sock: socket.socket, secret: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Proves to the server that this client knows ``secret``, then checks the server's proof.

    AuthenticationError if the server's challenge or proof is wrong, missing or late (a server that
    rejects our proof closes the connection: EOF before its proof); the socket's timeout is restored.
    """
    deadline, previous_timeout = time.monotonic() + timeout, sock.gettimeout()
    try:
        challenge = _recv_exact(sock, len(HANDSHAKE_MAGIC) + NONCE_BYTES, deadline, "server's challenge", first=True)
        magic, server_nonce = challenge[:len(HANDSHAKE_MAGIC)], challenge[len(HANDSHAKE_MAGIC):]
        if magic != HANDSHAKE_MAGIC:
            raise AuthenticationError(f"handshake: bad magic {magic!r} (expected {HANDSHAKE_MAGIC!r}): "
                                      "not a 3FS server of this version")
        client_nonce = secrets.token_bytes(NONCE_BYTES)
        _send(sock, _mac(secret, b"client", server_nonce) + client_nonce, deadline)
        answer = _recv_exact(sock, MAC_BYTES, deadline, "server's proof (EOF: it refused our secret)")
        if not hmac.compare_digest(answer, _mac(secret, b"server", client_nonce)):
            raise AuthenticationError("handshake: the server's proof does not match the cluster secret")
    finally:
        sock.settimeout(previous_timeout)
