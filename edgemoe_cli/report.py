"""Reports people can look at: Markdown tables, JSON documents and PNG plots, shared by compare, bench, profile, plan.

Plots use matplotlib with the Agg backend (no display needed on a board or in CI). Every file is written through
store.atomic_output, so a failed plot leaves nothing under the final name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import EdgeMoEError
from .store import atomic_output


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise EdgeMoEError(
            "matplotlib is not installed, so no PNG plots can be drawn",
            "pip install 'edgemoe[plot]' (make setup installs it)",
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    try:
        with atomic_output(path) as part:
            fig.savefig(part, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def write_json(data: Any, path: str | Path) -> Path:
    data = asdict(data) if is_dataclass(data) else data
    with atomic_output(path) as part:
        part.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    with atomic_output(path) as part:
        part.write_text(text, encoding="utf-8")
    return Path(path)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):  # tokens/s to two decimals, small quantities (KLD) to four significant digits
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; `align` is one letter a column (l/r), default: numbers right, text left."""
    if align is None:
        first = rows[0] if rows else [""] * len(headers)
        align = "".join("r" if isinstance(v, (int, float)) and not isinstance(v, bool) else "l" for v in first)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fenced(text: str) -> str:
    """Text inside a Markdown code fence long enough never to be closed by the text itself."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text.rstrip()}\n{fence}\n"


# ---- plots ----


def usage_heatmap(counts: np.ndarray, layers: Sequence[int], path: str | Path, title: str) -> Path:
    """Layers x experts heatmap of the share of each layer's routed tokens that went to each expert."""
    plt = _pyplot()
    counts = np.asarray(counts, dtype=np.float64)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, counts.shape[1] * 0.22 + 2), max(2.5, len(layers) * 0.3 + 1.5)))
    im = ax.imshow(share * 100, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer (block)")
    ax.set_yticks(range(len(layers)), [str(il) for il in layers])
    step = max(1, counts.shape[1] // 16)
    ax.set_xticks(range(0, counts.shape[1], step))
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="% of the layer's routed tokens")
    return _save(fig, path)


Series = dict[str, tuple[Sequence[float], Sequence[float], "Sequence[float] | None"]]  # name -> (x, y, yerr)


def line_plot(
    panels: dict[str, Series],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    xticks: Sequence[float] | None = None,
    hlines: dict[str, dict[str, float]] | None = None,
    point_labels: dict[str, dict[str, Sequence[str]]] | None = None,
) -> Path:
    """Side-by-side panels (panel title -> series), one line with error bars per series.

    `hlines` (panel -> label -> y) draws dashed references, named in the legend; `point_labels` (panel -> series ->
    one text per point) names the points, e.g. by recipe; `xticks` puts ticks exactly there (e.g. thread counts).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items()):
        for name, (x, y, err) in series.items():
            ax.errorbar(list(x), list(y), yerr=None if err is None else list(err), marker="o", capsize=3, label=name)
            for px, py, text in zip(x, y, (point_labels or {}).get(panel, {}).get(name, [])):
                ax.annotate(text, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7, color="dimgrey")
        for i, (name, y) in enumerate((hlines or {}).get(panel, {}).items()):
            ax.axhline(y, linestyle="--", linewidth=1, color=f"C{(i + len(series)) % 10}", label=name)
        if xticks is not None:
            ax.set_xticks(list(xticks), [f"{t:g}" for t in xticks])
        else:
            ax.ticklabel_format(axis="x", useOffset=False, style="plain")
        ax.set_ylim(bottom=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def rank_plot(counts: np.ndarray, layers: Sequence[int], path: str | Path, title: str) -> Path:
    """Each layer's expert usage share against its rank, log-log: a power law is a straight line here."""
    plt = _pyplot()
    counts = np.asarray(counts, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for il, row in zip(layers, counts):
        share = np.sort(row[row > 0])[::-1] / max(row.sum(), 1)
        ax.plot(np.arange(1, len(share) + 1), share, marker=".", linewidth=1, label=f"layer {il}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("expert rank in its layer")
    ax.set_ylabel("share of the layer's routed tokens")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if len(layers) <= 12:
        ax.legend(fontsize=7)
    return _save(fig, path)
