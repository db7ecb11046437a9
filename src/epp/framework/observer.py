"""What the scheduler reports about itself. The server edge implements this to export
Prometheus series (`llm_d_epp_plugin_duration_seconds`, predicted/actual TTFT and TPOT); the
core only calls it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

# llm-d's `extension_point` label values.
FILTER = "Filter"
SCORER = "Scorer"
PICKER = "Picker"
PROFILE_PICKER = "ProfilePicker"
PROCESS_RESULTS = "ProcessProfilesResults"
PRE_REQUEST = "PreRequest"
PREPARE_DATA = "PrepareData"
ADMIT_REQUEST = "AdmitRequest"
RESPONSE_HEADERS = "ResponseReceived"
RESPONSE_COMPLETE = "ResponseComplete"


class SchedulerObserver(Protocol):
    def plugin_duration(
        self, extension_point: str, plugin_type: str, plugin_name: str, seconds: float
    ) -> None:
        """One plugin call took `seconds`."""
        ...

    def plugin_error(self, extension_point: str, plugin_type: str, plugin_name: str) -> None:
        """A plugin raised; the framework carried on without its contribution."""
        ...

    def latency_predicted(self, endpoint_key: str, metric: str, seconds: float) -> None:
        """The latency model predicted `metric` ("ttft" or "tpot") for the picked endpoint."""
        ...

    def latency_observed(
        self, endpoint_key: str, metric: str, predicted_s: float | None, actual_s: float
    ) -> None:
        """A response measured `metric`; `predicted_s` is what was predicted at pick time."""
        ...


@dataclass
class RecordingObserver:
    """Keeps everything in lists: for tests, and as a simple in-process sink."""

    durations: list[tuple[str, str, str, float]] = field(default_factory=list)
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    predictions: list[tuple[str, str, float]] = field(default_factory=list)
    observations: list[tuple[str, str, float | None, float]] = field(default_factory=list)

    def plugin_duration(
        self, extension_point: str, plugin_type: str, plugin_name: str, seconds: float
    ) -> None:
        self.durations.append((extension_point, plugin_type, plugin_name, seconds))

    def plugin_error(self, extension_point: str, plugin_type: str, plugin_name: str) -> None:
        self.errors.append((extension_point, plugin_type, plugin_name))

    def latency_predicted(self, endpoint_key: str, metric: str, seconds: float) -> None:
        self.predictions.append((endpoint_key, metric, seconds))

    def latency_observed(
        self, endpoint_key: str, metric: str, predicted_s: float | None, actual_s: float
    ) -> None:
        self.observations.append((endpoint_key, metric, predicted_s, actual_s))
