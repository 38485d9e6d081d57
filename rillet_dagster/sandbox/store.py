"""The simulator's record store: every entity's records in creation order, with list indexes.

A :class:`Collection` keeps one entity's records in creation order (``seq``) plus compact
per-record columns (modification time, subsidiary, business date, deleted flag) so that lists,
filters and keyset pages never render records they do not return. Records are either ordinary
dicts or rows of a :class:`BulkSource`, rendered on demand, so that a million generated journal
entries cost a few arrays rather than gigabytes of dicts. A bulk row that is written becomes an
ordinary dict in place (same ``seq``, same id).

Two orders serve ``sort_by``: ``created`` is ``seq`` descending; ``updated`` is an append-only
log of (modification time, seq), newest last, where a record's older entries go stale when it
changes. Both are append-only, so a position in either is a stable keyset cursor: records created
or updated after a pass began land beyond its start and are not served to it, exactly as keyset
pagination over a live table behaves.
"""

from __future__ import annotations

import bisect
import json
import threading
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Protocol

from rillet_dagster.catalog import EntitySpec, FilterOp, FilterSpec
from rillet_dagster.clock import isoformat_z, parse_timestamp


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch (exact, unlike float seconds)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


_EPOCH = parse_timestamp("1970-01-01T00:00:00Z")


def dumps(record: Any) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()


class BulkSource(Protocol):
    """Rows generated on demand from compact arrays (the bulk of a large simulated ledger)."""

    def __len__(self) -> int: ...

    def render(self, index: int) -> dict[str, Any]: ...

    def render_json(self, index: int) -> bytes:
        """Exactly ``dumps(render(index))``, but fast: lists serve these bytes."""
        ...

    def record_id(self, index: int) -> str: ...

    def index_of(self, record_id: str) -> int | None: ...

    def updated_us(self, index: int) -> int: ...

    def subsidiary(self, index: int) -> int: ...

    def date_ordinal(self, index: int) -> int: ...


@dataclass(frozen=True)
class ListQuery:
    """A validated list request: the filters that hold for every page of one pass."""

    sort: str  # "created" | "updated"
    updated_gt_us: int | None
    filters: tuple[tuple[FilterSpec, str], ...]

    def fingerprint(self) -> list[Any]:
        return [self.sort, self.updated_gt_us, [[f.param, v] for f, v in self.filters]]


