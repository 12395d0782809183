"""The artifact store (~/.cache/edgemoe or $EDGEMOE_HOME), atomic outputs and manifests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from . import binding_path
from .errors import EdgeMoEError


def home() -> Path:
    """Root of the store: $EDGEMOE_HOME, else $XDG_CACHE_HOME/edgemoe, else ~/.cache/edgemoe."""
    return Path(binding_path.home())


def configs_dir() -> Path:
    """configs/ as shipped in the wheel (edgemoe_cli/configs), or the source checkout's top-level configs/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise EdgeMoEError("edgemoe's configs/ directory is missing", "reinstall edgemoe")


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield `path.part` to write to; rename it to `path` only if the block completes.

    A killed or failed command leaves no half file under the final name (and removes its own .part on error).
    """
    final = Path(path)
    part = final.with_name(final.name + ".part")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "wb"):
            pass
    except OSError as e:
        raise EdgeMoEError(f"cannot write {final}: {e.strerror}", "choose a writable output path") from e
    try:
        yield part
        os.replace(part, final)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(artifact: str | Path, **fields) -> Path:
    """Write `<artifact>.manifest.json` (or `<dir>/manifest.json` for a directory) atomically."""
    artifact = Path(artifact)
    target = artifact / "manifest.json" if artifact.is_dir() else artifact.with_name(artifact.name + ".manifest.json")
    with atomic_output(target) as part:
        part.write_text(json.dumps(fields, indent=2, sort_keys=True, default=str) + "\n")
    return target


def builds_dir() -> Path:
    """Where `edgemoe build` caches llama.cpp builds: $EDGEMOE_BUILDS, else <store>/builds.

    Separate from the store so tests can give each test its own store yet share one build per machine.
    """
    return Path(binding_path.builds_dir())
