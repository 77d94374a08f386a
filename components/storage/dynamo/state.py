"""Named records: device rows in 16 prefix partitions, every other name with a head of its own, parts for big bodies.

A device row (``device/<hex tag>``, small: well under 1 KB) is the item ``s#device/<first hex digit>`` /
``<name>``; a commit writes its rows with BatchWriteItem, 25 a call, and registers nothing, so neither the
writes nor a process's memory grow with the fleet. ``states("device/")`` Queries the 16 partitions;
``get_states`` reads heads by keys computed from the names. Every other name (a storage instance's
``storage/...`` counters, rewritten at each commit) keeps the layout of version 1: a directory entry
``sd`` / ``n:<name>`` (written once per process) and a head ``s#<name>`` / ``state`` in a partition of its own.

A body over one item is written as a fresh generation of parts first, then the head, then the old generation is
deleted, so a reader never sees a torn record (it checks a digest and reads again if a replace raced it). A
device row is only ever batch-written while it fits one item; should one that once needed parts shrink, the
batch write replaces its head without deleting the old parts (no read sees them: they are garbage).
"""

from __future__ import annotations

import secrets
import string
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from botocore.exceptions import ClientError

from components.core.errors import StorageUnavailable
from components.storage.dynamo.calls import CAS, DynamoTable
from components.storage.dynamo.codec import MAX_BODY_BYTES, Item, attr_n, attr_s, digest
from components.storage.interface import SealedState

STATE_READ_ATTEMPTS = 8
DEVICE_PREFIX = "device/"
ROW_PARTITIONS = "0123456789abcdef"
"""The first hex digit of a device row's tag names its partition."""
_HEX = frozenset(string.hexdigits.lower())

Mapper = Callable[[Callable[[str], list[Item]], Sequence[str]], Iterator[list[Item]]]
"""Runs a function over arguments (side by side): how :func:`states` Queries the row partitions."""


def is_device_row(name: str) -> bool:
    """True for names laid out as device rows (``device/`` and a lowercase hex digit)."""
    return name.startswith(DEVICE_PREFIX) and len(name) > len(DEVICE_PREFIX) and name[len(DEVICE_PREFIX)] in _HEX


def head_key(name: str) -> Item:
    """The key of a named record's head (a device row's item, or a head of its own)."""
    if is_device_row(name):
        return {"pk": attr_s(f"s#{name[:len(DEVICE_PREFIX) + 1]}"), "sk": attr_s(name)}
    return {"pk": attr_s(f"s#{name}"), "sk": attr_s("state")}


def dir_entry(name: str) -> Item:
    """The directory entry of a name not laid out as a device row."""
    return {"pk": attr_s("sd"), "sk": attr_s(f"n:{name}"), "name": attr_s(name)}


def _part_keys(gen: str, parts: int) -> list[Item]:
    return [{"pk": attr_s(f"p#{gen}"), "sk": attr_s(f"{i:06d}")} for i in range(parts)]


def _head(state: SealedState) -> Item:
    if not state.name:
        raise ValueError("a named record needs a name")
    return {**head_key(state.name), "name": attr_s(state.name), "k": attr_s(state.key_id),
            "h": attr_s(digest(state.key_id, state.body))}


def put_state(table: DynamoTable, state: SealedState, expect: SealedState | None) -> bool:
    """Write a named record (parts first, then the head); with ``expect``, only if the head still matches it."""
    head = _head(state)
    parts: list[Item] = []
    if len(state.body) <= MAX_BODY_BYTES:
        head["v"] = {"B": state.body}
    else:  # over one item: a fresh generation of parts, so readers of the current one are never disturbed
        gen = secrets.token_hex(8)
        chunks = [state.body[i:i + MAX_BODY_BYTES] for i in range(0, len(state.body), MAX_BODY_BYTES)]
        parts = [{**key, "v": {"B": c}} for key, c in zip(_part_keys(gen, len(chunks)), chunks, strict=True)]
        head.update(gen=attr_s(gen), parts=attr_n(len(parts)))
        table.put_all(parts)
    kwargs: dict[str, Any] = {}
    if expect is not None:
        kwargs = {"ConditionExpression": "#k = :k AND #h = :h", "ExpressionAttributeNames": {"#k": "k", "#h": "h"},
                  "ExpressionAttributeValues": {":k": attr_s(expect.key_id),
                                                ":h": attr_s(digest(expect.key_id, expect.body))}}
    try:
        resp = table.call("PutItem", table.client.put_item, passthrough=CAS, TableName=table.name,
                          Item=head, ReturnValues="ALL_OLD", **kwargs)
    except ClientError:
        table.delete_all({"pk": p["pk"], "sk": p["sk"]} for p in parts)
        return False
    old = resp.get("Attributes") or {}
    if "gen" in old:  # the replaced generation is ours to delete (whoever replaces a head deletes its parts)
        table.delete_all(_part_keys(old["gen"]["S"], int(old["parts"]["N"])))
    return True


