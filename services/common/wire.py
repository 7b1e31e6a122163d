"""Protobuf wire format helpers for passing serialized messages on without re-encoding.

A message field is encoded as ``tag | length | bytes``, fields may come in any order, and
a parser merges repeated occurrences, so a request can be assembled from its own small
serialization plus the bytes of a sub-message received from elsewhere (the gateway
forwards the profile it got from the profile service this way: parsed once for its own
use, never copied into or serialized again with each downstream request).
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor

WIRETYPE_VARINT = 0
WIRETYPE_FIXED64 = 1
WIRETYPE_LENGTH_DELIMITED = 2
WIRETYPE_FIXED32 = 5


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf varint."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("truncated or overlong varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def field_tag(descriptor: Descriptor, name: str) -> bytes:
    """The tag of a length-delimited (message, string, bytes) field of a message type."""
    number = descriptor.fields_by_name[name].number
    return varint(number << 3 | WIRETYPE_LENGTH_DELIMITED)


def length_delimited(tag: bytes, payload: bytes) -> bytes:
    """One length-delimited field: ``tag | len(payload) | payload``."""
    return tag + varint(len(payload)) + payload


def field_payload(data: bytes, number: int) -> bytes | None:
    """The payload of the length-delimited field ``number`` at the top level of the
    message ``data``; None when absent. For a message field that occurs several times
    (protobuf merges the occurrences) the payloads are concatenated, which parses to the
    same merged message."""
    pos, parts = 0, []
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        wire_type, n = key & 7, key >> 3
        if wire_type == WIRETYPE_VARINT:
            _, pos = _read_varint(data, pos)
        elif wire_type == WIRETYPE_FIXED64:
            pos += 8
        elif wire_type == WIRETYPE_FIXED32:
            pos += 4
        elif wire_type == WIRETYPE_LENGTH_DELIMITED:
            size, pos = _read_varint(data, pos)
            if n == number:
                parts.append(data[pos : pos + size])
            pos += size
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        if pos > len(data):
            raise WireError("truncated field")
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else b"".join(parts)
