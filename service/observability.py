"""What `/metrics` (`service.api.metrics`) serves in the Prometheus text format: request counts and
latencies, build queue depth, profile cache hits and misses, profiles by status, rate-limit outcomes.

Each app has its own registry (tests create many apps). Counters are per process; with several gunicorn
workers each scrape sees the process that answered it, so scrape the workers separately or run one.
Queue depth and profiles by status are read from Redis and the database at scrape time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from service import context
from service.store import db

log = logging.getLogger(__name__)

EXTENSION = "pluristeer.metrics"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, app: Flask) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("pluristeer_http_requests", "HTTP requests by route, method and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("pluristeer_http_request_duration_seconds", "HTTP request latency by route",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rate_limit = Counter("pluristeer_rate_limit_decisions", "rate-limit outcomes that were not a "
                                  "plain pass (limited, redis_unavailable)", ["outcome"],
                                  registry=self.registry)
        self.registry.register(_StateCollector(app))


class _StateCollector(Collector):
    """Values read at scrape time from the app's Redis, database and profile cache."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def describe(self) -> list[Any]:
        # Nothing up front: registering must not touch Redis or the database (creating the app starts
        # nothing); the families are built at scrape time.
        return []

    def collect(self) -> Iterator[Any]:
        state = context.state(self.app)
        settings = state.settings

        depth = GaugeMetricFamily("pluristeer_build_queue_depth", "build messages waiting per queue",
                                  labels=["queue"])
        up = GaugeMetricFamily("pluristeer_dependency_up", "1 when a dependency answered this scrape",
                               labels=["dependency"])
        try:
            from service.queue import queue_depths

            for queue, n in queue_depths(settings).items():
                depth.add_metric([queue], n)
            up.add_metric(["redis"], 1)
        except Exception as exc:  # Redis down: report it, do not fail the scrape
            log.warning("metrics: queue depth unavailable: %s", exc)
            up.add_metric(["redis"], 0)
        yield depth

        if settings.metrics_token:  # counts over all tenants: only behind the metrics token
            profiles = GaugeMetricFamily("pluristeer_profiles", "profiles by build status (all tenants)",
                                         labels=["status"])
            try:
                with db.session_scope(settings) as session:
                    for status, n in db.count_profiles_by_status(session).items():
                        profiles.add_metric([status], n)
                up.add_metric(["database"], 1)
            except Exception as exc:
                log.warning("metrics: profile counts unavailable: %s", exc)
                up.add_metric(["database"], 0)
            yield profiles
        yield up

        cache = state.cache_if_started()
        stats = cache.stats() if cache is not None else {}
        hits = CounterMetricFamily("pluristeer_profile_cache_hits", "profile loads served from a cache",
                                   labels=["layer"])
        hits.add_metric(["lru"], stats.get("lru_hits", 0))
        hits.add_metric(["redis"], stats.get("redis_hits", 0))
        yield hits
        yield CounterMetricFamily("pluristeer_profile_cache_misses",
                                  "profile loads that read the artifact store", value=stats.get("misses", 0))
        yield CounterMetricFamily("pluristeer_profile_cache_redis_errors",
                                  "Redis errors in the profile cache", value=stats.get("redis_errors", 0))
        yield CounterMetricFamily("pluristeer_profile_cache_corrupted",
                                  "cached or stored artifacts whose sha256 did not match",
                                  value=stats.get("corrupted", 0))
        yield GaugeMetricFamily("pluristeer_profile_cache_lru_entries", "profiles in this process's LRU",
                                value=stats.get("lru_size", 0))


def init_app(app: Flask) -> None:
    metrics = Metrics(app)
    app.extensions[EXTENSION] = metrics

    @app.before_request
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _record(response: Response) -> Response:
        started = g.get("request_started")
        if started is not None:
            # The url rule, not the path: one series per route, not per user id.
            route = request.url_rule.rule if request.url_rule is not None else "unmatched"
            metrics.requests.labels(request.method, route, str(response.status_code)).inc()
            metrics.latency.labels(request.method, route).observe(time.perf_counter() - started)
        return response


def record_rate_limit(outcome: str) -> None:
    metrics: Metrics | None = current_app.extensions.get(EXTENSION)
    if metrics is not None:
        metrics.rate_limit.labels(outcome).inc()

