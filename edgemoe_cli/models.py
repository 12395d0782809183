"""What a user types for a model — a path, a name, or NAME:TAG — and the store's models behind the names.

A name is a registry entry (`edgemoe models`) or a directory of the store. Its tags are the GGUFs the store holds
for it: `gguf/NAME/TAG.gguf` (what `convert`, `quantize` and `prune` made: `bf16`, `edge-balanced`, ...) and the
ready-made GGUFs `pull --format gguf --quant Q` fetched (tag `Q4_0`, ...). Tags match case-insensitively, and a
`:` in a tag stands for the `-` quantize writes (`NAME:stock:Q4_K_M` is `gguf/NAME/stock-Q4_K_M.gguf`).

Every command that takes a model calls `resolve_gguf` (run it, measure it) or `source_gguf` (quantize, plan,
imatrix: an unquantized GGUF, converted into the store from the pulled safetensors when there is none yet).
Nothing here prints: the choice, and why it was made, are returned for the command to say.
"""

from __future__ import annotations

import difflib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import registry, store
from .errors import EdgeMoEError
from .progress import Progress

# the unquantized GGUF `source_gguf` makes from a checkpoint, by the checkpoint's dtype (config.json)
_OUTTYPE_OF_DTYPE = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
# which converted GGUF quantize starts from when the store holds several: the most precise
_SOURCE_ORDER = ("f32", "bf16", "f16")


@dataclass
class StoreGGUF:
    name: str
    tag: str
    path: Path
    kind: str  # "made" (gguf/NAME/, by convert, quantize or prune) or "pulled" (a ready-made GGUF from the Hub)
    state: str  # converted | quantized | pruned | pulled
    size: int
    mtime: float
    detail: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"


@dataclass
class ModelChoice:
    """A model as resolved: the file, and (for names) the NAME:TAG it is and why that one was taken."""

    text: str
    path: Path
    ref: str | None = None  # None when the user gave a path
    why: str = ""
    converted: bool = False  # source_gguf converted the checkpoint into the store first

    @property
    def by_name(self) -> bool:
        return self.ref is not None


def split_ref(text: str) -> tuple[str, str | None]:
    """'NAME:TAG' -> (NAME, TAG); 'NAME' -> (NAME, None). The tag may itself hold ':' (stock:Q4_K_M)."""
    name, sep, tag = str(text).partition(":")
    return name, (tag or None) if sep else None


def _norm_tag(tag: str) -> str:
    return tag.replace(":", "-").lower()


def _gguf_root() -> Path:
    return store.home() / "gguf"


def _models_root() -> Path:
    return store.home() / "models"


def store_names() -> list[str]:
    """Names with something in the store (pulled manifests, made GGUFs), sorted."""
    names = {p.name for root in (_gguf_root(), _models_root()) if root.is_dir() for p in root.iterdir() if p.is_dir()}
    return sorted(names)


def canonical_name(name: str) -> str | None:
    """`name` spelled as the registry or the store spells it (matching is case-insensitive); None if unknown."""
    known = [*registry.load(), *store_names()]
    return next((n for n in known if n.lower() == name.lower()), None)


