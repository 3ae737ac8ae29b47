"""A wire format for Python values that cannot run code when decoded (unlike pickle).

Frame body (what the transport puts after its 8-byte length)::

    b"3FW1" | u32 big-endian header length H | H bytes: JSON header (ASCII) | segment area

The segment area is the raw bytes of every bytes-like value, concatenated. The header is one JSON
value (the "node" of the encoded value), where a node is one of:

    null, true, false, a number, a string      None, bool, int (|i| < 2**63), float, str
    ["i", "<hex>"]                              any other int
    ["b", offset, length]                       bytes (also bytearray, memoryview): the segment area's
                                                bytes [offset, offset + length)
    ["l", node, ...] / ["t", node, ...]         list / tuple
    ["s", node, ...] / ["f", node, ...]         set / frozenset
    ["d", key, value, key, value, ...]          dict (keys are nodes too, so any encodable key type)
    ["o", "<type name>", {"field": node, ...}]  registered dataclass or NamedTuple, built as cls(**fields)
    ["e", "<type name>", node]                  registered Enum member, built as cls(value)
    ["x", "<type name>", [node, ...], {...}]    exception, built as cls(*args); the object may hold
                                                "errno", "strerror", "filename", "filename2" (OSError
                                                attributes) and "notes" (a list of str: __notes__)

A type name is ``f"{cls.__module__}.{cls.__qualname__}"`` and is only ever looked up in the ``Codec``'s
registry: an unknown name is an error, nothing is imported. Exceptions of a type not in the registry
(or whose args cannot be encoded) travel as RuntimeError("<qualname>: <message>").

Every malformed input (bad magic, truncation, bad JSON, a reference outside the segment area, wrong
JSON types, an unknown tag or type name, nesting deeper than MAX_DEPTH, a constructor refusing the
fields) raises ``WireFormatError``; so does encoding a value of an unsupported type.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import os
import struct
from typing import Any, Iterable

MAGIC = b"3FW1"
MAX_DEPTH = 64
MAX_HEADER = 64 << 20
_PREFIX = struct.Struct(">4sI")
_SMALL_INT = 1 << 63
_COALESCE = 1 << 16  # segments shorter than this are copied next to the header (one part, not many)
_OSERROR_FIELDS = ("errno", "strerror", "filename", "filename2")

BUILTIN_ERRORS: tuple[type[BaseException], ...] = (
    OSError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
    TimeoutError, ConnectionError, ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError,
    BrokenPipeError, InterruptedError, BlockingIOError, ValueError, TypeError, KeyError, IndexError,
    AttributeError, RuntimeError, NotImplementedError, AssertionError, io.UnsupportedOperation)


class WireFormatError(ValueError):
    """A frame is not valid in this format, or a value cannot be encoded in it."""


def wire_name(cls: type) -> str:
    """The name ``cls`` has on the wire."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _field_names(cls: type) -> tuple[str, ...]:
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)
    return tuple(cls._fields)  # a NamedTuple


