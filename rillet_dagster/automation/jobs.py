"""Jobs: what a person, a schedule or a sensor launches.

Every job runs in one process: the steps wait on the same rate budget or the same warehouse
anyway, and a subprocess per step would spend more time importing than working.
"""

from __future__ import annotations

import dagster as dg

from rillet_dagster.assets.models import MODEL_ASSETS

ENTITY_GROUPS = ("rillet_entities", "rillet_reports")
SYNC_ALL = "sync_all"
REFRESH_MODELS = "refresh_models"
# A sync someone launched (or the hourly backstop) goes ahead of report backfills (priority 0),
# behind webhook runs (10), which take a second or two.
SYNC_PRIORITY = "5"

sync_all = dg.define_asset_job(
    SYNC_ALL,
    executor_def=dg.in_process_executor,
    # The report snapshots share the rillet_reports group but are partitioned by period x
    # subsidiary; they have their own jobs (automation/report_schedules.py).
    selection=dg.AssetSelection.groups(*ENTITY_GROUPS)
    - dg.AssetSelection.key_prefixes(["rillet", "reports"]),
    description="Sync every Rillet entity into the warehouse (incremental ones for the chosen "
    "days; one API pass whatever the range).",
    tags={"rillet/trigger": "manual", "dagster/priority": SYNC_PRIORITY},
)

refresh_models = dg.define_asset_job(
    REFRESH_MODELS,
    executor_def=dg.in_process_executor,
    selection=dg.AssetSelection.assets(*MODEL_ASSETS),
    description="Rebuild the analyst models (general ledger, account balances, AR aging, revenue "
    "by customer and month) from the synced tables and run their checks. Launched after every "
    "successful sync_all.",
    tags={"rillet/trigger": "after_sync"},
)
