"""Model names -> where the weights come from: configs/models.toml.

A name is either a Hub entry (repo, pinned revision, the files a conversion needs, and optionally a ready-made GGUF
repo with per-quant file patterns) or a local source (the tiny fixtures). `resolve` turns what a user typed — a
name or a path — into a directory or file later stages can open.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import store
from .errors import EdgeMoEError
from .tomlfile import load_toml

FORMATS = ("safetensors", "gguf")


@dataclass(frozen=True)
class GGUFSource:
    repo: str
    revision: str
    default_quant: str
    patterns: tuple[str, ...]  # fnmatch patterns with a {quant} placeholder

    def allow_patterns(self, quant: str) -> list[str]:
        return [p.format(quant=quant) for p in self.patterns]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str  # "hub" or "local"
    variant: str  # "thinking" or "pt"
    description: str = ""
    repo: str | None = None
    revision: str | None = None
    allow_patterns: tuple[str, ...] = ()
    gguf: GGUFSource | None = None
    path: Path | None = None  # local sources only, absolute
    formats: tuple[str, ...] = field(default=())

    @property
    def chat_template(self) -> str:
        """The chat format's name (ernie-thinking or ernie-pt): the variant's, since `run` renders the template stored
        in the GGUF itself; configs/models.toml no longer repeats it."""
        return f"ernie-{self.variant}"


def registry_file() -> Path:
    return store.configs_dir() / "models.toml"


def _checkout_root() -> Path:
    # configs/ sits at the top of a checkout; in a wheel it is edgemoe_cli/configs and local sources are absent.
    return store.configs_dir().parent


def _entry(name: str, raw: dict, where: Path) -> ModelEntry:
    def need(key: str):
        if key not in raw:
            raise EdgeMoEError(f"{where}: model '{name}' has no '{key}'", "add it (see the comment at the top)")
        return raw[key]

    source = need("source")
    variant = need("variant")
    if variant not in ("thinking", "pt"):
        raise EdgeMoEError(f"{where}: model '{name}' has variant '{variant}'", "use thinking or pt")
    common = dict(
        name=name,
        source=source,
        variant=variant,
        description=raw.get("description", ""),
    )
    if source == "local":
        path = Path(need("path"))
        return ModelEntry(
            **common, path=path if path.is_absolute() else _checkout_root() / path, formats=("safetensors",)
        )
    if source != "hub":
        raise EdgeMoEError(f"{where}: model '{name}' has source '{source}'", "use hub or local")
    gguf = None
    if g := raw.get("gguf"):
        gguf = GGUFSource(
            repo=g["repo"],
            revision=g.get("revision", "main"),
            default_quant=g["default_quant"],
            patterns=tuple(g["patterns"]),
        )
    return ModelEntry(
        **common,
        repo=need("repo"),
        revision=raw.get("revision", "main"),
        allow_patterns=tuple(need("allow_patterns")),
        gguf=gguf,
        formats=("safetensors", "gguf") if gguf else ("safetensors",),
    )


def load(path: str | Path | None = None) -> dict[str, ModelEntry]:
    """All registry entries by name, in file order."""
    path = Path(path) if path else registry_file()
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise EdgeMoEError(f"model registry {path} is missing", "reinstall edgemoe") from e
    raw = load_toml(text, f"model registry {path}", "fix the file")
    return {name: _entry(name, body, path) for name, body in raw.items()}


def get(name: str, entries: dict[str, ModelEntry] | None = None) -> ModelEntry:
    """The entry called `name` (case-insensitive); unknown names list the known ones and the closest match."""
    entries = entries if entries is not None else load()
    by_lower = {n.lower(): e for n, e in entries.items()}
    if (entry := by_lower.get(name.lower())) is not None:
        return entry
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.4)
    guess = f"did you mean '{by_lower[close[0]].name}'? " if close else ""
    raise EdgeMoEError(f"unknown model '{name}'", f"{guess}known models: {', '.join(entries)} (see `edgemoe models`)")


def store_entry(name: str, fmt: str = "safetensors", quant: str | None = None) -> Path:
    """The store directory a pull of `name` writes its manifest to: models/<name>[/gguf-<QUANT>]."""
    base = store.home() / "models" / name
    return base if fmt == "safetensors" else base / f"gguf-{quant}"


def read_manifest(entry_dir: Path) -> dict | None:
    """A pull manifest as a dict, or None when there is none or it is damaged (not JSON, not a pull manifest)."""
    try:
        m = json.loads((entry_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if _is_pull_manifest(m) else None


def _is_pull_manifest(m) -> bool:
    """The fields `list` and name resolution read, with their types: manifests live in a store anyone may edit."""
    strings = ("name", "repo", "commit", "path", "format")
    return (
        isinstance(m, dict)
        and m.get("kind") == "pull"
        and all(isinstance(m.get(k), str) for k in strings)
        and isinstance(m.get("files"), list)
        and all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in m["files"])
        and isinstance(m.get("total_bytes", 0), int)
        and isinstance(m.get("quant"), (str, type(None)))
    )


def pulled_gguf_file(manifest: dict) -> Path | None:
    """The .gguf a ready-made pull holds (the first shard of a split GGUF: llama.cpp finds the rest beside it)."""
    ggufs = sorted(Path(manifest["path"]) / f["name"] for f in manifest.get("files", []) if f["name"].endswith(".gguf"))
    return ggufs[0] if ggufs else None


def resolve(name_or_path: str | Path, fmt: str = "safetensors", quant: str | None = None) -> Path:
    """A path the user typed, or a registry name -> the local directory (safetensors) or .gguf file a pull fetched.

    The pulled side of names only: models.py resolves what a user types for a model (NAME:TAG, the store's GGUFs).

    Existing paths win over names. Hub names resolve to what `edgemoe pull` fetched (its manifest records where);
    local names to their directory. Nothing is downloaded here.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    looks_like_path = "/" in str(name_or_path) or str(name_or_path).endswith((".gguf", ".safetensors"))
    entries = load()
    if looks_like_path and str(name_or_path).lower() not in {n.lower() for n in entries}:
        raise EdgeMoEError(f"{name_or_path} does not exist", "give an existing path or a name from `edgemoe models`")
    entry = get(str(name_or_path), entries)
    if entry.source == "local":
        if fmt != "safetensors":
            raise EdgeMoEError(f"'{entry.name}' is a local safetensors checkpoint", "convert it to GGUF first")
        if not entry.path.is_dir():
            raise EdgeMoEError(
                f"'{entry.name}' should be at {entry.path}, which is missing",
                "run from a full checkout of edgemoe (data/fixtures) or pass a path",
            )
        return entry.path
    if fmt == "gguf":
        quant = quant or (entry.gguf.default_quant if entry.gguf else None)
    entry_dir = store_entry(entry.name, fmt, quant)
    manifest = read_manifest(entry_dir)
    if manifest is None and (entry_dir / "manifest.json").exists():
        raise EdgeMoEError(
            f"the pull manifest {entry_dir / 'manifest.json'} is damaged",
            f"run `edgemoe pull {entry.name}` again to rewrite it",
        )
    if manifest is None:
        extra = f" --format gguf --quant {quant}" if fmt == "gguf" else ""
        raise EdgeMoEError(
            f"'{entry.name}' has not been pulled{' as ' + quant if fmt == 'gguf' else ''}",
            f"run `edgemoe pull {entry.name}{extra}` first",
        )
    target = Path(manifest["path"])
    if fmt == "gguf":
        target = pulled_gguf_file(manifest)
        if target is None:
            raise EdgeMoEError(f"pull of '{entry.name}' {quant} holds no .gguf file", "re-run the pull")
    if not target.exists():
        raise EdgeMoEError(
            f"'{entry.name}' was pulled to {target}, which is gone", f"run `edgemoe pull {entry.name}` again"
        )
    return target
