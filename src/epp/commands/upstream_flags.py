"""llm-d-router's command-line flags on `epp serve`, with llm-d's meaning, so the picker runs
under llm-d's Helm chart unchanged (the chart passes `--pool-name`, `--pool-group`,
`--zap-encoder json`, `--config-file`, `--tracing=false`, `--v=N`, ...).

Go's flag syntax is accepted where it differs from argparse's: booleans as `--flag`,
`--flag=true|false`; `-v=2` as well as `-v 2`. A flag whose feature the picker implements
maps to it; a flag it accepts without acting on is named in one WARNING line at start-up
(`not_acted_on`), never dropped silently. docs/epp-server.md lists them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass

from epp.framework.params import parse_duration

# The InferencePool groups the picker's watcher reads (epp.discovery.kubernetes).
POOL_GROUPS = ("inference.networking.k8s.io", "inference.networking.x-k8s.io")
# llm-d's default when --pool-namespace is empty: the NAMESPACE env var, then this.
DEFAULT_POOL_NAMESPACE = "default"
# llm-d's deprecated metric-name flags: the scraper reads vLLM's and SGLang's names itself.
METRIC_NAME_FLAGS = (
    "total_queued_requests_metric",
    "total_running_requests_metric",
    "kv_cache_usage_percentage_metric",
    "lora_info_metric",
    "cache_info_metric",
)
# llm-d flags accepted without effect here, with why (for the start-up line and the docs).
INERT_FLAGS: dict[str, str] = {
    "ha_enable_leader_election": "every replica serves (no leader election)",
    "enable_pprof": "no pprof handlers",
    "enable_cert_reload": "certificates are read once at start",
    "health_checking": "health is always served on the health port",
    "disable_endpoint_subset_filter": "the subset hint is always honoured",
    "refresh_prometheus_metrics_interval": "metrics are computed when scraped",
    "metrics_staleness_threshold": "staleness comes from saturationDetector in the config",
    "model_server_metrics_scheme": "engines are scraped over http",
    "model_server_metrics_path": "engines are scraped at /metrics",
    "model_server_metrics_port": "engines are scraped on their serving port",
    "model_server_metrics_https_insecure_skip_verify": "engines are scraped over http",
    "zap_devel": "one log format per --zap-encoder",
    "zap_stacktrace_level": "tracebacks are logged with errors",
    "zap_time_encoding": "times are ISO 8601",
}


def go_bool(text: str) -> bool:
    """A Go flag boolean: 1, t, true, 0, f, false (any case)."""
    value = text.strip().lower()
    if value in ("1", "t", "true"):
        return True
    if value in ("0", "f", "false"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def go_int(text: str) -> int:
    # `-v=2` reaches argparse as the value "=2".
    try:
        return int(text.lstrip("="))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def go_duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bool_flag(group: argparse._ArgumentGroup, name: str, help: str) -> None:
    # `--flag` is true, `--flag=false` false; None: not given (llm-d's default applies).
    group.add_argument(name, nargs="?", const=True, default=None, type=go_bool, help=help)


def add_upstream_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "llm-d-router flags", "accepted with llm-d's meaning (docs/epp-server.md)"
    )
    g.add_argument("--config-file", help="EndpointPickerConfig file (llm-d's name for --config)")
    g.add_argument("--config-text", help="EndpointPickerConfig as text, in lieu of a file")
    g.add_argument(
        "--pool-group",
        default=POOL_GROUPS[0],
        choices=POOL_GROUPS,
        help="InferencePool API group (%(default)s)",
    )
    g.add_argument("--endpoint-selector", help="llm-d's standalone mode: not supported here")
    g.add_argument("--endpoint-target-ports", help="with --endpoint-selector: not supported")
    g.add_argument("-v", "--v", dest="verbosity", type=go_int, help="llm-d log verbosity")
    g.add_argument(
        "--zap-encoder", choices=("json", "console"), help="log format (llm-d: json, console)"
    )
    g.add_argument("--zap-log-level", help="debug, info, error, or a verbosity number")
    _bool_flag(g, "--tracing", "emit traces (llm-d default true; not implemented here)")
    _bool_flag(g, "--metrics-endpoint-auth", "Kubernetes authn/z on /metrics (not enforced)")
    g.add_argument(
        "--refresh-metrics-interval",
        type=go_duration,
        help="engine metrics scrape tick as a Go duration (sets --metrics-interval)",
    )
    for name in METRIC_NAME_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), help=argparse.SUPPRESS)
    for name in INERT_FLAGS:
        flag = "--" + name.replace("_", "-")
        if name in _VALUED_INERT_FLAGS:
            g.add_argument(flag, type=_VALUED_INERT_FLAGS[name], help=argparse.SUPPRESS)
        else:
            _bool_flag(g, flag, argparse.SUPPRESS)


# The inert flags that take a value (the others are booleans), with their value types.
_VALUED_INERT_FLAGS: dict[str, Callable[[str], object]] = {
    "refresh_prometheus_metrics_interval": go_duration,
    "metrics_staleness_threshold": go_duration,
    "model_server_metrics_scheme": str,
    "model_server_metrics_path": str,
    "model_server_metrics_port": go_int,
    "zap_stacktrace_level": str,
    "zap_time_encoding": str,
}


@dataclass(frozen=True)
class UpstreamSettings:
    config_source: str | None
    pool_namespace: str
    log_level: int
    json_logs: bool
    metrics_interval_s: float | None
    not_acted_on: tuple[str, ...]  # one phrase per flag accepted without effect


def resolve(args: argparse.Namespace) -> UpstreamSettings:
    """Check and combine the llm-d flags with ours; raises SystemExit as llm-d's validation."""
    sources = [
        (flag, value)
        for flag, value in (
            ("--config", args.config),
            ("--config-file", args.config_file),
            ("--config-text", args.config_text),
        )
        if value
    ]
    if len(sources) > 1:
        raise SystemExit(
            f"epp serve: {' and '.join(f for f, _ in sources)} cannot be set at the same time"
        )
    config_source = sources[0][1] if sources else None
    if args.endpoint_selector or args.endpoint_target_ports:
        raise SystemExit(
            "epp serve: --endpoint-selector (llm-d's standalone mode) is not supported; "
            "use --pool-name, --endpoints or --endpoints-file"
        )
    namespace = args.pool_namespace or os.environ.get("NAMESPACE") or DEFAULT_POOL_NAMESPACE
    not_acted: list[str] = []
    if args.tracing:
        not_acted.append("--tracing: no traces are emitted")
    # llm-d's default is true; the chart turns it off only with monitoring auth disabled.
    if args.metrics_endpoint_auth is not False:
        not_acted.append(
            "--metrics-endpoint-auth: /metrics is served without Kubernetes authn/z "
            "(restrict it with a NetworkPolicy)"
        )
    if args.pool_group != POOL_GROUPS[0]:
        not_acted.append(
            f"--pool-group {args.pool_group}: the watcher reads both {' and '.join(POOL_GROUPS)}"
        )
    for name in METRIC_NAME_FLAGS:
        value = getattr(args, name)
        if value is not None:
            not_acted.append(
                f"--{name.replace('_', '-')}={value}: the scraper reads vLLM's and SGLang's "
                "metric names itself"
            )
    for name, why in INERT_FLAGS.items():
        value = getattr(args, name)
        if value is not None and value is not False:
            not_acted.append(f"--{name.replace('_', '-')}: {why}")
    return UpstreamSettings(
        config_source=config_source,
        pool_namespace=namespace,
        log_level=_log_level(args),
        json_logs=args.zap_encoder == "json",
        metrics_interval_s=args.refresh_metrics_interval,
        not_acted_on=tuple(not_acted),
    )


def _log_level(args: argparse.Namespace) -> int:
    # llm-d's verbosity: 2 is its default (info), 4 debug, 5 trace; zap levels by name.
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    if args.verbosity is not None:
        level = logging.DEBUG if args.verbosity >= 4 else logging.INFO
    if args.zap_log_level:
        name = str(args.zap_log_level).lower()
        if name.lstrip("-").isdigit():
            level = logging.DEBUG if int(name) >= 4 or int(name) <= -4 else logging.INFO
        else:
            level = {"debug": logging.DEBUG, "info": logging.INFO, "error": logging.ERROR}.get(
                name, level
            )
    return level


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, as llm-d's `--zap-encoder json` (level, ts, logger, msg)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "level": record.levelname.lower(),
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def tls_files(cert_path: str | None, key_path: str | None) -> tuple[str | None, str | None]:
    """llm-d's `--cert-path` is a directory holding tls.crt and tls.key; ours may also be the
    certificate file itself with `--key-path`."""
    if cert_path and key_path is None and pathlib.Path(cert_path).is_dir():
        directory = pathlib.Path(cert_path)
        return str(directory / "tls.crt"), str(directory / "tls.key")
    return cert_path, key_path