class Collection:
    """One entity's records, in creation order."""

    def __init__(self, spec: EntitySpec, subsidiary_index: Mapping[str, int]) -> None:
        self.spec = spec
        self._subsidiary_index = subsidiary_index
        self._records: list[dict[str, Any] | None] = []  # by seq; None = row of the bulk source
        self._bulk_index = array("q")  # by seq: bulk row, or -1
        self._bulk: BulkSource | None = None
        self._bulk_seqs = array("q")  # by bulk row: its seq (a row keeps its seq when written)
        self._seq_by_id: dict[str, int] = {}
        self._updated = array("q")  # by seq: modification time (µs), for updated.gt and sorting
        self._subsidiary = array("h")  # by seq: subsidiary index or -1
        self._date = array("l")  # by seq: date ordinal of spec.date_field, or 0
        self._deleted = bytearray()
        self._live = 0
        self._updated_log: list[tuple[int, int]] = []  # (updated µs, seq), ascending
        self._updated_pos = array("q")  # by seq: index of its current entry in _updated_log
        self._json: dict[int, bytes] = {}
        self.version = 0

    # ---- loading -------------------------------------------------------------------------

    def load(
        self,
        records: list[tuple[dict[str, Any], int]],
        bulk: BulkSource | None = None,
        order: list[int] | None = None,
    ) -> None:
        """Load generated records (each with its modification time in µs) in creation order.

        ``order`` interleaves bulk rows with the dict records: each entry ``>= 0`` is an index
        into ``records``, each ``< 0`` is bulk row ``-1 - entry``. Without it the bulk rows
        come first.
        """
        if self._records:
            raise RuntimeError(f"{self.spec.name}: load() runs once, on an empty collection")
        self._bulk = bulk
        self._bulk_seqs = array("q", bytes(8 * (len(bulk) if bulk else 0)))
        if order is None:
            order = [-1 - i for i in range(len(bulk) if bulk else 0)] + list(range(len(records)))
        for entry in order:
            if entry >= 0:
                record, updated = records[entry]
                self._append(record, -1, updated)
            else:
                assert bulk is not None
                row = -1 - entry
                self._bulk_seqs[row] = self._append(None, row, bulk.updated_us(row))
        self._rebuild_updated_log()

    def _append(self, record: dict[str, Any] | None, bulk_row: int, updated_us: int) -> int:
        seq = len(self._records)
        self._records.append(record)
        self._bulk_index.append(bulk_row)
        self._updated.append(updated_us)
        self._deleted.append(0)
        self._updated_pos.append(-1)
        if record is not None:
            self._seq_by_id[record["id"]] = seq
            self._subsidiary.append(self._subsidiary_of(record))
            self._date.append(self._date_of(record))
        else:
            assert self._bulk is not None
            self._subsidiary.append(self._bulk.subsidiary(bulk_row))
            self._date.append(self._bulk.date_ordinal(bulk_row))
        self._live += 1
        return seq

    def _rebuild_updated_log(self) -> None:
        self._updated_log = sorted((self._updated[s], s) for s in range(len(self._records)))
        for position, (_, seq) in enumerate(self._updated_log):
            self._updated_pos[seq] = position

    def _subsidiary_of(self, record: Mapping[str, Any]) -> int:
        return self._subsidiary_index.get(record.get("subsidiary_id") or "", -1)

    def _date_of(self, record: Mapping[str, Any]) -> int:
        field = self.spec.date_field
        value = record.get(field) if field else None
        return date.fromisoformat(value).toordinal() if value else 0

    # ---- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Live (not deleted) records."""
        return self._live

    def seq_of(self, record_id: str) -> int | None:
        seq = self._seq_by_id.get(record_id)
        if seq is None and self._bulk is not None:
            row = self._bulk.index_of(record_id)
            if row is not None:
                seq = self._bulk_seq(row)
        return seq

    def _bulk_seq(self, row: int) -> int | None:
        return self._bulk_seqs[row] if 0 <= row < len(self._bulk_seqs) else None

    def get(self, record_id: str, *, include_deleted: bool = False) -> dict[str, Any] | None:
        seq = self.seq_of(record_id)
        if seq is None or (self._deleted[seq] and not include_deleted):
            return None
        return self.record(seq)

    def record(self, seq: int) -> dict[str, Any]:
        record = self._records[seq]
        if record is not None:
            return record
        assert self._bulk is not None
        return self._bulk.render(self._bulk_index[seq])

    def record_json(self, seq: int) -> bytes:
        cached = self._json.get(seq)
        if cached is not None:
            return cached
        if self._records[seq] is None:
            assert self._bulk is not None
            return self._bulk.render_json(self._bulk_index[seq])
        cached = self._json[seq] = dumps(self._records[seq])
        return cached

    def is_deleted(self, seq: int) -> bool:
        return bool(self._deleted[seq])

    def updated_us(self, seq: int) -> int:
        return self._updated[seq]

    def live_seqs(self) -> Iterator[int]:
        """Every live record's seq, newest first."""
        for seq in range(len(self._records) - 1, -1, -1):
            if not self._deleted[seq]:
                yield seq

    def all_records(self) -> Iterator[dict[str, Any]]:
        """Every live record, newest first (for tests, reports and the generator)."""
        for seq in self.live_seqs():
            yield self.record(seq)

    def ids(self) -> list[str]:
        return [self.record(s)["id"] for s in self.live_seqs()]

    # ---- listing -------------------------------------------------------------------------

    def start_position(self, sort: str) -> int:
        """The position just past the newest record of ``sort`` order (page 1 starts there)."""
        return len(self._updated_log) if sort == "updated" else len(self._records)

    def page(self, query: ListQuery, start: int, limit: int) -> tuple[list[int], int | None]:
        """Up to ``limit`` matching seqs below position ``start``, and the next position.

        The next position is ``None`` when the pass is complete.
        """
        found: list[int] = []
        position = start
        gt = query.updated_gt_us
        if query.sort == "updated":
            log = self._updated_log
            while position > 0 and len(found) < limit:
                position -= 1
                updated, seq = log[position]
                if gt is not None and updated <= gt:
                    return found, None  # everything below is older still
                if self._updated_pos[seq] == position and self._matches(seq, query):
                    found.append(seq)
        else:
            while position > 0 and len(found) < limit:
                position -= 1
                if (gt is None or self._updated[position] > gt) and self._matches(position, query):
                    found.append(position)
        if position == 0 or not self._any_below(query, position):
            return found, None
        return found, position

    def _any_below(self, query: ListQuery, position: int) -> bool:
        # Rillet omits next_cursor on the last page; peek one match ahead so that a pass whose
        # size is a multiple of the limit does not end with an empty page.
        more, _ = self._peek(query, position)
        return more

    def _peek(self, query: ListQuery, position: int) -> tuple[bool, int]:
        gt = query.updated_gt_us
        if query.sort == "updated":
            log = self._updated_log
            while position > 0:
                position -= 1
                updated, seq = log[position]
                if gt is not None and updated <= gt:
                    return False, position
                if self._updated_pos[seq] == position and self._matches(seq, query):
                    return True, position
            return False, 0
        while position > 0:
            position -= 1
            if (gt is None or self._updated[position] > gt) and self._matches(position, query):
                return True, position
        return False, 0

    def _matches(self, seq: int, query: ListQuery) -> bool:
        if self._deleted[seq]:
            return False
        record: dict[str, Any] | None = None
        for spec, value in query.filters:
            if spec.field == "subsidiary_id" and spec.op is FilterOp.EQ:
                if self._subsidiary[seq] != self._subsidiary_index.get(value, -2):
                    return False
                continue
            if spec.field == self.spec.date_field and spec.op in _DATE_OPS:
                own = self._date[seq]
                if not own or not _compare(own, spec.op, date.fromisoformat(value).toordinal()):
                    return False
                continue
            if record is None:
                record = self.record(seq)
            if not matches_filter(record, spec, value, query.filters):
                return False
        return True

    # ---- writing -------------------------------------------------------------------------

    def insert(self, record: dict[str, Any], updated_us: int) -> int:
        seq = self._append(record, -1, updated_us)
        self._log_update(seq, updated_us)
        self.version += 1
        return seq

    def replace(self, seq: int, record: dict[str, Any], updated_us: int) -> None:
        """Replace a record's content (same id, same place in creation order)."""
        if self._records[seq] is None:
            self._bulk_index[seq] = -1
        self._records[seq] = record
        self._seq_by_id[record["id"]] = seq
        self._subsidiary[seq] = self._subsidiary_of(record)
        self._date[seq] = self._date_of(record)
        self._json.pop(seq, None)
        self._updated[seq] = updated_us
        self._log_update(seq, updated_us)
        self.version += 1

    def delete(self, seq: int, updated_us: int) -> None:
        if not self._deleted[seq]:
            self._deleted[seq] = 1
            self._live -= 1
            self._updated[seq] = updated_us
            self.version += 1

    def _log_update(self, seq: int, updated_us: int) -> None:
        entry = (updated_us, seq)
        if not self._updated_log or self._updated_log[-1] <= entry:
            self._updated_pos[seq] = len(self._updated_log)
            self._updated_log.append(entry)
            return
        # A timestamp older than the newest entry (a clock set back in a test): keep the log
        # sorted; positions after the insertion point move, so recompute the current ones.
        bisect.insort(self._updated_log, entry)
        for position, (updated, s) in enumerate(self._updated_log):
            if self._updated[s] == updated:
                self._updated_pos[s] = position


