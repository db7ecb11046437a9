"""Offline validation of rendered manifests.

Built-in kinds are checked against the Kubernetes OpenAPI models that ship with the
`kubernetes` client (`openapi_types` / `attribute_map`): every field must be known at its
place, with the right JSON type, and the client's constructors enforce required fields. The
InferencePool CRD is not in the client, so its v1 schema is written here from the Gateway
API Inference Extension reference.
"""

from __future__ import annotations

import re
from typing import Any

import kubernetes.client as k8s
from kubernetes.client import ApiClient

MODELS = {
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Service"): "V1Service",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
}
_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "float": (int, float),
    "datetime": (str,),
    "bytes": (str,),
    "object": (object,),
}


class SchemaError(ValueError):
    pass


def _check(value: Any, type_name: str, where: str) -> None:
    if value is None:
        return
    if type_name in _PRIMITIVES:
        if not isinstance(value, _PRIMITIVES[type_name]) or (
            type_name == "int" and isinstance(value, bool)
        ):
            raise SchemaError(f"{where}: expected {type_name}, got {type(value).__name__}")
        return
    if match := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
        if not isinstance(value, list):
            raise SchemaError(f"{where}: expected a list")
        for i, item in enumerate(value):
            _check(item, match.group(1), f"{where}[{i}]")
        return
    if match := re.fullmatch(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])", type_name):
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected a map")
        for key, item in value.items():
            _check(item, match.group(1) or match.group(2), f"{where}.{key}")
        return
    model = getattr(k8s, type_name)
    if not isinstance(value, dict):
        raise SchemaError(f"{where}: expected an object ({type_name})")
    json_to_attr = {json: attr for attr, json in model.attribute_map.items()}
    for key, item in value.items():
        if key not in json_to_attr:
            raise SchemaError(f"{where}: unknown field {key!r} in {type_name}")
        _check(item, model.openapi_types[json_to_attr[key]], f"{where}.{key}")


def validate(obj: dict[str, Any]) -> None:
    """Raise SchemaError naming the object and field if `obj` is not a valid manifest."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    name = f"{key[1]}/{obj.get('metadata', {}).get('name')}"
    if key == ("inference.networking.k8s.io/v1", "InferencePool"):
        _validate_inference_pool(obj, name)
        return
    if key not in MODELS:
        raise SchemaError(f"{name}: no schema for {key}")
    _check(obj, MODELS[key], name)
    try:  # the client's constructors reject missing required fields
        ApiClient()._ApiClient__deserialize(obj, MODELS[key])  # type: ignore[attr-defined]
    except ValueError as exc:
        raise SchemaError(f"{name}: {exc}") from exc


def _validate_inference_pool(obj: dict[str, Any], name: str) -> None:
    _check(obj["metadata"], "V1ObjectMeta", f"{name}.metadata")
    allowed_top = {"apiVersion", "kind", "metadata", "spec", "status"}
    if set(obj) - allowed_top:
        raise SchemaError(f"{name}: unknown fields {sorted(set(obj) - allowed_top)}")
    spec = obj.get("spec") or {}
    allowed = {"selector", "targetPorts", "appProtocol", "endpointPickerRef"}
    if set(spec) - allowed:
        raise SchemaError(f"{name}.spec: unknown fields {sorted(set(spec) - allowed)}")
    for required in ("selector", "targetPorts", "endpointPickerRef"):
        if required not in spec:
            raise SchemaError(f"{name}.spec.{required} is required")
    labels = spec["selector"].get("matchLabels")
    if not isinstance(labels, dict) or not labels or set(spec["selector"]) != {"matchLabels"}:
        raise SchemaError(f"{name}.spec.selector: matchLabels (non-empty) only")
    ports = spec["targetPorts"]
    numbers = [p.get("number") for p in ports]
    if not 1 <= len(ports) <= 8 or len(set(numbers)) != len(numbers):
        raise SchemaError(f"{name}.spec.targetPorts: 1..8 unique ports")
    for i, port in enumerate(ports):
        if (
            set(port) != {"number"}
            or not isinstance(port["number"], int)
            or not (1 <= port["number"] <= 65535)
        ):
            raise SchemaError(f"{name}.spec.targetPorts[{i}]: {{number: 1..65535}}")
    ref = spec["endpointPickerRef"]
    allowed_ref = {"group", "kind", "name", "port", "failureMode"}
    if set(ref) - allowed_ref or "name" not in ref:
        raise SchemaError(
            f"{name}.spec.endpointPickerRef: fields {sorted(allowed_ref)}, name required"
        )
    if ref.get("kind", "Service") == "Service" and "port" not in ref:
        raise SchemaError(f"{name}.spec.endpointPickerRef.port is required for a Service")
    if ref.get("failureMode", "FailClose") not in ("FailOpen", "FailClose"):
        raise SchemaError(f"{name}.spec.endpointPickerRef.failureMode: FailOpen or FailClose")
    if "appProtocol" in spec and spec["appProtocol"] not in ("http", "kubernetes.io/h2c"):
        raise SchemaError(f"{name}.spec.appProtocol: http or kubernetes.io/h2c")
