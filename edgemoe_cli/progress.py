"""The one shape of progress every stage reports in, so the CLI needs one display for all of them.

A stage takes `progress: Progress | None` and calls `progress(step, done, total, detail, unit)`:
- step: what is going on, as the user should read it ("convert to bf16", "quantize", "Thinking", ...); a new
  step is a new line of the display, the same step again moves its bar;
- done / total: units completed and expected (total None while unknown);
- detail: a short note that changes as it goes (the tensor being written, the build step);
- unit: "bytes" when done/total count bytes (shown as sizes and a rate), else "" (shown as N/M).
`progress or silent` spares a stage its `if progress:` guards.

Two stages keep their own richer shapes: build.run_build (done, total, what) and hub.pull's PullProgress (one
bar per file as well as the whole pull).
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, step: str, done: int, total: int | None, detail: str = "", unit: str = "") -> None: ...


def silent(step: str, done: int, total: int | None, detail: str = "", unit: str = "") -> None:
    """A Progress that shows nothing."""