class Codec:
    """Encodes and decodes values of the builtin kinds and of the registered ``types``.

    types: frozen dataclasses, ``typing.NamedTuple`` classes, ``enum.Enum`` subclasses and exception
    classes (the exceptions in ``BUILTIN_ERRORS`` are always allowed). Two types with one wire name,
    or a type of another kind, are refused with ``ValueError``/``TypeError``.
    """

    def __init__(self, types: Iterable[type] = ()) -> None:
        self._by_name: dict[str, type] = {}
        for cls in (*BUILTIN_ERRORS, *types):
            record = dataclasses.is_dataclass(cls) or (issubclass(cls, tuple) and hasattr(cls, "_fields"))
            if not (record or issubclass(cls, (enum.Enum, BaseException))):
                raise TypeError(f"{cls!r}: only dataclasses, NamedTuples, Enums and exceptions can be registered")
            name = wire_name(cls)
            if self._by_name.get(name, cls) is not cls:
                raise ValueError(f"two types have the wire name {name!r}: {self._by_name[name]!r} and {cls!r}")
            self._by_name[name] = cls

    def encode(self, value: Any) -> list[bytes | bytearray | memoryview]:
        """The frame body for ``value`` as parts to send in order; large bytes values are not copied."""
        encoder = _Encoder(self._by_name)
        header = json.dumps(encoder.node(value, 0), separators=(",", ":"), ensure_ascii=True).encode("ascii")
        if len(header) > MAX_HEADER:
            raise WireFormatError(f"header of {len(header)} bytes exceeds {MAX_HEADER}")
        parts: list[bytes | bytearray | memoryview] = [bytearray(_PREFIX.pack(MAGIC, len(header)) + header)]
        for segment in encoder.segments:  # only our own buffers are bytearrays: values are bytes/memoryview
            if len(segment) >= _COALESCE:
                parts.append(segment)
            elif isinstance(parts[-1], bytearray):
                parts[-1] += segment
            else:
                parts.append(bytearray(segment))
        return parts

    def decode(self, buffer: bytes | bytearray | memoryview) -> Any:
        """The value encoded in the frame body ``buffer``; ``WireFormatError`` if it is malformed."""
        view = memoryview(buffer).cast("B")
        header_length = self.header_length(view)
        if header_length > len(view) - _PREFIX.size:
            raise WireFormatError(f"header length {header_length} exceeds the frame")
        end = _PREFIX.size + header_length
        return self.decode_split(view[:end], view[end:])

    @staticmethod
    def header_length(prefix: bytes | bytearray | memoryview) -> int:
        """The header length H a frame body announces in its first ``PREFIX_SIZE`` bytes (checked against
        the magic and ``MAX_HEADER``), so a reader can receive the header and the segment area apart."""
        if len(prefix) < _PREFIX.size:
            raise WireFormatError(f"frame of {len(prefix)} bytes is shorter than its {_PREFIX.size}-byte prefix")
        magic, header_length = _PREFIX.unpack_from(prefix)
        if magic != MAGIC:
            raise WireFormatError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
        if header_length > MAX_HEADER:
            raise WireFormatError(f"header length {header_length} exceeds the limit {MAX_HEADER}")
        return header_length

    def decode_split(self, head: bytes | bytearray | memoryview, segments: bytes | bytearray | memoryview, *,
                     segment_views: bool = False) -> Any:
        """``decode`` of a frame body received in two pieces: ``head`` (the prefix and the whole header)
        and ``segments`` (the segment area). segment_views: bytes values come back as read-only
        memoryviews of ``segments`` (no copy) instead of bytes."""
        area = memoryview(segments).cast("B")
        return self.build(self.parse_head(head), area.toreadonly() if segment_views else area, views=segment_views)

    def parse_head(self, head: bytes | bytearray | memoryview) -> Any:
        """The JSON tree of a frame's ``head`` (prefix and whole header), checked against the prefix, not
        yet validated as a value: ``build`` does that (a reader may look at the tree first, e.g. a
        request's method name, to choose how to build it)."""
        head = memoryview(head).cast("B")
        header_length = self.header_length(head)
        if header_length != len(head) - _PREFIX.size:
            raise WireFormatError(f"header length {header_length} does not match the {len(head)}-byte head")
        try:
            return json.loads(bytes(head[_PREFIX.size:]).decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise WireFormatError(f"header is not valid JSON: {exc}") from exc

    def build(self, tree: Any, segments: bytes | bytearray | memoryview, *, views: bool = False) -> Any:
        """The value of a parsed header ``tree`` (``parse_head``) over the segment area ``segments``, every
        node checked. views: bytes values are memoryviews of ``segments`` as given (writable if it is:
        pass ``toreadonly()`` for read-only ones) instead of bytes copies."""
        return _Decoder(self._by_name, memoryview(segments).cast("B"), views).value(tree, 0)


PREFIX_SIZE = _PREFIX.size


class _Encoder:
    """One value's encoding: ``node`` returns its JSON tree and appends bytes values to ``segments``."""

    def __init__(self, registry: dict[str, type]) -> None:
        self.registry = registry
        self.segments: list[bytes | memoryview] = []
        self.offset = 0

    def node(self, value: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise WireFormatError(f"value nested deeper than {MAX_DEPTH}")
        kind, inner = type(value), depth + 1
        if value is None or kind in (bool, str, float):
            return value
        if kind is int:
            return value if -_SMALL_INT < value < _SMALL_INT else ["i", format(value, "x")]
        if kind in (bytes, bytearray, memoryview):
            segment = value if kind is bytes else memoryview(value).cast("B")
            self.segments.append(segment)
            self.offset += len(segment)
            return ["b", self.offset - len(segment), len(segment)]
        if kind in (list, tuple, set, frozenset):
            tag = {list: "l", tuple: "t", set: "s", frozenset: "f"}[kind]
            return [tag, *(self.node(item, inner) for item in value)]
        if kind is dict:
            return ["d", *(n for k, v in value.items() for n in (self.node(k, inner), self.node(v, inner)))]
        if isinstance(value, BaseException):
            return self.error(value, inner)
        name = wire_name(kind)
        if self.registry.get(name) is not kind:
            raise WireFormatError(f"cannot encode {kind.__qualname__}: type {name!r} is not registered")
        if issubclass(kind, enum.Enum):
            return ["e", name, self.node(value.value, inner)]
        return ["o", name, {field: self.node(getattr(value, field), inner) for field in _field_names(kind)}]

    def error(self, exc: BaseException, depth: int) -> list:
        """An exception's node: its own type if registered, its args encode and ``type(exc)(*exc.args)``
        works (as the decoder will call it), else a RuntimeError naming the type."""
        kind, saved = type(exc), (len(self.segments), self.offset)
        extra: dict[str, Any] = {"notes": list(getattr(exc, "__notes__", []))}
        try:
            if self.registry.get(wire_name(kind)) is not kind:
                raise WireFormatError(f"exception type {wire_name(kind)} is not registered")
            _build(exc.args, lambda args: kind(*args), exc)
            if isinstance(exc, OSError):
                extra.update((field, _plain(getattr(exc, field))) for field in _OSERROR_FIELDS
                             if getattr(exc, field) is not None)  # a None filename2 would show in str()
            return ["x", wire_name(kind), [self.node(arg, depth) for arg in exc.args],
                    {key: self.node(item, depth) for key, item in extra.items()}]
        except WireFormatError:
            del self.segments[saved[0]:]
            self.offset = saved[1]
            fallback = RuntimeError(f"{kind.__qualname__}: {exc}")
            return ["x", wire_name(RuntimeError), [fallback.args[0]], {"notes": self.node(extra["notes"], depth)}]


class _Decoder:
    """Rebuilds a value from a JSON tree, checking every node; bytes come from ``segments``."""

    def __init__(self, registry: dict[str, type], segments: memoryview, views: bool = False) -> None:
        self.registry = registry
        self.segments = segments
        self.views = views

    def value(self, node: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise WireFormatError(f"value nested deeper than {MAX_DEPTH}")
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if not isinstance(node, list) or not node or not isinstance(node[0], str):
            raise WireFormatError(f"expected a JSON scalar or a list starting with a tag string, got {_clip(node)}")
        tag, rest, inner = node[0], node[1:], depth + 1
        if tag in ("l", "t", "s", "f"):
            items = [self.value(item, inner) for item in rest]
            return _build(items, {"l": list, "t": tuple, "s": set, "f": frozenset}[tag], node)
        if tag == "d":
            if len(rest) % 2:
                raise WireFormatError(f"dict node has an odd number of items: {_clip(node)}")
            pairs = [(self.value(k, inner), self.value(v, inner)) for k, v in zip(rest[::2], rest[1::2])]
            return _build(pairs, dict, node)
        if tag == "i" and len(rest) == 1 and isinstance(rest[0], str):
            return _build(rest[0], lambda text: int(text, 16), node)
        if tag == "b" and len(rest) == 2 and all(type(n) is int for n in rest):
            offset, length = rest
            if offset < 0 or length < 0 or offset + length > len(self.segments):
                raise WireFormatError(f"bytes [{offset}, {offset + length}) outside the {len(self.segments)}-byte"
                                      " segment area")
            piece = self.segments[offset:offset + length]
            return piece if self.views else bytes(piece)
        if tag in ("o", "e", "x") and rest and isinstance(rest[0], str):
            return self.registered(tag, self.type_named(rest[0]), rest[1:], inner, node)
        raise WireFormatError(f"unknown or malformed node: {_clip(node)}")

    def type_named(self, name: str) -> type:
        cls = self.registry.get(name)
        if cls is None:
            raise WireFormatError(f"type {name!r} is not registered")
        return cls

    def registered(self, tag: str, cls: type, rest: list, depth: int, node: list) -> Any:
        if tag == "e" and len(rest) == 1 and issubclass(cls, enum.Enum):
            return _build(self.value(rest[0], depth), cls, node)
        if tag == "x" and len(rest) == 2 and isinstance(rest[0], list) and isinstance(rest[1], dict) \
                and issubclass(cls, BaseException):
            exc = _build([self.value(arg, depth) for arg in rest[0]], lambda args: cls(*args), node)
            if not set(rest[1]) <= {"notes", *_OSERROR_FIELDS}:
                raise WireFormatError(f"unknown exception attributes in {_clip(node)}")
            extra = {key: self.value(item, depth) for key, item in rest[1].items()}
            notes = extra.pop("notes", [])
            if not (isinstance(notes, list) and all(isinstance(note, str) for note in notes)):
                raise WireFormatError(f"exception notes must be a list of str: {_clip(node)}")
            if notes:
                exc.__notes__ = notes
            for field in _OSERROR_FIELDS if isinstance(exc, OSError) else ():
                if field in extra:
                    setattr(exc, field, extra[field])
            return exc
        if tag == "o" and len(rest) == 1 and isinstance(rest[0], dict) and not issubclass(
                cls, (enum.Enum, BaseException)):
            expected, got = set(_field_names(cls)), set(rest[0])
            if got != expected:
                raise WireFormatError(f"{cls.__qualname__} fields: unknown {sorted(got - expected)}, "
                                      f"missing {sorted(expected - got)}")
            fields = {key: self.value(item, depth) for key, item in rest[0].items()}
            return _build(fields, lambda kwargs: cls(**kwargs), node)
        raise WireFormatError(f"malformed {cls.__qualname__} node: {_clip(node)}")


def _plain(value: Any) -> Any:
    """An OSError attribute as it can travel: a path object becomes its str or bytes."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _build(argument: Any, constructor: Any, node: Any) -> Any:
    """``constructor(argument)``, any failure (unhashable key, refused field, bad value) a WireFormatError."""
    try:
        return constructor(argument)
    except Exception as exc:  # noqa: BLE001 - whatever the constructor raises, the frame was malformed
        raise WireFormatError(f"cannot build {_clip(node)}: {exc!r}") from exc


def _clip(node: Any, limit: int = 120) -> str:
    text = repr(node)
    return text if len(text) <= limit else text[:limit] + "..."
