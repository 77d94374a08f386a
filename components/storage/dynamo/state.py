"""State records: a directory of names, one head item per name, and parts for bodies over one item.

Parts are written first, then the head, then the old generation is deleted, so a reader never sees a torn
state (it checks a digest and reads again if a replace raced it).
"""

from __future__ import annotations

import secrets
from typing import Any

from botocore.exceptions import ClientError

from components.core.errors import StorageUnavailable
from components.storage.dynamo.calls import CAS, DynamoTable
from components.storage.dynamo.codec import MAX_BODY_BYTES, Item, attr_n, attr_s, digest
from components.storage.dynamo.writes import write
from components.storage.interface import SealedState

STATE_READ_ATTEMPTS = 8


def dir_entry(name: str) -> Item:
    """The directory entry of a state name."""
    return {"pk": attr_s("sd"), "sk": attr_s(f"n:{name}"), "name": attr_s(name)}


def _head_key(name: str) -> Item:
    return {"pk": attr_s(f"s#{name}"), "sk": attr_s("state")}


def _part_keys(gen: str, parts: int) -> list[Item]:
    return [{"pk": attr_s(f"p#{gen}"), "sk": attr_s(f"{i:06d}")} for i in range(parts)]


def put_state(table: DynamoTable, state: SealedState, expect: SealedState | None) -> bool:
    """Write a state record (parts first, then the head); with ``expect``, only if the head still matches it."""
    if not state.name:
        raise ValueError("a state record needs a name")
    head: Item = {**_head_key(state.name), "name": attr_s(state.name), "k": attr_s(state.key_id),
                  "h": attr_s(digest(state.key_id, state.body))}
    parts: list[Item] = []
    if len(state.body) <= MAX_BODY_BYTES:
        head["v"] = {"B": state.body}
    else:  # over one item: a fresh generation of parts, so readers of the current one are never disturbed
        gen = secrets.token_hex(8)
        chunks = [state.body[i:i + MAX_BODY_BYTES] for i in range(0, len(state.body), MAX_BODY_BYTES)]
        parts = [{**key, "v": {"B": c}} for key, c in zip(_part_keys(gen, len(chunks)), chunks, strict=True)]
        head.update(gen=attr_s(gen), parts=attr_n(len(parts)))
        write(table, [{"PutRequest": {"Item": p}} for p in parts])
    kwargs: dict[str, Any] = {}
    if expect is not None:
        kwargs = {"ConditionExpression": "#k = :k AND #h = :h", "ExpressionAttributeNames": {"#k": "k", "#h": "h"},
                  "ExpressionAttributeValues": {":k": attr_s(expect.key_id),
                                                ":h": attr_s(digest(expect.key_id, expect.body))}}
    try:
        resp = table.call("PutItem", table.client.put_item, passthrough=CAS, TableName=table.name,
                          Item=head, ReturnValues="ALL_OLD", **kwargs)
    except ClientError:
        write(table, [{"DeleteRequest": {"Key": {"pk": p["pk"], "sk": p["sk"]}}} for p in parts])
        return False
    old = resp.get("Attributes") or {}
    if "gen" in old:  # the replaced generation is ours to delete (whoever replaces a head deletes its parts)
        write(table, [{"DeleteRequest": {"Key": k}} for k in _part_keys(old["gen"]["S"], int(old["parts"]["N"]))])
    return True


def assemble(table: DynamoTable, head: Item) -> SealedState | None:
    """The state a head describes; None if it vanished. Reads again when a concurrent replace tore it."""
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
        fresh = table.get(_head_key(name))
        if fresh is None:
            return None
        head = fresh
    raise StorageUnavailable(f"state record {head['name']['S']!r} kept changing while being read "
                             f"({STATE_READ_ATTEMPTS} attempts); try again")


def states(table: DynamoTable, prefix: str) -> list[SealedState]:
    """State records whose name starts with ``prefix``."""
    names = [item["name"]["S"] for item in table.query(
        KeyConditionExpression="#pk = :p AND begins_with(#sk, :n)",
        ExpressionAttributeNames={"#pk": "pk", "#sk": "sk"},
        ExpressionAttributeValues={":p": attr_s("sd"), ":n": attr_s(f"n:{prefix}")})]
    out = []
    for head in table.batch_get([_head_key(n) for n in names]):
        state = assemble(table, head)
        if state is not None:  # a name whose first write did not finish has no head: nothing to read
            out.append(state)
    return sorted(out, key=lambda s: s.name)
