"""The Definitions object: every asset, job, schedule, sensor and resource, assembled here."""

from __future__ import annotations

import dagster as dg
from sqlalchemy.engine import make_url

from rillet_dagster.assets.checks import build_checks
from rillet_dagster.assets.entities import build_entity_assets, daily_partitions
from rillet_dagster.assets.models import MODEL_ASSETS
from rillet_dagster.assets.reconciliation import reconciliation_asset
from rillet_dagster.assets.reports import build_report_assets
from rillet_dagster.automation.jobs import refresh_models, sync_all
from rillet_dagster.automation.report_schedules import build_report_jobs, build_report_schedules
from rillet_dagster.automation.retention import purge_job, purge_schedule
from rillet_dagster.automation.schedules import hourly_backstop
from rillet_dagster.automation.sensors import build_report_sensors, models_after_sync_sensor
from rillet_dagster.automation.webhook_sensor import webhook_job, webhook_sensor
from rillet_dagster.resources import RilletResource, WarehouseResource
from rillet_dagster.settings import API_KEY_VAR, STATE_URL_VAR, WAREHOUSE_URL_VAR, Settings


def config_url(url: str, variable: str) -> str | dg.EnvVar:
    """A database URL as resource config: with a password, the environment variable's name
    (what the UI, run config and logs show) instead of its value."""
    if make_url(url).password is None:
        return url
    return dg.EnvVar(variable)


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.from_env()
    partitions = daily_partitions(settings)
    entity_assets = build_entity_assets(settings)
    apply_events = webhook_job(entity_assets)
    purge_events = purge_job(settings)
    return dg.Definitions(
        assets=[
            *entity_assets,
            *build_report_assets(settings),
            *MODEL_ASSETS,
            reconciliation_asset(settings),
        ],
        asset_checks=build_checks(settings),
        jobs=[sync_all, refresh_models, apply_events, purge_events, *build_report_jobs()],
        schedules=[
            hourly_backstop(partitions),
            *build_report_schedules(settings),
            purge_schedule(purge_events),
        ],
        sensors=[
            *build_report_sensors(settings),
            webhook_sensor(entity_assets, apply_events),
            models_after_sync_sensor(),
        ],
        resources={
            "rillet": RilletResource(
                base_url=settings.base_url,
                api_key=dg.EnvVar(API_KEY_VAR) if settings.has_api_key else "",
                api_version=settings.api_version,
                state_url=config_url(settings.state_url, STATE_URL_VAR),
                rate_limit_requests=settings.rate_limit.requests,
                rate_limit_window_seconds=settings.rate_limit.window_seconds,
                tls_verify=settings.tls_verify,
                ca_bundle=settings.ca_bundle,
            ),
            "warehouse": WarehouseResource(
                url=config_url(settings.warehouse_url, WAREHOUSE_URL_VAR)
            ),
        },
    )


defs = build_definitions()
