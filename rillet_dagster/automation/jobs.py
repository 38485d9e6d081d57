"""Jobs: what a person (or a schedule) launches."""

from __future__ import annotations

import dagster as dg

ENTITY_GROUPS = ("rillet_entities", "rillet_reports")

# In one process: the steps wait on the same rate budget anyway, and a subprocess per step
# would spend more time importing than syncing.
sync_all = dg.define_asset_job(
    "sync_all",
    executor_def=dg.in_process_executor,
    # The report snapshots share the rillet_reports group but are partitioned by period x
    # subsidiary; they have their own jobs (automation/report_schedules.py).
    selection=dg.AssetSelection.groups(*ENTITY_GROUPS)
    - dg.AssetSelection.key_prefixes(["rillet", "reports"]),
    description="Sync every Rillet entity into the warehouse (incremental ones for the chosen "
    "days; one API pass whatever the range).",
    tags={"rillet/trigger": "manual"},
)
