"""The DynamoDB backend: sealed records in one DynamoDB table, found by Query on key ranges, never by Scan.

``layout`` describes the table, ``calls`` the retried calls on it, ``codec`` its items, ``writes`` and
``state`` how records and named records are written, ``swaps`` how segments replace records, ``reads`` how
windows are read, and ``store`` the :class:`DynamoBatchStore` that composes them.

Cost: a batch of B KB costs ceil(B + 0.4) WCU plus 1 WCU in the GSI and 1 RCU for the existence check; a
commit adds 1 WCU for ``max_hi``, 1 WCU per device row (each under 1 KB, 25 a BatchWriteItem call) and the
counters record's size in KB; a window reads its answer plus the records starting up to one band span before
it, at 4 KB per RCU, in the Queries counted in ``layout``.
"""

from components.storage.dynamo.codec import decode_float, encode_float
from components.storage.dynamo.layout import GSI_RECEIVED, LAYOUT_VERSION, Layout, shard_of
from components.storage.dynamo.reads import HI_DESC_FIRST_PAGE
from components.storage.dynamo.store import DynamoBatchStore

__all__ = ["GSI_RECEIVED", "HI_DESC_FIRST_PAGE", "LAYOUT_VERSION", "DynamoBatchStore", "Layout", "decode_float",
           "encode_float", "shard_of"]
