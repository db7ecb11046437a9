"""Find the files of a tokenizer spec: a tokenizer.json file, a model directory, a model in the
Hugging Face cache layout, or (network permitting) a hub download into that cache.

Cache layout (as huggingface_hub writes it):
    <hub cache>/models--ORG--NAME/refs/<revision>       holds the commit hash
    <hub cache>/models--ORG--NAME/snapshots/<commit>/   holds the files
The hub cache is the first of $TRANSFORMERS_CACHE, $HF_HUB_CACHE, $HF_HOME/hub,
$XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub that holds the model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kvindex.tokenize.errors import TokenizerLoadError

TOKENIZER_FILE = "tokenizer.json"
# Files transformers reads beside tokenizer.json; all optional.
SIDE_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "added_tokens.json",
)
CHAT_TEMPLATE_DIR = "additional_chat_templates"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True, slots=True)
class TokenizerFiles:
    """Where a spec's files are. `directory` is None for a bare tokenizer.json file, whose
    neighbours are then ignored (no chat template, post-processor as the JSON says)."""

    spec: str
    tokenizer_json: Path
    directory: Path | None


def hub_cache_candidates(environ: Mapping[str, str] | None = None) -> list[Path]:
    env = os.environ if environ is None else environ
    out: list[Path] = []
    for var in ("TRANSFORMERS_CACHE", "HF_HUB_CACHE"):
        if env.get(var):
            out.append(Path(env[var]).expanduser())
    if env.get("HF_HOME"):
        out.append(Path(env["HF_HOME"]).expanduser() / "hub")
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path(env.get("HOME", "~")).expanduser() / ".cache"
    out.append(base / "huggingface" / "hub")
    seen: list[Path] = []
    for p in out:
        if p not in seen:
            seen.append(p)
    return seen


def _split_revision(spec: str) -> tuple[str, str]:
    repo, sep, revision = spec.partition("@")
    return repo, (revision if sep and revision else "main")


def _snapshot_in_cache(cache: Path, repo_id: str, revision: str) -> tuple[Path | None, str]:
    """The snapshot directory of repo_id@revision under one hub cache, or None and why."""
    model_dir = cache / ("models--" + repo_id.replace("/", "--"))
    if not model_dir.is_dir():
        return None, f"{model_dir} does not exist"
    if _COMMIT.match(revision):
        commit = revision
    else:
        ref = model_dir / "refs" / revision
        if not ref.is_file():
            return None, f"{ref} is missing (no cached revision {revision!r})"
        commit = ref.read_text(encoding="utf-8").strip()
    snapshot = model_dir / "snapshots" / commit
    if not snapshot.is_dir():
        return None, f"{snapshot} is missing (refs/{revision} points at {commit})"
    return snapshot, ""


def _from_directory(spec: str, directory: Path) -> TokenizerFiles:
    tokenizer_json = directory / TOKENIZER_FILE
    if not tokenizer_json.is_file():
        present = sorted(p.name for p in directory.iterdir())[:20]
        raise TokenizerLoadError(
            f"tokenizer spec {spec!r}: {directory} has no {TOKENIZER_FILE} (found: "
            f"{', '.join(present) or 'nothing'}). Only fast tokenizers are supported; convert a "
            "slow tokenizer once with transformers (AutoTokenizer.from_pretrained(dir)"
            ".save_pretrained(dir)) or point at a directory that has tokenizer.json."
        )
    return TokenizerFiles(spec=spec, tokenizer_json=tokenizer_json, directory=directory)


def _download(spec: str, repo_id: str, revision: str, tried: list[str], cache: Path) -> Path:
    try:
        import huggingface_hub
    except ImportError:
        raise TokenizerLoadError(
            f"tokenizer spec {spec!r} is neither a local path nor in the Hugging Face cache "
            f"(tried: {'; '.join(tried)}), and huggingface_hub is not installed to download it. "
            "Pass a local directory with tokenizer.json, or populate the cache."
        ) from None
    patterns = [TOKENIZER_FILE, *SIDE_FILES, f"{CHAT_TEMPLATE_DIR}/*.jinja"]
    try:
        path = huggingface_hub.snapshot_download(
            repo_id=repo_id, revision=revision, allow_patterns=patterns, cache_dir=str(cache)
        )
    except Exception as exc:
        raise TokenizerLoadError(
            f"tokenizer spec {spec!r} is not a local path, is not in the Hugging Face cache "
            f"(tried: {'; '.join(tried)}), and downloading it from the hub failed "
            f"({type(exc).__name__}: {exc}). The hub is unreachable from this machine or "
            "offline mode is on: download the tokenizer files elsewhere and pass their "
            "directory, or copy them into the cache layout under $HF_HOME/hub."
        ) from exc
    return Path(path)


def locate_tokenizer_files(
    spec: str | Path, *, environ: Mapping[str, str] | None = None
) -> TokenizerFiles:
    """Resolve a spec to files; raise TokenizerLoadError naming what was tried."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return TokenizerFiles(spec=text, tokenizer_json=path, directory=None)
    if path.is_dir():
        return _from_directory(text, path)
    looks_like_path = isinstance(spec, Path) or text.startswith(("/", ".", "~")) or os.sep in text
    repo_id, revision = _split_revision(text)
    if not _HUB_ID.match(repo_id) or (looks_like_path and text.count("/") != 1):
        raise TokenizerLoadError(
            f"tokenizer spec {text!r}: no such file or directory, and it is not a hub id "
            "(ORG/NAME[@REVISION]). Pass an existing tokenizer.json, a model directory, or a hub "
            "id that is in the Hugging Face cache."
        )
    tried: list[str] = []
    caches = hub_cache_candidates(environ)
    for cache in caches:
        snapshot, why = _snapshot_in_cache(cache, repo_id, revision)
        if snapshot is not None:
            return _from_directory(text, snapshot)
        tried.append(why)
    return _from_directory(text, _download(text, repo_id, revision, tried, caches[0]))
