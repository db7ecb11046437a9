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

    def pool_saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        """Mean over `endpoints` of each one's saturation, a stale one counting 1.0 (as
        llm-d's utilization-detector); 1.0 for no endpoints."""
        if not endpoints:
            return 1.0
        # `saturation` inlined: this runs for every request when flow control is on.
        stale_after = self.config.metrics_staleness_threshold_s
        queue, kv = self._queue, self._kv
        total = 0.0
        for e in endpoints:
            m = e.metrics
            if m.updated_at == 0.0 or now - m.updated_at > stale_after:
                total += 1.0
                continue
            if queue > 0:
                total += max(m.waiting / queue, m.kv_usage / kv)
            else:
                total += 1.0 if m.waiting else m.kv_usage / kv
        return total / len(endpoints)

    def all_saturated(self, endpoints: Sequence[Endpoint], now: float) -> bool:
        return all(self.saturation(e, now) > 1.0 for e in endpoints)
