"""Swaps: records replaced by segments so that no read sees both or neither, whenever a process is killed.

DynamoDB has no transaction over thousands of items, so a swap is a protocol around one small transaction:

1. put the intent head ``x`` / ``<id>`` (status ``pending``, the groups involved, the new segments' keys, the
   number of parts), then its parts ``x#<id>`` / ``<i>`` (the keys of the old records, chunked);
2. put the new segments with ``pend = <id>`` (every read skips a record that carries ``pend``);
3. one TransactWriteItems: the intent ``pending`` → ``committed`` and ``pend`` removed from every new segment
   (conditions: still ``pending``, ``pend`` still ``<id>``; at most 99 new segments). From here on every read
   hides the old records listed by a committed intent;
4. delete the old records; 5. set the intent ``done`` and delete its parts. A ``done`` head stays for
   :data:`INTENT_LINGER_S` (longer than any one read takes), then the next recovery deletes it.

A read (:func:`consistent`) Queries the heads before and after it reads records. Records listed by an intent
committed at the first look are hidden (its parts are read then; a committed intent's parts are only deleted
once its old records are gone). An intent that was not committed at the first look but is ``committed`` or
``done`` at the second committed while the read was under way: the read is done again. Any other intent changed
nothing the read could see: still pending (its segments carry ``pend``), undone, or done long before.

Recovery, at the start of each swap and at store open, finishes ``committed`` intents (steps 4, 5; idempotent),
finishes undoing ``aborted`` ones, and undoes ``pending`` ones of the swap's group (one compactor swaps a group,
so such an intent is a dead one's) or, at store open, ones older than :data:`STALE_PENDING_S`. Undoing first
sets ``pending`` → ``aborted`` (a conditional update), so an owner still alive cannot commit afterwards; then it
deletes the segments still marked with the intent's id, the parts and the head.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

from botocore.exceptions import ClientError

from components.core.errors import StorageUnavailable
from components.storage.dynamo.calls import CAS, TRANSACT_MAX_ITEMS, TRANSACTION_CANCELED, DynamoTable
from components.storage.dynamo.codec import Item, attr_n, attr_s, digest
from components.storage.dynamo.layout import Layout
from components.storage.dynamo.writes import RecordWriter, record_item
from components.storage.interface import Groups, SealedBatch

log = logging.getLogger(__name__)

INTENT_PK = "x"
PENDING, COMMITTED, DONE, ABORTED = "pending", "committed", "done", "aborted"
MAX_NEW_SEGMENTS = TRANSACT_MAX_ITEMS - 1
INTENT_PART_BYTES = 256 * 1024
INTENT_LINGER_S = 600.0
"""How long a done intent's head stays, so a read that started before the commit notices it."""
STALE_PENDING_S = 600.0
"""A pending intent this old found at store open is a dead process's: it is undone."""
READ_ATTEMPTS = 8
_UID_AT = 17  # a record's sort key is <16 hex digits of lo>#<uid>


@dataclass(frozen=True)
class Intent:
    """One swap's head item."""

    id: str
    status: str
    group: int
    groups: frozenset[int]
    at: float
    done_at: float
    new: list[Item]
    parts: int

    @staticmethod
    def of(item: Item) -> Intent:
        """The intent a head item holds."""
        new = [{"pk": attr_s(p["L"][0]["S"]), "sk": attr_s(p["L"][1]["S"])} for p in item["new"]["L"]]
        return Intent(item["sk"]["S"], item["st"]["S"], int(item["grp"]["N"]),
                      frozenset(int(g["N"]) for g in item["gs"]["L"]), float(item["at"]["N"]),
                      float(item.get("dt", {"N": "0"})["N"]), new, int(item["parts"]["N"]))

    def touches(self, groups: Groups) -> bool:
        """True when a read of ``groups`` can see records of this swap."""
        return groups is None or not self.groups.isdisjoint(groups)


def _head_key(swap_id: str) -> Item:
    return {"pk": attr_s(INTENT_PK), "sk": attr_s(swap_id)}


def _part_keys(swap_id: str, parts: int) -> list[Item]:
    return [{"pk": attr_s(f"{INTENT_PK}#{swap_id}"), "sk": attr_s(f"{i:06d}")} for i in range(parts)]


def heads(table: DynamoTable) -> dict[str, Intent]:
    """Every intent head (one consistent Query of a partition that is normally empty)."""
    items = table.query(KeyConditionExpression="#pk = :p", ExpressionAttributeNames={"#pk": "pk"},
                        ExpressionAttributeValues={":p": attr_s(INTENT_PK)})
    return {i.id: i for i in map(Intent.of, items)}


def old_keys(table: DynamoTable, intent: Intent) -> list[Item] | None:
    """The keys of the records an intent replaces; None once its parts are being deleted (it is done)."""
    items = list(table.query(KeyConditionExpression="#pk = :p", ExpressionAttributeNames={"#pk": "pk"},
                             ExpressionAttributeValues={":p": attr_s(f"{INTENT_PK}#{intent.id}")}))
    if len(items) != intent.parts:
        return None
    flat = [v["S"] for item in items for v in item["o"]["L"]]
    return [{"pk": attr_s(pk), "sk": attr_s(sk)} for pk, sk in zip(flat[::2], flat[1::2], strict=True)]


