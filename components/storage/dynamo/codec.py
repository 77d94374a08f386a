"""Items ⇄ sealed records: attribute values, the order-preserving float encoding, digests and record limits.

A record item without a ``grp`` attribute (layout version 1, before device groups) is of group 0.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

from components.core.errors import StorageUnavailable
from components.storage.interface import EVERY_GROUP, SealedBatch

MAX_BODY_BYTES = 350 * 1024
"""Largest sealed body of one item: DynamoDB's 400 KB item limit less room for keys and index fields."""
MAX_GROUP = 65535

_SIGN, _MASK = 1 << 63, (1 << 64) - 1

Item = dict[str, Any]


def encode_float(x: float) -> str:
    """16 hex digits whose string order is the floats' order; :func:`decode_float` gives back the same bits."""
    bits: int = struct.unpack(">Q", struct.pack(">d", x))[0]
    bits = (~bits & _MASK) if bits & _SIGN else (bits | _SIGN)
    return f"{bits:016x}"


def decode_float(s: str) -> float:
    """Inverse of :func:`encode_float` (reads the first 16 characters, so a sort key can be passed whole)."""
    bits = int(s[:16], 16)
    bits = (bits & ~_SIGN) if bits & _SIGN else (~bits & _MASK)
    value: float = struct.unpack(">d", struct.pack(">Q", bits))[0]
    return value


def digest(key_id: str, body: bytes) -> str:
    """What compare-and-swap compares: the key id and the body, hashed (conditions stay small)."""
    kid = key_id.encode("utf-8")
    return hashlib.sha256(len(kid).to_bytes(4, "big") + kid + body).hexdigest()


def attr_s(value: str) -> dict[str, str]:
    """A string attribute value."""
    return {"S": value}


def attr_n(value: int) -> dict[str, str]:
    """A number attribute value."""
    return {"N": str(int(value))}


def record_attrs(b: SealedBatch) -> Item:
    """A record's attributes but its keys (see :meth:`components.storage.dynamo.layout.Layout.record_key`)."""
    return {"uid": attr_s(b.uid), "bucket": attr_n(b.bucket), "lo": attr_s(encode_float(b.lo)),
            "hi": attr_s(encode_float(b.hi)), "rl": attr_s(encode_float(b.rec_lo)),
            "rh": attr_s(encode_float(b.rec_hi)), "n": attr_n(b.count), "k": attr_s(b.key_id), "f": attr_n(b.fmt),
            "v": {"B": b.body}, "h": attr_s(digest(b.key_id, b.body)), "grp": attr_n(b.group)}


def record_of(item: Item) -> SealedBatch:
    """The record an item holds."""
    return SealedBatch(item["uid"]["S"], int(item["bucket"]["N"]), decode_float(item["lo"]["S"]),
                       decode_float(item["hi"]["S"]), decode_float(item["rl"]["S"]),
                       decode_float(item["rh"]["S"]), int(item["n"]["N"]), item["k"]["S"],
                       bytes(item["v"]["B"]), int(item["f"]["N"]), group_of(item))


def group_of(item: Item) -> int:
    """The device group of a record item (group 0 when it has none: written before device groups)."""
    return int(item["grp"]["N"]) if "grp" in item else EVERY_GROUP


def check_record(kind: str, b: SealedBatch) -> None:
    """Refuse a record no item can hold."""
    if len(b.body) > MAX_BODY_BYTES:
        raise StorageUnavailable(
            f"{kind} {b.uid} has a sealed body of {len(b.body)} bytes, over the DynamoDB backend's limit of "
            f"{MAX_BODY_BYTES} bytes per record (max_body_bytes; a DynamoDB item holds at most 400 KB): cut "
            "batches to store.max_body_bytes before sealing (components.core.batches.split_batch)")
    if not all(math.isfinite(x) for x in (b.lo, b.hi, b.rec_lo, b.rec_hi)):
        raise ValueError(f"{kind} {b.uid} has a time bound that is not finite")
    if not 0 <= b.group <= MAX_GROUP:
        raise ValueError(f"{kind} {b.uid} has group {b.group}, expected 0 to {MAX_GROUP}")
    if not b.uid or len(b.uid.encode("utf-8")) > 512:
        raise ValueError(f"{kind} uid must be 1 to 512 bytes, got {len(b.uid.encode('utf-8'))}")
