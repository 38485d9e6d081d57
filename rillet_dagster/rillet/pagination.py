"""Reading a Rillet list to the end, exactly once per record.

Rillet's cursors live two hours; an expired (or unknown) cursor is not an error: the list
silently starts again at page 1. A keyset pass never serves a record twice, so a record already
yielded in this pass is the sign of a restart: it is skipped, the restart counted, and reading
goes on until unseen records appear again. Cursors are never kept across passes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rillet_dagster.catalog import MAX_PAGE_SIZE, EntitySpec
from rillet_dagster.clock import parse_timestamp
from rillet_dagster.rillet.errors import (
    CursorRestartError,
    ValidationError,
)

if TYPE_CHECKING:
    from rillet_dagster.rillet.client import RilletClient


class RecordStream(Iterator[dict[str, Any]]):
    """The records of one list pass, lazily; ``watermark`` once the pass is complete.

    Attributes:
        complete: the last page was read (only then is ``watermark`` meaningful).
        restarts: how many times the list restarted at page 1 mid-pass.
        pages: pages requested in this pass.
        duplicates: records skipped because this pass had already yielded them.
    """

    def __init__(
        self,
        client: RilletClient,
        spec: EntitySpec,
        params: Mapping[str, str],
        updated_since: datetime | None,
    ) -> None:
        self.client = client
        self.spec = spec
        self.params = dict(params)
        self.updated_since = updated_since
        self.started_at = client.clock.now().astimezone(UTC)
        self.complete = False
        self.restarts = 0
        self.pages = 0
        self.duplicates = 0
        self.unidentified = 0  # records without a string id (yielded; the loader refuses them)
        self._max_updated: datetime | None = None
        self._seen: set[int | str] = set()
        self._iterator = self._records()

    def __iter__(self) -> RecordStream:
        return self

    def __contains__(self, record_id: object) -> bool:
        """Whether this pass has yielded the record with this id."""
        return isinstance(record_id, str) and _id_key(record_id) in self._seen

    def __next__(self) -> dict[str, Any]:
        return next(self._iterator)

    @property
    def watermark(self) -> datetime | None:
        """Where the next incremental pass should start (never behind ``updated_since``).

        For records with ``updated_at`` it is the largest one seen, but, for lists read in
        creation order, never later than this pass's start: a record updated mid-pass behind
        the read position would otherwise fall below the next pass's ``updated.gt``. Lists
        whose records carry no ``updated_at`` use the pass's start time.
        """
        if not self.complete:
            raise RuntimeError(
                "the watermark is known only after the pass has been read to the end"
            )
        if not self.spec.has_updated_at:
            candidate: datetime | None = self.started_at
        elif self._max_updated is None:
            candidate = None
        elif self.params.get("sort_by") == "updated":
            candidate = self._max_updated
        else:
            candidate = min(self._max_updated, self.started_at)
        if self.updated_since is not None and (candidate is None or candidate < self.updated_since):
            return self.updated_since
        return candidate

    def _records(self) -> Iterator[dict[str, Any]]:
        cursor: str | None = None
        stats = self.client.stats
        replaying = False  # inside a restart, re-reading pages this pass already yielded
        while True:
            query = dict(self.params)
            if self.spec.paginated:
                query["limit"] = str(MAX_PAGE_SIZE)
                if cursor:
                    query["cursor"] = cursor
            try:
                records, next_cursor = self.client.get_page(self.spec, query)
            except ValidationError as error:
                if cursor is None or not _is_cursor_expiry(error):
                    raise
                # Some deployments say so instead of restarting silently: restart ourselves.
                self._restart()
                cursor, replaying = None, True
                continue
            self.pages += 1
            duplicates_before = self.duplicates
            fresh = 0
            for record in records:
                if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                    # The loader refuses it by name and the sync sets it aside; a pass that met
                    # one cannot prove that a missing record was deleted.
                    self.unidentified += 1
                    stats.records += 1
                    yield record
                    continue
                key = _id_key(record["id"])
                if key in self._seen:
                    self.duplicates += 1
                    continue
                fresh += 1
                self._seen.add(key)
                self._track(record)
                stats.records += 1
                yield record
            if self.duplicates > duplicates_before and cursor is not None and not replaying:
                replaying = True
                self._restart()
            if fresh:
                replaying = False
            if not self.spec.paginated or not next_cursor:
                self.complete = True
                return
            cursor = next_cursor

    def _restart(self) -> None:
        self.restarts += 1
        self.client.stats.cursor_restarts += 1
        if self.restarts > self.client.max_cursor_restarts:
            raise CursorRestartError(
                f"Rillet GET {self.spec.path} restarted at page 1 {self.restarts} times "
                "in one pass (cursors expire after 2 hours); run the sync again"
            )

    def _track(self, record: Mapping[str, Any]) -> None:
        stamp = record.get("updated_at")
        if not self.spec.has_updated_at or not isinstance(stamp, str):
            return
        try:
            moment = parse_timestamp(stamp)
        except (ValueError, OverflowError):
            return  # the loader refuses the record, naming the field
        if self._max_updated is None or moment > self._max_updated:
            self._max_updated = moment


def _is_cursor_expiry(error: ValidationError) -> bool:
    text = " ".join(filter(None, (error.type, error.detail))).lower()
    return "cursor" in text and any(word in text for word in ("expired", "invalid", "unknown"))


def _id_key(record_id: str) -> int | str:
    """A compact, collision-free key for the seen-set (a UUID's 128-bit integer)."""
    try:
        return uuid.UUID(record_id).int
    except ValueError:
        return record_id
