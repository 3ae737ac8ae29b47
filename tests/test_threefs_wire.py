"""The 3FS wire format (net/codec.py) and the cluster-secret handshake (net/auth.py)."""

from __future__ import annotations

import dataclasses
import enum
import io
import os
import random
import socket
import stat
import threading
import time
from typing import NamedTuple

import pytest

from storage.threefs.net.auth import (HANDSHAKE_MAGIC, AuthenticationError, PeerUnresponsive, client_handshake,
                                      load_or_create_secret, server_handshake)
from storage.threefs.net.codec import MAX_DEPTH, Codec, WireFormatError, wire_name


class Color(enum.Enum):
    RED = 1
    BLUE = "blue"


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float
    label: str | None = None


@dataclasses.dataclass(frozen=True)
class Shape:
    points: tuple[Point, ...]
    color: Color
    by_id: dict[int, Point]


class Span(NamedTuple):
    start: int
    length: int
    data: bytes = b""


class ChunkDiverged(RuntimeError):
    def __init__(self, message, committed_version=0):
        super().__init__(message, committed_version)
        self.committed_version = committed_version


class Unregistered(Exception):
    pass


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):  # args == (a,): cls(*args) fails, so it cannot travel as itself
        super().__init__(a)
        self.b = b


CODEC = Codec([Color, Point, Shape, Span, ChunkDiverged, NeedsTwoArgs])


def round_trip(value, codec: Codec = CODEC):
    return codec.decode(b"".join(bytes(part) for part in codec.encode(value)))


# ---- codec: round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    None, True, False, 0, -1, 2**63 - 1, 2**63, -2**63, -(2**200), 10**5000, 1.5, -0.0, float("inf"),
    "", "héllo \ud800 \x00", b"", b"\x00\xff" * 10, [], [1, [2, [3]]], (), (1, "a", (None,)),
    {}, {1: "a", "b": 2, (1, 2): [3], None: None, b"k": 1.0, frozenset({1}): 0}, {1, "x", (2,)},
    frozenset({b"a", 2}), [b"one", b"two" * 100_000, b"three"],
], ids=lambda value: type(value).__name__)
def test_builtin_values_round_trip_with_their_types(value):
    decoded = round_trip(value)
    assert decoded == value and type(decoded) is type(value)
    if isinstance(value, dict):
        assert [type(k) for k in decoded] == [type(k) for k in value]


def test_nan_round_trips():
    assert round_trip(float("nan")) != round_trip(float("nan"))


def test_bytearray_and_memoryview_decode_as_bytes():
    assert round_trip([bytearray(b"ab"), memoryview(b"cd"), memoryview(bytearray(range(8))).cast("I")]) == [
        b"ab", b"cd", bytes(range(8))]


def test_registered_records_and_enums_round_trip():
    shape = Shape(points=(Point(1, 2.0), Point(3, 4.5, "p")), color=Color.BLUE, by_id={7: Point(0, 0.0)})
    value = {Color.RED: [shape, Span(1, 2, b"xyz")], Point(1, 1.0): Span(5, 6)}
    decoded = round_trip(value)
    assert decoded == value
    assert type(decoded[Color.RED][1]) is Span and decoded[Color.RED][0].color is Color.BLUE


def test_exceptions_round_trip_with_type_args_oserror_fields_and_notes():
    missing = FileNotFoundError(2, "No such file", "/a/b")
    missing.add_note("while opening")
    decoded = round_trip(missing)
    assert type(decoded) is FileNotFoundError and str(decoded) == str(missing)
    assert (decoded.errno, decoded.strerror, decoded.filename, decoded.__notes__) == (
        2, "No such file", "/a/b", ["while opening"])
    diverged = round_trip(ChunkDiverged("stale", 7))
    assert type(diverged) is ChunkDiverged and diverged.committed_version == 7 and diverged.args == ("stale", 7)
    for exc in (KeyError("k"), ValueError("v", 1), io.UnsupportedOperation("no"), TimeoutError(),
                ConnectionResetError(104, "reset"), NotImplementedError("later")):
        decoded = round_trip(exc)
        assert type(decoded) is type(exc) and decoded.args == exc.args


