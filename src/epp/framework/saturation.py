"""The utilization saturation detector (GIE's default): an endpoint has room while its
waiting queue and KV usage are within thresholds and its metrics are fresh."""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework.config import SaturationConfig
from epp.types import Endpoint


class SaturationDetector:
    def __init__(self, config: SaturationConfig) -> None:
        self.config = config
        self._queue = float(max(config.queue_depth_threshold, 0))
        self._kv = config.kv_cache_util_threshold

    def saturation(self, endpoint: Endpoint, now: float) -> float:
        """max(waiting / queueDepthThreshold, kv_usage / kvCacheUtilThreshold); infinite for
        stale or never-scraped metrics. Above 1.0 the endpoint is saturated."""
        m = endpoint.metrics
        if m.age(now) > self.config.metrics_staleness_threshold_s:
            return float("inf")
        queue = m.waiting / self._queue if self._queue > 0 else (float("inf") if m.waiting else 0.0)
        return max(queue, m.kv_usage / self._kv)

    def all_saturated(self, endpoints: Sequence[Endpoint], now: float) -> bool:
        return all(self.saturation(e, now) > 1.0 for e in endpoints)