class Visibility:
    """What one read hides: records that committed swaps replace (and how to tell that one committed meanwhile)."""

    def __init__(self, table: DynamoTable, groups: Groups) -> None:
        """For a read of ``groups`` (None: every group)."""
        self.table, self.groups = table, None if groups is None else frozenset(groups)
        self.hidden: set[str] = set()
        self._first: dict[str, str] = {}  # intent id -> status when first seen
        self._listed: set[str] = set()  # committed intents whose old records are hidden
        self._started = time.monotonic()

    def look(self) -> None:
        """Read the intents; hide the old records of those committed (a lazy read looks again before each page)."""
        for intent in heads(self.table).values():
            if not intent.touches(self.groups):
                continue
            self._first.setdefault(intent.id, intent.status)
            if intent.status == COMMITTED and intent.id not in self._listed:
                self._listed.add(intent.id)
                keys = old_keys(self.table, intent) or []  # none: done meanwhile, its old records are gone
                self.hidden.update(k["sk"]["S"][_UID_AT:] for k in keys)

    def shows(self, item: Item) -> bool:
        """True for a record item the read may return."""
        return "pend" not in item and item["sk"]["S"][_UID_AT:] not in self.hidden

    def unchanged(self) -> bool:
        """True when no swap the read can see committed since :meth:`look` (read the intents again)."""
        if time.monotonic() - self._started > INTENT_LINGER_S / 2:
            return False  # too slow to rely on done heads still being there
        for intent in heads(self.table).values():
            if (intent.touches(self.groups) and intent.status in (COMMITTED, DONE)
                    and self._first.get(intent.id) not in (COMMITTED, DONE)):
                return False
        return True


def consistent(table: DynamoTable, groups: Groups, read: Callable[[Visibility], list[SealedBatch]]
               ) -> list[SealedBatch]:
    """``read`` between two looks at the intents, done again while a swap commits under it."""
    for _ in range(READ_ATTEMPTS):
        visibility = Visibility(table, groups)
        visibility.look()
        out = read(visibility)
        if visibility.unchanged():
            return out
    raise StorageUnavailable(f"DynamoDB table {table.name!r}: swaps kept committing while a read was under way "
                             f"({READ_ATTEMPTS} attempts); try again")


def _found(table: DynamoTable, layout: Layout, old: Sequence[SealedBatch]) -> list[Item] | None:
    """The keys of ``old`` (batches or segments) if every one is still stored as given, else None."""
    unique = {b.uid: b for b in old}
    keys: list[Item] = []
    for code in ("b", "c"):
        if not unique:
            break
        want = {b.uid: layout.record_key(code, b) for b in unique.values()}
        for item in table.batch_get(list(want.values()), projection="#pk, #sk, #h, #pend"):
            b = unique.get(item["sk"]["S"][_UID_AT:])
            if b is None or "pend" in item or item["h"]["S"] != digest(b.key_id, b.body):
                return None
            keys.append(want[b.uid])
            del unique[b.uid]
    return None if unique else keys


def _key_list(keys: Sequence[Item]) -> list[list[Item]]:
    """The keys as lists of attribute values, in chunks of at most :data:`INTENT_PART_BYTES`."""
    chunks: list[list[Item]] = [[]]
    size = 0
    for k in keys:
        n = len(k["pk"]["S"]) + len(k["sk"]["S"]) + 16
        if chunks[-1] and size + n > INTENT_PART_BYTES:
            chunks.append([])
            size = 0
        chunks[-1] += [k["pk"], k["sk"]]
        size += n
    return [c for c in chunks if c]


def _begin(table: DynamoTable, swap_id: str, group: int, groups: Collection[int], new_keys: Sequence[Item],
           old: Sequence[Item]) -> None:
    """Step 1: the pending head (first, so an undo knows every item the swap may have put), then its parts."""
    chunks = _key_list(old)
    table.call("PutItem", table.client.put_item, TableName=table.name, Item={
        **_head_key(swap_id), "st": attr_s(PENDING), "grp": attr_n(group),
        "gs": {"L": [attr_n(g) for g in sorted(groups)]}, "at": {"N": repr(time.time())},
        "new": {"L": [{"L": [k["pk"], k["sk"]]} for k in new_keys]}, "parts": attr_n(len(chunks))})
    table.put_all({**key, "o": {"L": chunk}} for key, chunk in zip(_part_keys(swap_id, len(chunks)), chunks,
                                                                    strict=True))