def test_unencodable_exceptions_travel_as_runtime_errors():
    unregistered = Unregistered("boom")
    unregistered.add_note("note")
    decoded = round_trip(unregistered)
    assert type(decoded) is RuntimeError and str(decoded) == "Unregistered: boom"
    assert decoded.__notes__ == ["note"]
    bad_args = round_trip(ValueError("x", object(), b"y" * 100_000))
    assert type(bad_args) is RuntimeError and str(bad_args).startswith("ValueError: ")
    not_rebuildable = round_trip(NeedsTwoArgs("first", "second"))
    assert type(not_rebuildable) is RuntimeError and str(not_rebuildable) == "NeedsTwoArgs: first"


def test_unregistered_types_are_refused_on_encode():
    with pytest.raises(WireFormatError, match="not registered"):
        Codec().encode(Point(1, 2.0))
    with pytest.raises(WireFormatError, match="not registered"):
        CODEC.encode([object()])


def test_large_bytes_are_not_copied_into_the_header():
    payload = os.urandom(1 << 20)
    parts = CODEC.encode({"data": payload, "n": 1})
    assert any(part is payload or (isinstance(part, memoryview) and part.obj is payload) for part in parts)
    assert sum(len(part) for part in parts) < len(payload) + 200
    buffer = bytearray(1 << 20)
    assert any(isinstance(part, memoryview) and part.obj is buffer for part in CODEC.encode([buffer]))


def test_registry_refuses_duplicate_names_and_unsupported_kinds():
    def make_point():
        @dataclasses.dataclass(frozen=True)
        class Point:
            z: int
        return Point

    first, second = make_point(), make_point()
    assert wire_name(first) == wire_name(second)
    with pytest.raises(ValueError, match="wire name"):
        Codec([first, second])
    with pytest.raises(TypeError):
        Codec([dict])


# ---- codec: hostile input ----------------------------------------------------------------------------

def frame(header: bytes, segments: bytes = b"") -> bytes:
    return b"3FW1" + len(header).to_bytes(4, "big") + header + segments


@pytest.mark.parametrize("buffer, message", [
    (b"", "shorter"),
    (b"3FW2\x00\x00\x00\x01" + b"1", "magic"),
    (b"3FW1\x00\x00\x00\x10" + b"1", "header length"),
    (frame(b"[1,"), "JSON"),
    (frame(b"\xff"), "JSON"),
    (frame(b"{}"), "tag string"),
    (frame(b'["l",{"0":1}]'), "tag string"),
    (frame(b'["zz",1]'), "unknown"),
    (frame(b'["b",0,5]', b"abc"), "outside"),
    (frame(b'["b",-1,1]', b"abc"), "outside"),
    (frame(b'["b",true,1]', b"abc"), "malformed"),
    (frame(b'["d",1]'), "odd"),
    (frame(b'["d",["l"],1]'), "cannot build"),
    (frame(b'["s",["l"]]'), "cannot build"),
    (frame(b'["i","zz"]'), "cannot build"),
    (frame(b'["o","os.system",{}]'), "not registered"),
    (frame(b'["x","builtins.SystemExit",[],{}]'), "not registered"),
    (frame(f'["o","{wire_name(Point)}",{{"x":1,"y":2.0,"label":null,"evil":1}}]'.encode()), "unknown \\['evil'\\]"),
    (frame(f'["o","{wire_name(Point)}",{{"x":1}}]'.encode()), "missing \\['label', 'y'\\]"),
    (frame(f'["e","{wire_name(Color)}",3]'.encode()), "cannot build"),
    (frame(f'["o","{wire_name(Color)}",{{}}]'.encode()), "malformed"),
    (frame(b'["x","builtins.ValueError",[],{"notes":["l",1]}]'), "notes"),
    (frame(b'[1,2]'), "tag string"),
    (frame(b'["x","builtins.ValueError",[],{"__class__":1}]'), "unknown exception attributes"),
    (frame(b'["l",' * (MAX_DEPTH + 2) + b'1' + b']' * (MAX_DEPTH + 2)), "deeper"),
    (frame(b'[' * 100_000 + b']' * 100_000), "JSON"),
    (frame(b"1" * 5000), "JSON"),
])
def test_malformed_frames_raise_wire_format_error_saying_why(buffer, message):
    with pytest.raises(WireFormatError, match=message):
        CODEC.decode(buffer)


