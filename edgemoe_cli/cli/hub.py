"""`edgemoe pull`: download a model from the Hugging Face Hub (stage: hub.py)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..units import human_bytes
from .common import console, emit_json, err_console, json_option

NameArg = Annotated[str, typer.Argument(help="A model name from `edgemoe models`, e.g. ernie-4.5-21b-a3b-thinking.")]
RevisionOpt = Annotated[
    Optional[str], typer.Option("--revision", "-r", help="Branch, tag or commit (default: the registry's pin).")
]
FmtOpt = Annotated[str, typer.Option("--format", help="safetensors (to convert yourself) or gguf (ready-made).")]
QuantOpt = Annotated[
    Optional[str], typer.Option("--quant", "-q", help="With --format gguf: which quant, e.g. Q4_0, Q4_K_M.")
]
DestOpt = Annotated[
    Optional[Path], typer.Option("--dest", help="Hugging Face cache directory to use instead of $HF_HOME/hub.")
]
TokenOpt = Annotated[
    Optional[str], typer.Option("--token", help="Hub token for gated/private repos (default: $HF_TOKEN).")
]


def pull(
    name: NameArg,
    revision: RevisionOpt = None,
    fmt: FmtOpt = "safetensors",
    quant: QuantOpt = None,
    dest: DestOpt = None,
    token: TokenOpt = None,
    as_json: bool = json_option("the result (commit, files, sizes, sha256)"),
) -> None:
    """Download a model from the Hugging Face Hub, resumably, and verify every byte.

    The files land in huggingface_hub's cache ($HF_HOME/hub, or --dest) in its usual layout, so other tools share
    them; a manifest (repo, resolved commit, files, sizes, sha256) goes to the edgemoe store
    (models/NAME/manifest.json), and later commands accept NAME instead of a path.

    Before the first byte, the sizes from the Hub are checked against free disk (keeping EDGEMOE_DISK_RESERVE,
    default 512M, free). An interrupted pull resumes where it stopped when you run the same command again. Every LFS
    file's sha256 (and every small file's git id) is checked against the Hub; a mismatching file is deleted and
    named. With HF_HUB_OFFLINE=1 the pull resolves from the cache and lists what is missing. Honours HF_ENDPOINT,
    HF_TOKEN, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE.

    Examples:
      edgemoe pull ernie-4.5-21b-a3b-thinking
      edgemoe pull ernie-4.5-21b-a3b-pt --format gguf --quant Q4_0     # one ~12 GB file instead of ~44 GB
    """
    from ..hub import pull as run_pull

    with _file_bars(name, disable=as_json) as progress:
        result = run_pull(name, fmt=fmt, quant=quant, revision=revision, dest=dest, token=token, progress=progress)
    if as_json:
        emit_json(result)
        return
    fresh = sum(f.status != "cached" for f in result.files)
    state = "from the cache (offline)" if result.offline else f"{fresh} downloaded, {len(result.files) - fresh} cached"
    console.print(
        f"[bold]{result.name}[/]: {result.repo}@{result.commit[:12]}, {len(result.files)} files "
        f"({human_bytes(result.total_bytes)}; {state}), sha256 verified",
        highlight=False,
    )
    console.print(f"  files:    {result.path}\n  manifest: {result.manifest}", highlight=False)


@contextmanager
def _file_bars(name: str, disable: bool):
    """hub.PullProgress on rich bars: one for the whole pull, one for the file being fetched."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from ..hub import PullProgress

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, TimeRemainingColumn(), console=err_console, transient=True, disable=disable) as bars:

        class Bars(PullProgress):
            def begin(self, files, total, done):
                self.all = bars.add_task(f"[bold]{name}[/] ({len(files)} files)", total=total, completed=done)

            def file_begin(self, fname, size, initial):
                self.one = bars.add_task(f"  {fname}", total=size, completed=initial)

            def advance(self, n):
                bars.advance(self.all, n)
                bars.advance(self.one, n)

            def file_end(self, fname):
                bars.remove_task(self.one)

        yield Bars()
