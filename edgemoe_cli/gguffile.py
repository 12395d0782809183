"""GGUF files as edgemoe's commands meet them: found (a path, or NAME[:TAG] through models.py), checked to be a GGUF,
opened once, and read for the ERNIE-4.5 MoE shape the routing and pruning stages need.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import EdgeMoEError

GGUF_MAGIC = b"GGUF"
ERNIE_MOE_ARCH = "ernie4_5-moe"


def check_gguf(path: str | Path) -> Path:
    """A readable GGUF file, or an EdgeMoEError naming what is wrong with `path`."""
    path = Path(path)
    if not path.exists():
        raise EdgeMoEError(f"{path}: no such file", "give the path of a .gguf model (`edgemoe convert` makes one)")
    if not path.is_file():
        raise EdgeMoEError(f"{path} is not a file", "give the path of a .gguf model file, not a directory")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise EdgeMoEError(f"cannot read {path}: {e.strerror}", "check the file's permissions") from e
    if magic != GGUF_MAGIC:
        raise EdgeMoEError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
            "convert the Hugging Face checkpoint first: `edgemoe convert SRC_DIR --out model.gguf`",
        )
    return path


def architecture(path: Path) -> str | None:
    """general.architecture of a GGUF, or None when the file cannot tell."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).get_field("general.architecture")
        return field.contents() if field is not None else None
    except Exception:  # a GGUF too broken for the reader: the caller's message already says it cannot load
        return None


def find_gguf(model: str | Path) -> Path:
    """A GGUF path as given, or NAME[:TAG] resolved to a store GGUF (models.resolve_gguf), checked to be a GGUF."""
    from .models import resolve_gguf

    return check_gguf(resolve_gguf(model).path)


def open_gguf(path: str | Path):
    """A GGUFReader over `path`, or an EdgeMoEError saying what is wrong with the file (one parse per command)."""
    from gguf import GGUFReader

    path = check_gguf(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/struct errors on a damaged file
        raise EdgeMoEError(f"{path}: unreadable GGUF ({str(e)[:200]})", "convert or quantize the model again") from e
    # the reader decodes values only when asked: decode every one now, so a damaged key (a string that is not
    # UTF-8) is this one error here rather than a crash wherever a command first reads it
    for f in reader.fields.values():
        try:
            f.contents()
        except Exception as e:  # noqa: BLE001 - UnicodeDecodeError, IndexError, ValueError from damaged parts
            raise EdgeMoEError(
                f"{path}: key {f.name[:80]!r} is damaged ({type(e).__name__})", "convert or quantize the model again"
            ) from e
    return reader


def moe_shape(reader, path: str | Path) -> tuple[str, int, int, list[int]]:
    """(architecture, expert count, used count, MoE block indices) of an open GGUF; EdgeMoEError if not ERNIE MoE."""
    arch_field = reader.get_field("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if arch != ERNIE_MOE_ARCH:
        raise EdgeMoEError(
            f"{path} is a {arch or 'unknown'} model, not ERNIE-4.5 MoE ({ERNIE_MOE_ARCH})",
            "give a GGUF made from ERNIE-4.5-21B-A3B (Thinking or PT) by `edgemoe convert`",
        )

    def key(name: str) -> int:
        f = reader.get_field(f"{arch}.{name}")
        if f is None:
            raise EdgeMoEError(f"{path} lacks {arch}.{name}", "convert the model again with `edgemoe convert`")
        value = f.contents()
        if type(value) is not int or value <= 0:
            raise EdgeMoEError(
                f"{path}: {arch}.{name} is {str(value)[:40]!r}, not a positive whole number",
                "convert the model again with `edgemoe convert`",
            )
        return value

    layers = sorted(
        {int(m.group(1)) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.ffn_gate_exps\.", t.name))}
    )
    return arch, key("expert_count"), key("expert_used_count"), layers


def gguf_moe_shape(path: str | Path) -> tuple[str, int, int, list[int]]:
    """moe_shape of the GGUF at `path`, for callers that need nothing else from the file."""
    return moe_shape(open_gguf(path), path)