def test_encoding_too_deep_a_value_is_refused():
    value: list = []
    for _ in range(MAX_DEPTH + 5):
        value = [value]
    with pytest.raises(WireFormatError, match="deeper"):
        CODEC.encode(value)


def test_fuzzed_frames_decode_or_raise_wire_format_error_only():
    rng = random.Random(3)
    samples = [
        {1: [b"abc", 2.5, None], "s": {1, 2}, (1,): frozenset({"x"})},
        Shape(points=(Point(1, 2.0, "a"),), color=Color.RED, by_id={3: Point(4, 5.0)}),
        [Span(1, 2, b"data" * 30), Color.BLUE, ChunkDiverged("x", 3), FileNotFoundError(2, "no", "/f")],
        [10**30, -5, True, "text", (b"", bytearray(b"q"))],
    ]
    frames = [b"".join(bytes(part) for part in CODEC.encode(sample)) for sample in samples]
    cases: list[bytes] = [rng.randbytes(rng.randrange(0, 64)) for _ in range(500)]
    cases += [b"3FW1" + rng.randbytes(rng.randrange(0, 64)) for _ in range(500)]
    for data in frames:
        cases += [data[:cut] for cut in range(len(data))]
        for _ in range(600):
            flipped = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            cases.append(bytes(flipped))
        for _ in range(300):  # JSON-ish edits keep the header parseable more often than bit flips do
            changed, at = bytearray(data), rng.randrange(8, len(data))
            if rng.random() < 0.5:
                changed[at] = rng.choice(b'[]{},:"0123456789-lbtsfdioex')
            else:
                changed[at:at] = rng.choice([b'["l",', b"]", b",", b'"x"', b"null", b'{"a":1},', b"1e999,", b"-0,"])
            cases.append(bytes(changed))
    assert len(cases) > 4000
    decoded = 0
    for case in cases:
        try:
            CODEC.decode(case)
            decoded += 1
        except WireFormatError:
            pass
    assert 0 < decoded < len(cases)


# ---- auth: the cluster secret ------------------------------------------------------------------------

def test_secret_is_created_once_with_mode_0600(tmp_path):
    secret = load_or_create_secret(tmp_path)
    path = tmp_path / "secret"
    assert len(secret) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(tmp_path) == secret
    assert load_or_create_secret(tmp_path / ".") == secret
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]  # no temporary file left behind
    other_cluster = tmp_path / "other"
    other_cluster.mkdir()
    assert load_or_create_secret(other_cluster) != secret


def test_concurrent_creators_agree_on_one_secret(tmp_path):
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(load_or_create_secret(tmp_path))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len(set(results)) == 1


@pytest.mark.parametrize("content, mode, message", [
    (b"x" * 31, 0o600, "32 bytes"),
    (b"x" * 33, 0o600, "32 bytes"),
    (b"x" * 32, 0o640, "mode 0600"),
    (b"x" * 32, 0o604, "mode 0600"),
])
def test_bad_secret_files_are_refused_naming_the_path(tmp_path, content, mode, message):
    path = tmp_path / "secret"
    path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(ValueError, match=message) as info:
        load_or_create_secret(tmp_path)
    assert str(path) in str(info.value)


# ---- auth: the handshake -----------------------------------------------------------------------------

