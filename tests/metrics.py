"""Reading Prometheus metrics in tests: from a registry in the test process, or from the
exposition text a server serves on /metrics (parsed by prometheus_client's own parser).

An absent sample reads as 0.0 (a counter nobody has incremented yet is not exported)."""

from __future__ import annotations

import urllib.request
from typing import Protocol

from prometheus_client import CollectorRegistry, Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["HasRegistry", "metric_families", "sample", "scrape", "total"]


class HasRegistry(Protocol):
    """An object holding its metrics' registry (KvindexMetrics, the picker's metrics, ...)."""

    @property
    def registry(self) -> CollectorRegistry: ...


def sample(source: str | CollectorRegistry | HasRegistry, name: str, /, **labels: str) -> float:
    """The value of sample ``name`` with exactly ``labels`` (0.0 when absent). ``source`` is a
    registry, an object with a ``registry``, or exposition text (e.g. from :func:`scrape`)."""
    if isinstance(source, str):
        for family in text_string_to_metric_families(source):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return 0.0
    registry = source if isinstance(source, CollectorRegistry) else source.registry
    value = registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def total(text: str, name: str) -> float:
    """The sum of sample ``name`` over all its label sets in exposition text."""
    return sum(
        float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def metric_families(text: str) -> dict[str, Metric]:
    """Exposition text by family name (counters without their ``_total``)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def scrape(url: str, timeout: float = 5.0) -> str:
    """GET a /metrics URL; the exposition text."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text: str = response.read().decode()
    return text
