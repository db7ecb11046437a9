"""Every overlay in deploy/ renders, validates against the Kubernetes schemas, and is wired
consistently: selectors, ports, RBAC, vLLM's KV-event flags and the picker's config."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.envoy.render import render as render_envoy
from epp.discovery.kubernetes import REQUIRED_RBAC
from epp.framework import load_config
from epp.plugins import default_registry
from tests.deploy.k8s_schema import SchemaError, validate
from tests.deploy.kustomize_lite import render, strategic_merge

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
Obj = dict[str, Any]


def test_all_overlays_present() -> None:
    assert OVERLAYS == ["in-memory", "index-sidecar", "redis-ha", "standalone-envoy"]


@pytest.fixture(params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return request.param, render(DEPLOY / "overlays" / request.param)


def _by_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def _one(objects: list[Obj], kind: str, name: str) -> Obj:
    (obj,) = [o for o in _by_kind(objects, kind) if o["metadata"]["name"] == name]
    return obj


def _workloads(objects: list[Obj]) -> list[Obj]:
    return _by_kind(objects, "Deployment") + _by_kind(objects, "StatefulSet")


def _containers(workload: Obj) -> list[Obj]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def _selected(objects: list[Obj], selector: dict[str, str]) -> list[Obj]:
    return [
        w
        for w in _workloads(objects)
        if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
    ]


def _container_ports(workload: Obj) -> dict[Any, int]:
    """Port names and numbers of all containers of a pod template -> number."""
    ports: dict[Any, int] = {}
    for container in _containers(workload):
        for port in container.get("ports", []):
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                assert port["name"] not in ports, f"duplicate port name {port['name']}"
                ports[port["name"]] = port["containerPort"]
    return ports


def test_objects_validate_against_schemas(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    for obj in objects:
        validate(obj)
        assert obj["metadata"]["namespace"] == "llm"


def test_validator_rejects_bad_objects() -> None:
    with pytest.raises(SchemaError, match="unknown field 'replica'"):
        validate(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "x"},
                "spec": {"replica": 1},
            }
        )
    with pytest.raises(SchemaError, match="expected int"):
        validate(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "x"},
                "spec": {"ports": [{"port": "80"}]},
            }
        )
    with pytest.raises(SchemaError, match=r"(?s)V1DeploymentSpec.*selector"):
        validate(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "x"},
                "spec": {"template": {}},
            }
        )
    pool = {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "p"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "targetPorts": [{"number": 8000}] * 2,
            "endpointPickerRef": {"name": "e"},
        },
    }
    with pytest.raises(SchemaError, match="unique"):
        validate(pool)


def test_selectors_match_pod_labels(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    for workload in _workloads(objects):
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    for service in _by_kind(objects, "Service"):
        assert _selected(objects, service["spec"]["selector"]), service["metadata"]["name"]
    (pool,) = _by_kind(objects, "InferencePool")
    (vllm,) = _selected(objects, pool["spec"]["selector"]["matchLabels"])
    assert vllm["metadata"]["name"] == "vllm"


def test_service_ports_match_container_ports(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    for service in _by_kind(objects, "Service"):
        for workload in _selected(objects, service["spec"]["selector"]):
            ports = _container_ports(workload)
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert target in ports, (service["metadata"]["name"], target)


def test_pool_ports_and_picker_reference(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    (pool,) = _by_kind(objects, "InferencePool")
    (vllm,) = _selected(objects, pool["spec"]["selector"]["matchLabels"])
    ports = _container_ports(vllm)
    for target in pool["spec"]["targetPorts"]:
        assert target["number"] in ports
    ref = pool["spec"]["endpointPickerRef"]
    service = _one(objects, "Service", ref["name"])
    grpc = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert grpc and grpc[0]["targetPort"] == "grpc"
    (picker,) = _selected(objects, service["spec"]["selector"])
    epp = next(c for c in _containers(picker) if c["name"] == "epp")
    assert f"--pool-name={pool['metadata']['name']}" in epp["args"]
    assert f"--grpc-port={_container_ports(picker)['grpc']}" in epp["args"]


def test_picker_rbac_is_exactly_what_it_watches(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    (role,) = _by_kind(objects, "Role")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {(g, r, v) for (g, r), verbs in REQUIRED_RBAC.items() for v in verbs}
    (binding,) = _by_kind(objects, "RoleBinding")
    (picker,) = [w for w in _workloads(objects) if w["metadata"]["name"] == "epp"]
    account = picker["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "llm"}]
    assert _one(objects, "ServiceAccount", account)


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def test_vllm_kv_events_wiring(rendered: tuple[str, list[Obj]]) -> None:
    overlay, objects = rendered
    vllm = _one(objects, "Deployment", "vllm")
    (container,) = _containers(vllm)
    args = container["args"]
    config = json.loads(_flag(args, "kv-events-config"))
    assert config["enable_kv_cache_events"] is True and config["publisher"] == "zmq"
    port, model = _flag(args, "port"), _flag(args, "model")
    assert config["topic"] == f"kv@$(POD_IP):{port}@{model}"
    env = {e["name"]: e for e in container["env"]}
    for var in re.findall(r"\$\((\w+)\)", " ".join(args)):
        assert var in env, f"args use $({var}) but the container does not define it"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["PYTHONHASHSEED"]["value"] == "0"
    assert "--prefix-caching-hash-algo=sha256_cbor" in args
    ports = _container_ports(vllm)
    replay = re.fullmatch(r"tcp://\*:(\d+)", config["replay_endpoint"])
    assert replay and int(replay.group(1)) in ports
    endpoint = config["endpoint"]
    if "*" in endpoint:  # the engine binds; pickers (or the index) connect to it
        assert int(endpoint.rsplit(":", 1)[1]) in ports
    else:  # the engine connects to the picker Service's event port
        match = re.fullmatch(
            r"tcp://([\w-]+)\.\$\(POD_NAMESPACE\)\.svc\.cluster\.local:(\d+)", endpoint
        )
        assert match, endpoint
        service = _one(objects, "Service", match.group(1))
        assert int(match.group(2)) in [p["port"] for p in service["spec"]["ports"]]
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health" and probe["port"] in ports
    if overlay == "redis-ha":
        assert "*" in endpoint


def _picker_config(objects: list[Obj]) -> Obj:
    config_map = _one(objects, "ConfigMap", "epp-config")
    return yaml.safe_load(config_map["data"]["config.yaml"])


def test_picker_config_is_an_endpoint_picker_config(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    config = _picker_config(objects)
    assert config["apiVersion"] == "llm-d.ai/v1alpha1"
    assert config["kind"] == "EndpointPickerConfig"
    names = {p.get("name", p["type"]) for p in config["plugins"]}
    for profile in config["schedulingProfiles"]:
        for ref in profile["plugins"]:
            assert ref["pluginRef"] in names
    types = {p["type"] for p in config["plugins"]}
    assert "precise-prefix-cache-scorer" in types
    # The picker's own loader accepts it (types, parameters, references).
    load_config(_one(objects, "ConfigMap", "epp-config")["data"]["config.yaml"], default_registry())
    picker = _one(objects, "Deployment", "epp")
    mounts = {
        m["name"]: m["mountPath"] for c in _containers(picker) for m in c.get("volumeMounts", [])
    }
    epp = next(c for c in _containers(picker) if c["name"] == "epp")
    assert _flag(epp["args"], "config") == f"{mounts['config']}/config.yaml"


def test_picker_runs_hardened(rendered: tuple[str, list[Obj]]) -> None:
    _, objects = rendered
    picker = _one(objects, "Deployment", "epp")
    pod = picker["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"]
    epp = next(c for c in pod["containers"] if c["name"] == "epp")
    health = _container_ports(picker)["grpc-health"]
    assert epp["readinessProbe"]["grpc"] == {"port": health, "service": "readiness"}
    assert epp["livenessProbe"]["grpc"] == {"port": health, "service": "liveness"}


def test_sidecar_overlay_moves_the_event_port() -> None:
    objects = render(DEPLOY / "overlays" / "index-sidecar")
    picker = _one(objects, "Deployment", "epp")
    owners = [
        c["name"]
        for c in _containers(picker)
        for p in c.get("ports", [])
        if p["containerPort"] == 5557
    ]
    assert owners == ["kvindex"]


def test_strategic_merge_semantics() -> None:
    base = {"containers": [{"name": "a", "args": ["1"], "ports": [{"containerPort": 1}]}]}
    patch = {
        "containers": [{"name": "a", "args": ["2"], "ports": [{"containerPort": 2}]}, {"name": "b"}]
    }
    merged = strategic_merge(base, patch)
    assert merged["containers"][0] == {
        "name": "a",
        "args": ["2"],
        "ports": [{"containerPort": 2}, {"containerPort": 1}],
    }
    assert [c["name"] for c in merged["containers"]] == ["a", "b"]


def _normalised(objects: list[Obj]) -> list[str]:
    def norm(node: Any, field: str = "") -> Any:
        if isinstance(node, dict):
            return {k: norm(v, k) for k, v in sorted(node.items())}
        if isinstance(node, list):
            items = [norm(v) for v in node]
            if field in {"containers", "ports", "volumes", "env", "volumeMounts"}:
                items.sort(key=lambda v: json.dumps(v, sort_keys=True))
            return items
        return node

    return sorted(json.dumps(norm(o), sort_keys=True) for o in objects)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_lite_renderer_agrees_with_kubectl_kustomize(rendered: tuple[str, list[Obj]]) -> None:
    overlay, objects = rendered
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert _normalised(objects) == _normalised([d for d in yaml.safe_load_all(out) if d])


def test_dockerfile_is_multi_stage_and_non_root() -> None:
    lines = [line.strip() for line in (DEPLOY.parent / "Dockerfile").read_text().splitlines()]
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) >= 2 and all("slim" in s for s in stages)
    final = lines[lines.index(stages[-1]) :]
    assert any(line.startswith("COPY --from=build") for line in final)
    (user,) = [line for line in final if line.startswith("USER ")]
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    picker_uid = 65532  # the Deployment's runAsUser
    assert int(uid) == picker_uid


def test_standalone_envoy_config_is_the_tested_one() -> None:
    objects = render(DEPLOY / "overlays" / "standalone-envoy")
    shipped = _one(objects, "ConfigMap", "envoy-config")["data"]["envoy.yaml"]
    # The same template the end-to-end tests render (kvtools/demo/envoy.py), at its defaults.
    assert shipped == (DEPLOY / "envoy" / "envoy.yaml").read_text() == render_envoy()
    picker = _one(objects, "Deployment", "epp")
    ports = _container_ports(picker)
    envoy = yaml.safe_load(shipped)
    listener = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert ports["http-gateway"] == listener["port_value"]
    epp_args = next(c for c in _containers(picker) if c["name"] == "epp")["args"]
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    epp_cluster = json.dumps(clusters)
    assert f"--grpc-port={ports['grpc']}" in epp_args and str(ports["grpc"]) in epp_cluster


RENDER_SCRIPT = DEPLOY / "envoy" / "render.py"


def _run_render(*args: str) -> subprocess.CompletedProcess[str]:
    # The documented command line: `python deploy/envoy/render.py NAME=VALUE ... > envoy.yaml`.
    return subprocess.run(
        [sys.executable, str(RENDER_SCRIPT), *args], capture_output=True, text=True, timeout=30
    )


def test_render_script_command_line() -> None:
    assert _run_render().stdout == render_envoy()
    custom = _run_render("LISTEN_PORT=18081", "EPP_HOST=epp.llm.svc")
    assert custom.returncode == 0
    assert custom.stdout == render_envoy(LISTEN_PORT="18081", EPP_HOST="epp.llm.svc")
    assert "port_value: 18081" in custom.stdout
    usage = _run_render("--help")
    assert usage.returncode == 0 and "NAME=VALUE" in usage.stdout
    assert "LISTEN_PORT=8081" in usage.stdout


@pytest.mark.parametrize("arg", ["LISTEN_PORT", "NO_SUCH_NAME=1", "--frobnicate"])
def test_render_script_refuses_bad_arguments_plainly(arg: str) -> None:
    result = _run_render(arg)
    assert result.returncode == 2
    assert result.stdout == ""
    assert repr(arg) in result.stderr and "Traceback" not in result.stderr


def test_sidecar_index_runs_strict_with_pod_discovery() -> None:
    # kvindex serve refuses a bind socket without discovery (strict by default): the sidecar
    # names the pool's pods, lets them connect (socket port 0) and consumes their replay port.
    import argparse

    from kvindex.commands.serve import add_service_flags, config_from_args

    objects = render(DEPLOY / "overlays" / "index-sidecar")
    picker = _one(objects, "Deployment", "epp")
    (index,) = [c for c in _containers(picker) if c["name"] == "kvindex"]
    assert index["args"][0] == "serve"
    parser = argparse.ArgumentParser()
    add_service_flags(parser)
    config = config_from_args(parser.parse_args(index["args"][1:]))
    assert not config.accept_any_engine
    assert config.kubernetes is not None
    assert config.kubernetes.socket_port == 0
    assert config.kubernetes.replay_port == 5558
    assert config.kubernetes.label_selector == "app=vllm-qwen3"
    assert {e["name"] for e in index.get("env", [])} >= {"POD_NAMESPACE"}


@pytest.mark.parametrize("overlay", ["in-memory", "index-sidecar"])
def test_only_engine_pods_reach_the_event_port(overlay: str) -> None:
    # The NetworkPolicy admits port 5557 from the engine pods alone, and the picker's other
    # ports from anywhere; its selectors match the picker's and the engines' pod labels.
    objects = render(DEPLOY / "overlays" / overlay)
    (policy,) = _by_kind(objects, "NetworkPolicy")
    picker = _one(objects, "Deployment", "epp")
    vllm = next(o for o in _by_kind(objects, "Deployment") if o["metadata"]["name"] != "epp")
    pod_labels = picker["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    by_port: dict[int, list[Any]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).append(rule.get("from"))
    (sources,) = by_port.pop(5557)
    engine_labels = vllm["spec"]["template"]["metadata"]["labels"]
    assert [s["podSelector"]["matchLabels"] for s in sources] == [
        {k: engine_labels[k] for k in sources[0]["podSelector"]["matchLabels"]}
    ]
    assert set(by_port) == {9002, 9003, 9090}
    assert all(f is None for froms in by_port.values() for f in froms)
    # Every port the picker pod listens on for others is covered by a rule.
    listening = {
        p["containerPort"]
        for c in _containers(picker)
        for p in c.get("ports", [])
        if p["containerPort"] not in (8080, 50051)  # the sidecar index's: localhost clients
    }
    assert listening <= {5557, 9002, 9003, 9090}


def test_every_vllm_replay_endpoint_has_a_consumer(rendered: tuple[str, list[Obj]]) -> None:
    # vLLM's replay socket is only worth its memory when the index asks it after gaps and at
    # first contact: the picker's in-process index (kvEventsConfig.replayPort) or the
    # sidecar (--k8s-replay-port) names the same port.
    overlay, objects = rendered
    (container,) = _containers(_one(objects, "Deployment", "vllm"))
    config = json.loads(_flag(container["args"], "kv-events-config"))
    replay = re.fullmatch(r"tcp://\*:(\d+)", config["replay_endpoint"])
    assert replay
    port = int(replay.group(1))
    picker = _one(objects, "Deployment", "epp")
    index = [c for c in _containers(picker) if c["name"] == "kvindex"]
    if index:
        assert f"--k8s-replay-port={port}" in index[0]["args"]
        return
    (precise,) = [
        p for p in _picker_config(objects)["plugins"] if p["type"] == "precise-prefix-cache-scorer"
    ]
    assert precise["parameters"]["kvEventsConfig"]["replayPort"] == port, overlay


def test_envoy_sidecar_probe_targets_a_port_the_pod_address_serves() -> None:
    # Kubelet probes go to the pod's IP; Envoy's admin listens on 127.0.0.1 only, so a probe
    # on it never succeeds and the pod never becomes Ready.
    objects = render(DEPLOY / "overlays" / "standalone-envoy")
    (envoy,) = [c for c in _containers(_one(objects, "Deployment", "epp")) if c["name"] == "envoy"]
    probe = envoy["readinessProbe"]
    ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    target = (probe.get("tcpSocket") or probe.get("httpGet"))["port"]
    config = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    admin = config["admin"]["address"]["socket_address"]
    listeners = {
        listener["address"]["socket_address"]["port_value"]: listener["address"]["socket_address"][
            "address"
        ]
        for listener in config["static_resources"]["listeners"]
    }
    port = ports.get(target, target)
    assert port != admin["port_value"] or admin["address"] not in ("127.0.0.1", "::1")
    assert listeners.get(port) == "0.0.0.0"