def handshake(server_secret: bytes, client_secret: bytes, timeout: float = 2.0):
    """Runs both sides over a socketpair; returns (server outcome, client outcome): None or the exception."""
    server_sock, client_sock = socket.socketpair()
    outcomes: dict[str, BaseException | None] = {}

    def side(name, function, sock, secret):
        try:
            function(sock, secret, timeout)
            outcomes[name] = None
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcomes[name] = exc
        finally:
            if name == "server" and outcomes[name] is not None:
                sock.close()  # as the transport does: a refused client sees EOF

    threads = [threading.Thread(target=side, args=("server", server_handshake, server_sock, server_secret)),
               threading.Thread(target=side, args=("client", client_handshake, client_sock, client_secret))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    server_sock.close()
    client_sock.close()
    return outcomes["server"], outcomes["client"]


def test_handshake_succeeds_with_the_same_secret_and_restores_the_timeout():
    secret = os.urandom(32)
    assert handshake(secret, secret) == (None, None)
    left, right = socket.socketpair()
    with left, right:
        left.settimeout(None)
        thread = threading.Thread(target=server_handshake, args=(left, secret))
        thread.start()
        client_handshake(right, secret)
        thread.join()
        assert left.gettimeout() is None


def test_handshake_fails_on_both_sides_with_a_wrong_secret():
    server_error, client_error = handshake(os.urandom(32), os.urandom(32))
    assert isinstance(server_error, AuthenticationError) and "client's proof" in str(server_error)
    assert isinstance(client_error, AuthenticationError) and isinstance(client_error, ConnectionError)
    assert not isinstance(client_error, PeerUnresponsive)  # the server spoke, then refused: not a dead node


def test_client_refuses_a_server_that_cannot_prove_the_secret():
    secret = os.urandom(32)
    left, right = socket.socketpair()
    with left, right:
        left.sendall(HANDSHAKE_MAGIC + os.urandom(32))  # a server that has no secret: it answers garbage
        thread = threading.Thread(target=lambda: (left.recv(64), left.sendall(os.urandom(32))))
        thread.start()
        with pytest.raises(AuthenticationError, match="server's proof does not match"):
            client_handshake(right, secret, 2.0)
        thread.join()


def test_handshake_refuses_garbage_and_eof():
    secret = os.urandom(32)
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"HTTP/1.1 200 OK\r\n" + b"x" * 64)
        with pytest.raises(AuthenticationError, match="bad magic"):
            client_handshake(right, secret, 2.0)
    left, right = socket.socketpair()
    with left, right:
        right.sendall(os.urandom(64))  # garbage in place of a proof
        with pytest.raises(AuthenticationError, match="client's proof does not match"):
            server_handshake(left, secret, 2.0)
    left, right = socket.socketpair()
    with left, right:
        right.sendall(b"short")
        right.shutdown(socket.SHUT_WR)
        with pytest.raises(AuthenticationError, match="closed after 5 of 64"):
            server_handshake(left, secret, 2.0)


def test_a_peer_that_closes_before_its_first_message_is_unresponsive():
    for handshake_side in (server_handshake, client_handshake):
        left, right = socket.socketpair()
        with left, right:
            right.close()
            with pytest.raises(PeerUnresponsive, match="closed"):
                handshake_side(left, os.urandom(32), 2.0)


def test_a_silent_or_trickling_peer_times_out_quickly():
    secret = os.urandom(32)
    left, right = socket.socketpair()
    with left, right:
        started = time.monotonic()
        with pytest.raises(PeerUnresponsive, match="timed out"):
            server_handshake(left, secret, 0.2)
        right.recv(64)  # the challenge the server sent
        with pytest.raises(PeerUnresponsive, match="timed out"):
            client_handshake(right, secret, 0.2)
        assert time.monotonic() - started < 2
    left, right = socket.socketpair()
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.05):
            right.sendall(b"x")

    with left, right:
        thread = threading.Thread(target=trickle)
        thread.start()
        started = time.monotonic()
        with pytest.raises(AuthenticationError, match="timed out"):
            server_handshake(left, secret, 0.3)  # the deadline covers the whole handshake, not each read
        stop.set()
        thread.join()
        assert time.monotonic() - started < 1
