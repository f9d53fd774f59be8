"""The A/B part of `pluristeer demo` against a live server: it builds two profiles, runs its simulated
population through chat, and its results table shows the preferred variant winning.

A tiny random model generates (the demo's feedback depends on the variant, not on the text), so the
profiles the demo asks for are finished by a stand-in for the worker that stores a ready artifact for
the tiny model, exactly as `worker/tasks.py` leaves a row, and runs the offline comparison with the
worker's own task; the real worker is tested in test_worker*.py."""

from __future__ import annotations

import threading

import pytest
import torch
from api_helpers import mark_ready
from sqlalchemy import select

from service.api import chat
from service.cli.demo_ab import OTHER, PREFERRED, run_ab_demo
from service.queue import OFFLINE_TASK, create_celery
from service.store import db
from steer_core.profile import Profile
from worker import lifecycle

pytestmark = [pytest.mark.service, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]


def finish_builds(settings, lm, stop: threading.Event) -> None:
    """Mark every queued profile ready with a constant-vector artifact for `lm`; run every queued offline
    comparison with the worker's own task (eagerly, on `lm`)."""
    worker_app = create_celery(settings)
    worker_app.loader.import_default_modules()
    while not stop.wait(0.2):
        with db.session_scope(settings) as session:
            comparisons = list(session.scalars(select(db.OfflineComparisonRow.id).where(
                db.OfflineComparisonRow.status == "queued")))
        for comparison_id in comparisons:
            worker_app.tasks[OFFLINE_TASK].apply(args=[comparison_id])
        with db.session_scope(settings) as session:
            queued = list(session.scalars(select(db.ProfileRow.id).where(db.ProfileRow.status == "queued")))
        for seed, pid in enumerate(queued):
            vector = 4.0 * torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(seed))
            profile = Profile(method="diffmean", model_name=settings.model, model_fingerprint=lm.fingerprint,
                              layer=lm.num_layers // 2, positions="prompt", strength=1.0,
                              tensors={"vector": vector})
            mark_ready(settings, pid, profile.to_bytes())


def test_the_ab_demo_shows_the_preferred_variant_winning(settings, tenant_key, tiny_lm, capsys, monkeypatch):
    from werkzeug.serving import make_server

    from service import create_app

    monkeypatch.setitem(lifecycle._models, settings.model, tiny_lm)  # the stand-in worker's model
    app = create_app({"SETTINGS": settings, "TESTING": True, "GENERATION_MODEL": tiny_lm})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threads = [threading.Thread(target=server.serve_forever, daemon=True)]
    stop = threading.Event()
    threads.append(threading.Thread(target=finish_builds, args=(settings, tiny_lm, stop), daemon=True))
    for t in threads:
        t.start()
    lines: list[str] = []
    try:
        code = run_ab_demo(f"http://127.0.0.1:{server.server_port}", tenant_key, say=lines.append)
    finally:
        stop.set()
        server.shutdown()
        for t in threads:
            t.join(10)
        chat.stop_engine(app)
    text = "\n".join(lines)
    assert code == 0, text
    rows = {line.split()[0]: line.split() for line in text.splitlines()
            if line.split()[:1] in ([PREFERRED], [OTHER]) and len(line.split()) >= 7}  # the table, not offline
    # variant, exposures, feedback, thumbs up, [low, high], difference to the control, p-value
    assert rows[OTHER][6] == "control"
    assert float(rows[PREFERRED][6]) > 0 and float(rows[PREFERRED][7]) < 0.05
    assert int(rows[PREFERRED][1]) + int(rows[OTHER][1]) == 120  # exposures: one chat per simulated user
    assert f"winner: {PREFERRED}" in text
    assert "offline: alignment on" in text
