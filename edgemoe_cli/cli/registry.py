"""`edgemoe models`: the names edgemoe knows (stage: registry.py)."""

from __future__ import annotations

from dataclasses import asdict

from .common import console, emit_json, json_option


def models(as_json: bool = json_option("the registry")) -> None:
    """List the models edgemoe knows by name (configs/models.toml): repo, pinned revision, variant, formats.

    Any of these names works where a command takes a model: `edgemoe pull NAME`, `edgemoe convert NAME`.
    """
    from rich.table import Table

    from .. import registry

    entries = list(registry.load().values())
    if as_json:
        emit_json([asdict(e) for e in entries])
        return
    table = Table("name", "variant", "from", "revision", "gguf (default quant)", box=None, header_style="bold")
    table.columns[0].no_wrap = True
    for e in entries:
        table.add_row(
            e.name,
            e.variant,
            e.repo if e.source == "hub" else f"local: {e.path}",
            (e.revision or "")[:12],
            f"{e.gguf.repo} ({e.gguf.default_quant})" if e.gguf else "",
        )
    console.print(table)
