"""`/healthz`, `/readyz` and `/metrics`."""

from __future__ import annotations

import dataclasses
import re

from api_helpers import make_group, mark_ready, request_profile

from service import create_app
from service.queue import queue_depths
from service.store import db


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in the Prometheus text format."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+-]+)"
    match = re.search(r"^" + pattern + r"$", text, re.M)
    assert match, f"{name}{{{want}}} not in metrics"
    return float(match.group(1))


def test_healthz_and_readyz(client, settings):
    assert client.get("/healthz").json == {"status": "ok"}
    r = client.get("/readyz")
    checks = r.json["checks"]
    assert checks["database"]["ok"] and checks["redis"]["ok"]
    assert r.status_code == (200 if checks["model"]["ok"] else 503)


def test_readyz_follows_whether_the_configured_model_is_on_disk(settings, tmp_path):
    """No model is loaded in an API test: the model check is ready exactly when the configured model is on
    this disk, which the test arranges both ways."""
    present = tmp_path / "model"
    present.mkdir()
    (present / "config.json").write_text("{}")
    for model, ready in ((present, True), (tmp_path / "absent", False)):
        app = create_app({"SETTINGS": dataclasses.replace(settings, model=str(model)), "TESTING": True})
        r = app.test_client().get("/readyz")
        check = r.json["checks"]["model"]
        assert check["ok"] is ready and r.status_code == (200 if ready else 503)
        assert ("not loaded in this process" in check["detail"]) is ready


def test_readyz_reports_an_unmigrated_database(settings, tmp_path):
    empty = dataclasses.replace(settings, database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    r = create_app({"SETTINGS": empty, "TESTING": True}).test_client().get("/readyz")
    assert r.status_code == 503
    assert not r.json["checks"]["database"]["ok"] and "migrated" in r.json["checks"]["database"]["detail"]
    db.dispose_engines(empty.database_url)


def test_metrics_count_requests_builds_queue_and_cache(settings, auth):
    app = create_app({"SETTINGS": dataclasses.replace(settings, metrics_token="scrape-me"), "TESTING": True})
    client = app.test_client()
    make_group(client, auth)
    client.get("/v1/users/nobody", headers=auth)
    client.get("/v1/users/nobody2", headers=auth)
    pid = request_profile(client, auth).json["id"]
    request_profile(client, auth, params={"layer": 2})
    sha = mark_ready(settings, pid)
    with app.app_context():
        from service import context

        cache = context.profile_cache()
        cache.forget(sha)
        cache.load(sha)  # from the store
        cache.load(sha)  # from the LRU

    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth).status_code == 401  # a tenant's key is not the metrics token
    text = client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).data.decode()
    assert sample(text, "pluristeer_http_requests_total", method="GET", route="/v1/users/<uid>", status="404") == 2
    assert sample(text, "pluristeer_http_requests_total", method="POST", route="/v1/profiles", status="202") == 2
    assert sample(text, "pluristeer_http_request_duration_seconds_count", method="PUT",
                  route="/v1/groups/<gid>") == 1
    assert sample(text, "pluristeer_profiles", status="queued") == 1
    assert sample(text, "pluristeer_profiles", status="ready") == 1
    depths = queue_depths(settings)
    assert sample(text, "pluristeer_build_queue_depth", queue="cpu") == depths["cpu"]
    assert sample(text, "pluristeer_profile_cache_misses_total") == 1
    assert sample(text, "pluristeer_profile_cache_hits_total", layer="lru") == 1
    assert sample(text, "pluristeer_dependency_up", dependency="database") == 1


def test_metrics_without_a_token_carry_no_cross_tenant_counts(client, auth):
    make_group(client, auth)
    request_profile(client, auth)
    r = client.get("/metrics")
    assert r.status_code == 200
    text = r.data.decode()
    assert "pluristeer_profiles{" not in text and "pluristeer_http_requests_total" in text


def test_creating_the_app_touches_nothing(tmp_path, caplog):
    from service.settings import Settings

    db_file = tmp_path / "never.db"
    settings = Settings.from_env(home=tmp_path, database_url=f"sqlite:///{db_file}",
                                 redis_url="redis://127.0.0.1:1/0", artifact_dir=tmp_path / "artifacts")
    with caplog.at_level("WARNING"):
        app = create_app({"SETTINGS": settings, "TESTING": True})
    assert not db_file.exists() and not (tmp_path / "artifacts").exists()
    assert [r for r in caplog.records if r.name.startswith("service")] == []
    assert app.test_client().get("/healthz").status_code == 200
