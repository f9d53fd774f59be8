"""Liveness and readiness: `/healthz` says the process answers; `/readyz` checks what a request needs.

Neither waits for the model: while a server process loads it at start-up (fetching and converting it first
on a fresh home), `/healthz` answers as usual and `/readyz` answers 503 with status "loading" and the
model check saying what the load does and for how long it has run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from flask import Blueprint
from sqlalchemy import text

from service import context
from service.api.openapi import api_route
from service.protocol import Health, Ready, ReadyCheck
from service.store import db

bp = Blueprint("health", __name__)


@api_route(bp, "/healthz", "GET", summary="the process is alive (also while the model loads)", auth=False,
           responses={200: Health})
def healthz() -> Health:
    return Health(status="ok")


@api_route(bp, "/readyz", "GET", summary="database, Redis and the model are usable (\"loading\" while the model "
           "loads)", auth=False, responses={200: Ready, 503: Ready})
def readyz() -> tuple[Ready, int]:
    model, loading = _check_model()
    checks = {"database": _check_database(), "redis": _check_redis(), "model": model}
    ready = all(c.ok for c in checks.values())
    status: Literal["ready", "loading", "not_ready"] = "ready" if ready else "not_ready"
    if not ready and loading and all(c.ok for name, c in checks.items() if name != "model"):
        status = "loading"  # the model is the one thing missing, and it is on its way
    # Reported, not gating: one broken profile or a worker being restarted must not take the API out of
    # service (it still serves what it can).
    checks["artifacts"] = _check_artifacts()
    stack_status_file = context.settings().stack_status_file
    if stack_status_file:
        checks["stack"] = _check_stack(stack_status_file)
    return Ready(status=status, checks=checks, model=context.settings().model), 200 if ready else 503


def _check_database() -> ReadyCheck:
    try:
        with db.session_scope(context.settings()) as session:
            session.execute(text("SELECT 1"))
        url = context.settings().database_url
        if not db.is_current(url):
            return ReadyCheck(ok=False, detail="reachable, but not migrated to the newest revision")
        return ReadyCheck(ok=True, detail="reachable and migrated")
    except Exception as exc:
        return ReadyCheck(ok=False, detail=f"unreachable: {type(exc).__name__}")


def _check_redis() -> ReadyCheck:
    from service.redis import note_redis_error

    try:
        context.redis_client().ping()  # bounded by the client's timeouts (about a second)
        return ReadyCheck(ok=True, detail="reachable")
    except Exception as exc:
        note_redis_error(context.settings().redis_url)
        return ReadyCheck(ok=False, detail=f"unreachable: {type(exc).__name__}")


def _check_stack(path: str) -> ReadyCheck:
    """What `pluristeer up` reports of the processes it supervises (service.cli.stack.Supervisor)."""
    try:
        children = json.loads(Path(path).read_text())["children"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return ReadyCheck(ok=False, detail=f"no status from `pluristeer up`: {type(exc).__name__}")
    parts = []
    for name, child in children.items():
        part = f"{name} {child.get('state')}"
        if child.get("restarts"):
            part += f" (restarted {child['restarts']}x, last exit {child.get('last_exit')})"
        parts.append(part)
    return ReadyCheck(ok=all(c.get("state") == "running" for c in children.values()), detail="; ".join(parts))


def _check_artifacts() -> ReadyCheck:
    try:
        with db.session_scope(context.settings()) as session:
            broken = db.count_broken_artifacts(session)
    except Exception as exc:
        return ReadyCheck(ok=False, detail=f"unknown: {type(exc).__name__}")
    if broken:
        return ReadyCheck(ok=False, detail=f"{broken} profile(s) failed: their artifact is missing or corrupted "
                                           "(request them again to rebuild)")
    return ReadyCheck(ok=True, detail="no profile has a broken artifact")


def model_status(name: str) -> dict[str, Any]:
    """Where the configured model stands without loading it: cached on disk, a local path, or neither (read
    off the disk: no torch is imported, so a probe never waits for a load that is importing it)."""
    from steer_core.defaults import DEFAULT_MODEL, pluristeer_home

    if name == DEFAULT_MODEL:
        path = pluristeer_home() / "models" / DEFAULT_MODEL
        return {"available": (path / "model.safetensors").exists() or (path / "config.json").exists(),
                "where": str(path)}
    path = Path(name).expanduser()
    if path.exists():
        return {"available": True, "where": str(path)}
    return {"available": False, "where": "not on this disk (a hub id is fetched when first loaded)"}


def _check_model() -> tuple[ReadyCheck, bool]:
    """The model's check, and whether it is loading (a start-up load under way)."""
    state = context.state()
    if state.model_probe is not None:
        try:
            probe = state.model_probe()
        except Exception as exc:
            return ReadyCheck(ok=False, detail=f"the generation engine failed: {type(exc).__name__}: {exc}"), False
        if probe.get("loaded"):
            return ReadyCheck(ok=True, detail="loaded in this process"), False
        loading = probe.get("loading")
        if loading:
            return ReadyCheck(ok=False, detail=f"loading: {loading['phase']} ({loading['seconds']:.0f} s so far)"
                              + (f"; the last attempt failed: {probe['error']}" if probe.get("error") else "")), True
        if probe.get("error"):
            return ReadyCheck(ok=False, detail=str(probe["error"])), False
    status = model_status(state.settings.model)
    if status["available"]:
        return ReadyCheck(ok=True, detail=f"not loaded in this process; available at {status['where']}"), False
    return ReadyCheck(ok=False, detail=f"{state.settings.model}: {status['where']}"), False
