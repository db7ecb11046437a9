"""Online latency model for predicted-latency routing: TTFT and TPOT per endpoint as a
linear function of request and load features, learned by recursive least squares."""

from epp.latency.model import FEATURES, LatencyModel, LatencyPrediction, RecursiveLeastSquares
from epp.latency.store import LatencyModelFormatError, load_model, save_model

__all__ = [
    "FEATURES",
    "LatencyModel",
    "LatencyModelFormatError",
    "LatencyPrediction",
    "RecursiveLeastSquares",
    "load_model",
    "save_model",
]
