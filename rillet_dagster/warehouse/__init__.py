"""The SQL warehouse: tables generated from the catalog, exact types, monotonic loads."""

from rillet_dagster.warehouse.load import (
    RecordSchemaError,
    UpsertResult,
    get_watermark,
    mark_missing_deleted,
    read_records,
    read_table,
    set_watermark,
    soft_delete,
    upsert_records,
    write_transaction,
)
from rillet_dagster.warehouse.schema import (
    METADATA,
    build_metadata,
    ensure_schema,
    make_engine,
    table_for,
    table_name,
)
from rillet_dagster.warehouse.types import ExactDecimal, UtcDateTime

__all__ = [
    "METADATA",
    "ExactDecimal",
    "RecordSchemaError",
    "UpsertResult",
    "UtcDateTime",
    "build_metadata",
    "ensure_schema",
    "get_watermark",
    "make_engine",
    "mark_missing_deleted",
    "read_records",
    "read_table",
    "set_watermark",
    "soft_delete",
    "table_for",
    "table_name",
    "upsert_records",
    "write_transaction",
]
