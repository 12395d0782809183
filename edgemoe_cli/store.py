"""The artifact store (~/.cache/edgemoe or $EDGEMOE_HOME), atomic outputs and manifests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
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


def _umask() -> int:
    # the process umask, read without changing it where /proc allows (os.umask can only be read by setting it)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a private temp file beside `path` to write to; fsync it and rename it to `path` only if the block
    completes.

    The temp file is new and unique to this writer (`path.<random>.part`, created with O_EXCL, so two commands
    writing the same output never share it and a symlink planted in the directory is never followed). A killed or
    failed command leaves no half file under the final name (and removes its own temp file on error); of two
    concurrent writers the last rename wins, whole.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=final.name + ".", suffix=".part", dir=final.parent)
    except OSError as e:
        raise EdgeMoEError(f"cannot write {final}: {e.strerror}", "choose a writable output path") from e
    part = Path(name)
    try:
        # mkstemp makes the file 0600; an output gets the permissions any new file of this user would
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    try:
        yield part
        # the writer may have replaced the file (os.replace onto it); flush what is there now to disk
        fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(part, final)
        with contextlib.suppress(OSError):
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (through symlinks, `..` or hard links)."""
    a, b = Path(a), Path(b)
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would be
        return a.resolve() == b.resolve()


def refuse_input_as_output(out: str | Path, inputs, option: str = "--out") -> None:
    """The one check every stage makes before writing: its output must not be one of the files it reads.

    Writing there would replace an input (a checkpoint shard, the model being quantized) with the output, or
    read a file while it is being replaced.
    """
    for source in inputs:
        if source is not None and same_file(out, source):
            raise EdgeMoEError(
                f"{option} {out} is an input of this command ({source})", "write the output to a new file"
            )


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