class StateWriter:
    """Writes the named records of commits, remembering the directory entries this process has written."""

    def __init__(self, table: DynamoTable) -> None:
        """Write to ``table``."""
        self.table = table
        self._lock = threading.Lock()
        self._named: set[str] = set()  # names of the sd directory written (a handful: not device rows)

    def put(self, states: Sequence[SealedState]) -> None:
        """Device rows that fit an item by BatchWriteItem, then every other record by PutItem, in order."""
        last = {s.name: s for s in states}  # a name given twice: the later record wins
        rows = [s for s in last.values() if is_device_row(s.name) and len(s.body) <= MAX_BODY_BYTES]
        others = [s for s in last.values() if not (is_device_row(s.name) and len(s.body) <= MAX_BODY_BYTES)]
        self.register(s.name for s in others)
        self.table.put_all({**_head(s), "v": {"B": s.body}} for s in rows)
        for s in others:
            put_state(self.table, s, None)

    def register(self, names: Iterable[str]) -> None:
        """Write the directory entries of names (not device rows) this process has not written yet."""
        with self._lock:
            todo = sorted({n for n in names if not is_device_row(n)} - self._named)
        if todo:
            self.table.put_all(dir_entry(n) for n in todo)
            with self._lock:
                self._named.update(todo)


def assemble(table: DynamoTable, head: Item) -> SealedState | None:
    """The record a head describes; None if it vanished. Reads again when a concurrent replace tore it."""
    for _ in range(STATE_READ_ATTEMPTS):
        name = head["name"]["S"]
        if "gen" not in head:
            body = bytes(head["v"]["B"])
        else:
            pages = table.query(KeyConditionExpression="#pk = :p", ExpressionAttributeNames={"#pk": "pk"},
                                ExpressionAttributeValues={":p": attr_s(f"p#{head['gen']['S']}")})
            chunks = [bytes(item["v"]["B"]) for item in pages]
            body = b"".join(chunks) if len(chunks) == int(head["parts"]["N"]) else b""
        if digest(head["k"]["S"], body) == head["h"]["S"]:
            return SealedState(name, head["k"]["S"], body)
        fresh = table.get(head_key(name))
        if fresh is None:
            return None
        head = fresh
    raise StorageUnavailable(f"named record {head['name']['S']!r} kept changing while being read "
                             f"({STATE_READ_ATTEMPTS} attempts); try again")


def _assembled(table: DynamoTable, heads: Iterable[Item]) -> list[SealedState]:
    out = []
    for head in heads:
        state = assemble(table, head)
        if state is not None:  # a name whose first write did not finish has no head: nothing to read
            out.append(state)
    return out


def get_states(table: DynamoTable, names: Sequence[str]) -> list[SealedState]:
    """The named records of ``names`` that exist (consistent BatchGetItem of their heads, 100 a call)."""
    keys = [head_key(n) for n in dict.fromkeys(names)]
    return _assembled(table, table.batch_get(keys))


def _row_partitions(prefix: str) -> list[str]:
    """The row partitions that can hold names starting with ``prefix``."""
    if prefix.startswith(DEVICE_PREFIX) and len(prefix) > len(DEVICE_PREFIX):
        digit = prefix[len(DEVICE_PREFIX)]
        return [digit] if digit in _HEX else []
    return list(ROW_PARTITIONS) if DEVICE_PREFIX.startswith(prefix) else []


def states(table: DynamoTable, prefix: str, mapper: Mapper) -> list[SealedState]:
    """Named records whose name starts with ``prefix``: row partitions side by side, then the ``sd`` names."""
    row_prefix = prefix if len(prefix) > len(DEVICE_PREFIX) else DEVICE_PREFIX

    def rows(digit: str) -> list[Item]:
        return list(table.query(KeyConditionExpression="#pk = :p AND begins_with(#sk, :n)",
                                ExpressionAttributeNames={"#pk": "pk", "#sk": "sk"},
                                ExpressionAttributeValues={":p": attr_s(f"s#{DEVICE_PREFIX}{digit}"),
                                                           ":n": attr_s(row_prefix)}))

    heads = [item for page in mapper(rows, _row_partitions(prefix)) for item in page]
    names = [item["name"]["S"] for item in table.query(
        KeyConditionExpression="#pk = :p AND begins_with(#sk, :n)",
        ExpressionAttributeNames={"#pk": "pk", "#sk": "sk"},
        ExpressionAttributeValues={":p": attr_s("sd"), ":n": attr_s(f"n:{prefix}")})]
    heads += table.batch_get([head_key(n) for n in names if not is_device_row(n)])
    return sorted(_assembled(table, heads), key=lambda s: s.name)