def _sidecar(path: Path) -> dict:
    try:
        data = json.loads(path.with_name(path.name + ".manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _made(name: str) -> list[StoreGGUF]:
    found = []
    for path in sorted((_gguf_root() / name).glob("*.gguf")):
        if path.name.endswith(".imatrix.gguf") or not path.is_file():
            continue  # an importance matrix beside its model is not a model
        meta = _sidecar(path)
        recipe = meta.get("recipe") if isinstance(meta.get("recipe"), str) else None
        state = "pruned" if meta.get("stage") == "prune" else "quantized" if recipe else "converted"
        detail = f"recipe {recipe}" if recipe else state
        st = path.stat()
        found.append(StoreGGUF(name, path.stem, path, "made", state, st.st_size, st.st_mtime, detail))
    return found


def _pulled(name: str) -> list[StoreGGUF]:
    found = []
    for entry_dir in sorted((_models_root() / name).glob("gguf-*")):
        manifest = registry.read_manifest(entry_dir)
        if not manifest or manifest.get("kind") != "pull" or (path := registry.pulled_gguf_file(manifest)) is None:
            continue
        mtime = path.stat().st_mtime if path.is_file() else 0.0
        found.append(
            StoreGGUF(
                name,
                manifest.get("quant") or entry_dir.name[5:],
                path,
                "pulled",
                "pulled",
                manifest.get("total_bytes", 0),
                mtime,
                f"{manifest.get('repo')}@{str(manifest.get('commit'))[:12]}",
            )
        )
    return found


def store_ggufs(name: str) -> list[StoreGGUF]:
    """Every GGUF the store holds for `name`: made ones first (by tag), then pulled ones."""
    return _made(name) + _pulled(name)


def _tags_line(name: str, candidates: list[StoreGGUF]) -> str:
    return ", ".join(c.ref for c in candidates) or f"none yet for {name}"


def _lookup_name(text: str) -> tuple[str, str | None]:
    """(canonical NAME, TAG) for what the user typed, or an error that says what exists."""
    name, tag = split_ref(text)
    canonical = canonical_name(name)
    if canonical is None:
        if "/" in name or name.endswith((".gguf", ".safetensors")):
            raise EdgeMoEError(
                f"model {text} does not exist (no such file)",
                "give an existing path, or a name from `edgemoe list` / `edgemoe models`",
            )
        known = [*registry.load(), *store_names()]
        close = difflib.get_close_matches(name.lower(), [n.lower() for n in known], n=1, cutoff=0.4)
        guess = next((f"did you mean '{n}'? " for n in known if close and n.lower() == close[0]), "")
        raise EdgeMoEError(
            f"unknown model '{name}'", f"{guess}give a GGUF path, or a name from `edgemoe list` / `edgemoe models`"
        )
    return canonical, tag


def _by_tag(name: str, tag: str, candidates: list[StoreGGUF]) -> StoreGGUF:
    match = [c for c in candidates if _norm_tag(c.tag) == _norm_tag(tag)]
    if not match:
        raise EdgeMoEError(f"the store has no {name}:{tag}", f"tags there: {_tags_line(name, candidates)}")
    return match[0]  # a made GGUF wins over a pulled one of the same tag, as store_ggufs orders them


def _path_or_tagged(text: str | Path) -> tuple[ModelChoice | None, str, list[StoreGGUF]]:
    """What every resolver settles first: an existing path as given, NAME:TAG as tagged (choice, NAME, its GGUFs);
    for a bare NAME the choice is None and the caller picks among NAME's GGUFs by its own rule."""
    path = Path(str(text)).expanduser()
    if path.exists():
        return ModelChoice(str(text), path), "", []
    name, tag = _lookup_name(str(text))
    candidates = store_ggufs(name)
    if tag is not None:
        pick = _by_tag(name, tag, candidates)
        return ModelChoice(str(text), _present(pick), pick.ref, "as tagged"), name, candidates
    return None, name, candidates


def resolve_gguf(text: str | Path) -> ModelChoice:
    """A GGUF to run or measure: an existing path as given, else NAME[:TAG] from the store.

    Without a tag: the GGUF the user last made for NAME (newest file under gguf/NAME/), else the pulled ready-made
    GGUF; several pulled quants and nothing made is ambiguous and lists the tags.
    """
    choice, name, candidates = _path_or_tagged(text)
    if choice is not None:
        return choice
    made = [c for c in candidates if c.kind == "made"]
    if made:
        pick = max(made, key=lambda c: c.mtime)
        why = "the newest GGUF you made" + (
            f"; others: {', '.join(c.tag for c in made if c is not pick)}" if len(made) > 1 else ""
        )
        return ModelChoice(str(text), _present(pick), pick.ref, why)
    if len(candidates) == 1:
        return ModelChoice(str(text), _present(candidates[0]), candidates[0].ref, "the ready-made GGUF you pulled")
    if candidates:
        raise EdgeMoEError(
            f"{name} has several GGUFs: {_tags_line(name, candidates)}", f"pick one, e.g. {candidates[0].ref}"
        )
    raise EdgeMoEError(f"the store has no GGUF of {name} yet", _make_hint(name))


def _make_hint(name: str) -> str:
    if _checkpoint(name) is not None:
        return f"make one with `edgemoe quantize {name} --recipe edge-balanced`"
    return f"run `edgemoe pull {name}` (or `--format gguf` for a ready-made one), then `edgemoe quantize {name}`"


def _present(pick: StoreGGUF) -> Path:
    if not pick.path.is_file():
        raise EdgeMoEError(
            f"{pick.ref} should be at {pick.path}, which is gone",
            f"pull it again, or `edgemoe rm {pick.ref}` to forget it",
        )
    return pick.path


def _checkpoint(name: str) -> Path | None:
    """The safetensors checkpoint of a registry name (pulled, or a local source), or None."""
    entry = registry.load().get(name)
    if entry is None or (entry.source != "local" and not (registry.store_entry(name) / "manifest.json").exists()):
        return None
    return registry.resolve(name)  # a damaged manifest or files gone are errors worth their own message


def checkpoint_outtype(checkpoint: Path) -> str:
    """The GGUF type that keeps a checkpoint's weights exactly: its own dtype (bf16 when config.json is silent)."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    dtype = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return _OUTTYPE_OF_DTYPE.get(str(dtype), "bf16")


def source_gguf(text: str | Path, progress: Progress | None = None, convert: bool = True) -> ModelChoice:
    """An unquantized GGUF to quantize, plan or measure an imatrix on: a path as given, NAME:TAG, or for NAME the
    store's converted GGUF (the most precise), converting the pulled checkpoint into gguf/NAME/ first when the store
    has none (`convert` False: saying so instead, for plan --dry-run, which does nothing expensive).
    """
    choice, name, candidates = _path_or_tagged(text)
    if choice is not None:
        return choice
    converted = [c for c in candidates if c.state == "converted"]
    if converted:
        rank = {t: i for i, t in enumerate(_SOURCE_ORDER)}
        pick = min(converted, key=lambda c: (rank.get(c.tag.lower(), len(rank)), -c.mtime))
        return ModelChoice(str(text), _present(pick), pick.ref, "the unquantized GGUF in the store")
    checkpoint = _checkpoint(name)
    if checkpoint is None:
        pulled = [c.ref for c in candidates if c.kind == "pulled"]
        hint = (
            f"only ready-made quantized GGUFs are here ({', '.join(pulled)}): `edgemoe pull {name}` fetches the "
            "safetensors to quantize from"
            if pulled
            else f"run `edgemoe pull {name}` first"
        )
        raise EdgeMoEError(f"the store has nothing of {name} to quantize from", hint)
    if not convert:
        raise EdgeMoEError(
            f"the store has no converted GGUF of {name} yet",
            "run the command without --dry-run: it converts the pulled checkpoint first",
        )
    from .convert import convert as convert_checkpoint

    outtype = checkpoint_outtype(checkpoint)
    out = _gguf_root() / name / f"{outtype}.gguf"
    convert_checkpoint(checkpoint, out, outtype, progress=progress)
    return ModelChoice(str(text), out, f"{name}:{outtype}", "converted from the pulled checkpoint", converted=True)


def checkpoint_dir(text: str | Path) -> Path:
    """A Hugging Face checkpoint to convert: a directory as given, or a registry name's pulled (or local) one."""
    return registry.resolve(text)


@dataclass
class StoreItem:
    name: str
    ref: str  # what to type: NAME (the pulled checkpoint) or NAME:TAG (a GGUF)
    state: str  # pulled | converted | quantized | pruned; "pulled (files missing)" when the files went away
    size: int
    detail: str
    path: str


def store_items() -> list[StoreItem]:
    """What the store holds, one row per thing a user can type: pulled checkpoints (NAME) and GGUFs (NAME:TAG)."""
    items: list[StoreItem] = []
    for name in store_names():
        for damaged in _damaged_manifests(name):
            items.append(StoreItem(name, name, "damaged manifest", 0, "run `edgemoe pull` for it again", str(damaged)))
        manifest = registry.read_manifest(_models_root() / name) or {}
        if manifest.get("kind") == "pull":
            present = all((Path(manifest["path"]) / f["name"]).is_file() for f in manifest.get("files", []))
            items.append(
                StoreItem(
                    name,
                    name,
                    "pulled" if present else "pulled (files missing)",
                    manifest.get("total_bytes", 0),
                    f"safetensors {manifest.get('repo')}@{str(manifest.get('commit'))[:12]}",
                    str(manifest["path"]),
                )
            )
        for g in store_ggufs(name):
            state = g.state if g.kind == "made" or g.path.is_file() else "pulled (files missing)"
            detail = f"gguf {g.tag} {g.detail}" if g.kind == "pulled" else g.detail
            items.append(StoreItem(name, g.ref, state, g.size, detail, str(g.path)))
    return items


def _damaged_manifests(name: str) -> list[Path]:
    """Pull manifests of `name` that exist but do not read as one (the store is a directory anyone may edit)."""
    dirs = [_models_root() / name, *sorted((_models_root() / name).glob("gguf-*"))]
    return [d / "manifest.json" for d in dirs if (d / "manifest.json").exists() and registry.read_manifest(d) is None]


@dataclass
class Removal:
    """What `edgemoe rm` deletes: paths inside the store only, and what it leaves (pulled files in the HF cache)."""

    ref: str
    paths: list[str]
    bytes: int
    kept: list[str]  # pulled files outside the store, which rm never touches


def _inside_store(path: Path) -> bool:
    root = store.home().resolve()
    return not path.is_symlink() and path.resolve().is_relative_to(root) and path.resolve() != root


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def plan_removal(text: str) -> Removal:
    """The store paths `rm NAME[:TAG]` would delete; NAME alone is everything the store holds for NAME."""
    name, tag = split_ref(text)
    canonical = next((n for n in store_names() if n.lower() == name.lower()), None)
    if canonical is None:
        raise EdgeMoEError(f"the store holds nothing called {name}", "see `edgemoe list`")
    kept: list[str] = []
    if tag is None:
        paths = [p for p in (_gguf_root() / canonical, _models_root() / canonical) if p.exists()]
        for manifest_dir in [_models_root() / canonical, *sorted((_models_root() / canonical).glob("gguf-*"))]:
            if (m := registry.read_manifest(manifest_dir)) and m.get("path"):
                kept.append(str(m["path"]))
    else:
        pick = _by_tag(canonical, tag, store_ggufs(canonical))
        if pick.kind == "made":
            paths = [p for p in (pick.path, pick.path.with_name(pick.path.name + ".manifest.json")) if p.exists()]
        else:
            paths = [_models_root() / canonical / f"gguf-{pick.tag}"]
            kept.append(str(pick.path.parent))
    outside = [str(p) for p in paths if not _inside_store(p)]
    if outside:
        raise EdgeMoEError(
            f"{outside[0]} is not inside the store {store.home()}", "rm only deletes the store's own files"
        )
    return Removal(text, [str(p) for p in paths], sum(_size(p) for p in paths), kept)


def remove(removal: Removal) -> Removal:
    """Delete what `plan_removal` listed (each path re-checked to be inside the store)."""
    for p in map(Path, removal.paths):
        if not _inside_store(p):
            raise EdgeMoEError(f"{p} is not inside the store {store.home()}", "rm only deletes the store's own files")
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    return removal