_DATE_OPS = frozenset({FilterOp.GT, FilterOp.GTE, FilterOp.LT, FilterOp.LTE})


def _compare(left: Any, op: FilterOp, right: Any) -> bool:
    if left is None:
        return False
    if op is FilterOp.GT:
        return left > right
    if op is FilterOp.GTE:
        return left >= right
    if op is FilterOp.LT:
        return left < right
    if op is FilterOp.LTE:
        return left <= right
    return left == right


def field_value(record: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path (``price.amount.currency``), or None."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def matches_filter(
    record: Mapping[str, Any],
    spec: FilterSpec,
    value: str,
    all_filters: tuple[tuple[FilterSpec, str], ...] = (),
) -> bool:
    actual = field_value(record, spec.field)
    op = spec.op
    if op is FilterOp.EQ:
        return actual is not None and str(actual) == value
    if op is FilterOp.BOOL:
        return bool(actual) == (value == "true")
    if op is FilterOp.SEARCH:
        return isinstance(actual, str) and value.lower() in actual.lower()
    if op is FilterOp.ANY_LINE_ACCOUNT:
        wanted = {v.strip() for v in value.split(",") if v.strip()}
        return any(item.get("account_id") in wanted for item in actual or ())
    if op is FilterOp.EXTERNAL_REFERENCE:
        params = {s.param: v for s, v in all_filters}
        ref_id = params.get("external_reference_id")
        ref_type = params.get("external_reference_type")
        return any(ref.get("id") == ref_id and ref.get("type") == ref_type for ref in actual or ())
    return _compare(actual, op, value)


ChangeListener = Callable[[str, str, "dict[str, Any] | str"], None]


class Store:
    """All collections of one simulated organization, guarded by one lock."""

    def __init__(self, specs: tuple[EntitySpec, ...]) -> None:
        self.lock = threading.RLock()
        self.subsidiary_index: dict[str, int] = {}
        self.collections: dict[str, Collection] = {
            spec.name: Collection(spec, self.subsidiary_index) for spec in specs if not spec.single
        }
        self.singletons: dict[str, dict[str, Any] | None] = {
            spec.name: None for spec in specs if spec.single
        }
        self._listeners: list[ChangeListener] = []

    def __getitem__(self, entity: str) -> Collection:
        return self.collections[entity]

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def notify(self, entity: str, event: str, body: dict[str, Any] | str) -> None:
        for listener in self._listeners:
            listener(entity, event, body)

    def stamp(self, moment: datetime) -> tuple[str, int]:
        """``updated_at`` text at millisecond precision and the same instant in µs."""
        text = isoformat_z(moment)
        return text, to_us(parse_timestamp(text))