def _commit(table: DynamoTable, swap_id: str, new_keys: Sequence[Item]) -> bool:
    """Step 3: one transaction; False when the intent was aborted first."""
    items: list[dict[str, Any]] = [{"Update": {
        "TableName": table.name, "Key": _head_key(swap_id), "UpdateExpression": "SET #st = :c",
        "ConditionExpression": "#st = :p", "ExpressionAttributeNames": {"#st": "st"},
        "ExpressionAttributeValues": {":c": attr_s(COMMITTED), ":p": attr_s(PENDING)}}}]
    items += [{"Update": {"TableName": table.name, "Key": k, "UpdateExpression": "REMOVE #pend",
                          "ConditionExpression": "#pend = :x", "ExpressionAttributeNames": {"#pend": "pend"},
                          "ExpressionAttributeValues": {":x": attr_s(swap_id)}}} for k in new_keys]
    try:
        table.call("TransactWriteItems", table.client.transact_write_items, passthrough=frozenset(
            {TRANSACTION_CANCELED}), TransactItems=items)
    except ClientError:
        return False
    return True


def _finish(table: DynamoTable, intent: Intent, old: Sequence[Item] | None) -> None:
    """Steps 4 and 5 of a committed intent (again, after a crash: every step is idempotent)."""
    if old is None:
        old = old_keys(table, intent) or []
    table.delete_all(old)
    try:
        table.call("UpdateItem", table.client.update_item, passthrough=CAS, TableName=table.name,
                   Key=_head_key(intent.id), UpdateExpression="SET #st = :d, #dt = :t",
                   ConditionExpression="#st = :c", ExpressionAttributeNames={"#st": "st", "#dt": "dt"},
                   ExpressionAttributeValues={":d": attr_s(DONE), ":c": attr_s(COMMITTED),
                                              ":t": {"N": repr(time.time())}})
    except ClientError:
        pass  # already done
    table.delete_all(_part_keys(intent.id, intent.parts))


def _undo(table: DynamoTable, intent: Intent) -> None:
    """Undo a pending (or finish undoing an aborted) intent: abort it, delete what it put."""
    if intent.status == PENDING:
        try:
            table.call("UpdateItem", table.client.update_item, passthrough=CAS, TableName=table.name,
                       Key=_head_key(intent.id), UpdateExpression="SET #st = :a", ConditionExpression="#st = :p",
                       ExpressionAttributeNames={"#st": "st"},
                       ExpressionAttributeValues={":a": attr_s(ABORTED), ":p": attr_s(PENDING)})
        except ClientError:
            return  # it committed first: the next recovery finishes it
    for key in intent.new:
        try:
            table.call("DeleteItem", table.client.delete_item, passthrough=CAS, TableName=table.name, Key=key,
                       ConditionExpression="#pend = :x", ExpressionAttributeNames={"#pend": "pend"},
                       ExpressionAttributeValues={":x": attr_s(intent.id)})
        except ClientError:
            pass  # never put, or already deleted
    table.delete_all(_part_keys(intent.id, intent.parts))
    table.delete_all([_head_key(intent.id)])
    log.info("undid swap %s of group %d (not committed)", intent.id, intent.group)


def recover(table: DynamoTable, group: int | None) -> None:
    """Finish or undo what swaps left: before a swap of ``group``, or at store open (``group`` None)."""
    now = time.time()
    for intent in heads(table).values():
        if intent.status == COMMITTED:
            _finish(table, intent, None)
        elif intent.status == ABORTED or (intent.status == PENDING and (
                intent.group == group if group is not None else now - intent.at > STALE_PENDING_S)):
            _undo(table, intent)
        elif intent.status == DONE and now - intent.done_at > INTENT_LINGER_S:
            table.delete_all(_part_keys(intent.id, intent.parts))
            table.delete_all([_head_key(intent.id)])


def swap(table: DynamoTable, layout: Layout, writer: RecordWriter, old: Sequence[SealedBatch],
         new: Sequence[SealedBatch]) -> bool:
    """Replace records ``old`` by segments ``new`` (see the module docstring); False if one of ``old`` is gone."""
    segments = list(writer.unique("c", new).values())
    if len(segments) > MAX_NEW_SEGMENTS:
        raise ValueError(f"a swap puts at most {MAX_NEW_SEGMENTS} segments (one transaction of "
                         f"{TRANSACT_MAX_ITEMS} items), got {len(segments)}")
    if not old and not segments:
        return True
    group = old[0].group if old else segments[0].group
    recover(table, group)
    found = _found(table, layout, old)
    if found is None:
        return False
    swap_id = secrets.token_hex(8)
    new_keys = [layout.record_key("c", s) for s in segments]
    _begin(table, swap_id, group, {b.group for b in (*old, *segments)}, new_keys, found)
    writer.register(e for s in segments for e in layout.directory_entries("c", s))
    table.put_all({**record_item(layout, "c", s, writer.expire_after_s), "pend": attr_s(swap_id)} for s in segments)
    intent = Intent(swap_id, PENDING, group, frozenset(), 0.0, 0.0, new_keys, len(_key_list(found)))
    if not _commit(table, swap_id, new_keys):
        _undo(table, intent)  # unless a recovery aborted it first (taking it for a dead one's): that one undoes it
        return False
    if segments:
        writer.raise_max_hi(max(s.hi for s in segments))
    _finish(table, replace(intent, status=COMMITTED), found)
    return True
