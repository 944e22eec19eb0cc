"""The service's side of database maintenance: the policy from settings, and the
scheduler each worker runs (db/maintenance.py does the work)."""

from __future__ import annotations

from flask import Flask
from sqlalchemy import Engine

from api.settings import Settings
from db.maintenance import MaintenancePolicy, MaintenanceScheduler
from db.retention import RetentionPolicy


def policy_from(settings: Settings) -> MaintenancePolicy:
    return MaintenancePolicy(
        RetentionPolicy(settings.retention_days, settings.aggregate_retention_days),
        settings.compress_after_days,
    )


def start_scheduler(app: Flask, settings: Settings, engine: Engine) -> None:
    """Start this process's maintenance thread, unless the interval is 0."""
    if not settings.maintenance_interval_seconds:
        return
    scheduler = MaintenanceScheduler(
        engine, policy_from(settings), settings.maintenance_interval_seconds
    )
    app.extensions["telemetry.scheduler"] = scheduler
    scheduler.start()


def stop_scheduler(app: Flask) -> None:
    scheduler: MaintenanceScheduler | None = app.extensions.get("telemetry.scheduler")
    if scheduler is not None:
        scheduler.stop()
