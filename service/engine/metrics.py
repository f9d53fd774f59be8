"""The engine's Prometheus metrics, read from its counters at every scrape (`/metrics`). Torch-free."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.engine.client import EngineClient


class EngineCollector:
    """A Prometheus collector over the process's engine (nothing while none is started)."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        eng = self.client.engine
        stats = eng.stats if eng is not None else None
        yield GaugeMetricFamily("pluristeer_generation_active_rows", "rows in the engine's running batch",
                                value=stats.active_rows if stats else 0)
        yield GaugeMetricFamily("pluristeer_generation_queued", "generation requests waiting for a batch slot",
                                value=eng.queue_depth() if eng is not None else 0)
        yield CounterMetricFamily("pluristeer_generation_tokens", "tokens generated",
                                  value=stats.tokens if stats else 0)
        yield CounterMetricFamily("pluristeer_generation_steps", "decode steps run", value=stats.steps if stats else 0)
        yield CounterMetricFamily("pluristeer_generation_refused", "chat and score requests refused at once (503) "
                                  "because MAX_BATCH_SIZE were in flight in this process", value=self.client.refused)
        finished = CounterMetricFamily("pluristeer_generation_requests", "generation requests finished",
                                       labels=["outcome"])
        if stats:
            finished.add_metric(["rejected"], stats.rejected)
            finished.add_metric(["expired"], stats.expired)
            finished.add_metric(["failed"], stats.failed - stats.expired)
            finished.add_metric(["cancelled"], stats.cancelled)
            finished.add_metric(["completed"], stats.finished - stats.failed - stats.cancelled)
        yield finished
