"""A small kustomize renderer for the features deploy/ uses, so the deployment tests run on
machines without kubectl. Where `kubectl kustomize` exists the tests check both agree.

Supported: resources (files and directories), components, namespace, replicas,
configMapGenerator (files, literals, behavior create/replace/merge, generatorOptions /
options disableNameSuffixHash), patches (strategic merge files; inline JSON 6902 with a
kind/name target). Anything else in a kustomization raises, so a new feature in deploy/ is
noticed rather than silently ignored.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

_KNOWN = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "namespace",
    "replicas",
    "configMapGenerator",
    "generatorOptions",
    "patches",
}
# Strategic-merge keys of the lists deploy/ patches (from the Kubernetes API's patchMergeKey).
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


class KustomizeError(ValueError):
    pass


def render(directory: Path) -> list[Obj]:
    return _build(directory.resolve(), component=False)


def _load_kustomization(directory: Path) -> Obj:
    path = directory / "kustomization.yaml"
    if not path.exists():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    data: Obj = yaml.safe_load(path.read_text())
    unknown = set(data) - _KNOWN
    if unknown:
        raise KustomizeError(f"{path}: unsupported fields {sorted(unknown)}")
    return data


def _build(directory: Path, component: bool, base: list[Obj] | None = None) -> list[Obj]:
    k = _load_kustomization(directory)
    objects: list[Obj] = [] if base is None else base
    for entry in k.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects.extend(_build(path, component=False))
        else:
            objects.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for entry in k.get("components", []):
        objects = _build(directory / entry, component=True, base=objects)
    default_options = k.get("generatorOptions", {})
    for gen in k.get("configMapGenerator", []):
        _generate_configmap(directory, gen, default_options, objects)
    for patch in k.get("patches", []):
        _apply_patch(directory, patch, objects)
    for rep in k.get("replicas", []):
        for obj in objects:
            if obj["metadata"]["name"] == rep["name"] and "replicas" in obj.get("spec", {}):
                obj["spec"]["replicas"] = rep["count"]
    namespace = k.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in _CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
            if obj["kind"] == "RoleBinding":
                for subject in obj.get("subjects", []):
                    if subject.get("kind") == "ServiceAccount":
                        subject["namespace"] = namespace
    return objects


def _generate_configmap(directory: Path, gen: Obj, defaults: Obj, objects: list[Obj]) -> None:
    options = {**defaults, **gen.get("options", {})}
    behavior = gen.get("behavior", "create")
    if behavior == "create" and not options.get("disableNameSuffixHash"):
        raise KustomizeError(f"{directory}: name suffix hashes are not supported here")
    data: dict[str, str] = {}
    for item in gen.get("files", []):
        key, _, rel = item.partition("=") if "=" in item else (Path(item).name, "", item)
        data[key] = (directory / rel).read_text()
    for item in gen.get("literals", []):
        key, _, value = item.partition("=")
        data[key] = value
    existing = [
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == gen["name"]
    ]
    if behavior == "create":
        if existing:
            raise KustomizeError(f"configMap {gen['name']} already exists")
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"]},
                "data": data,
            }
        )
    elif not existing:
        raise KustomizeError(f"configMap {gen['name']}: behavior {behavior} but no base")
    elif behavior == "replace":
        existing[0]["data"] = data
    else:
        existing[0].setdefault("data", {}).update(data)


def _find(objects: list[Obj], kind: str, name: str) -> Obj:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise KustomizeError(f"patch target {kind}/{name} not found")


def _apply_patch(directory: Path, patch: Obj, objects: list[Obj]) -> None:
    if "path" in patch:
        body = yaml.safe_load((directory / patch["path"]).read_text())
        target = _find(objects, body["kind"], body["metadata"]["name"])
        merged = strategic_merge(target, body)
        target.clear()
        target.update(merged)
        return
    target = _find(objects, patch["target"]["kind"], patch["target"]["name"])
    for op in yaml.safe_load(patch["patch"]):
        _json6902(target, op)


def strategic_merge(original: Any, patch: Any, field: str = "") -> Any:
    if isinstance(original, dict) and isinstance(patch, dict):
        out = copy.deepcopy(original)
        for key, value in patch.items():
            out[key] = strategic_merge(original[key], value, key) if key in original else value
        return out
    if isinstance(original, list) and isinstance(patch, list) and field in _MERGE_KEYS:
        key = _MERGE_KEYS[field]
        by_key = {item[key]: item for item in original}
        patched = [strategic_merge(by_key[p[key]], p) if p[key] in by_key else p for p in patch]
        seen = {p[key] for p in patch}
        return patched + [item for item in original if item[key] not in seen]
    return copy.deepcopy(patch)


def _json6902(target: Obj, op: Obj) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    node: Any = target
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if op["op"] == "remove":
        if isinstance(node, list):
            del node[int(last)]
        else:
            del node[last]
    elif op["op"] in ("replace", "add"):
        if isinstance(node, list):
            if op["op"] == "add":
                node.insert(len(node) if last == "-" else int(last), op["value"])
            else:
                node[int(last)] = op["value"]
        else:
            node[last] = op["value"]
    else:
        raise KustomizeError(f"unsupported JSON patch op {op['op']}")
