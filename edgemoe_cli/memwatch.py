"""Peak memory of a long command, split into what a board must hold and what it can give back, stage by stage.

The kernel keeps one high-water mark per process (VmHWM, ru_maxrss), and it counts every resident page alike: the
pages of a GGUF mapped and touched (RssFile: page cache, clean, dropped under memory pressure and read again) and
anonymous memory (RssAnon: heap, llama.cpp's buffers, repacked weights; with no swap it stays until freed). Only
the second decides whether `plan` fits on a board of a given RAM, so a thread samples /proc/PID/status of this
process and its children (llama-imatrix) every `interval` seconds and keeps, per stage, the peak of each sum.
Sampled, so a spike shorter than the interval can be missed; the kernel's exact total peak is still reported next
to it (plan.peak_rss).

Stages name themselves (`stage("quantize q3_k")`) wherever the work is, without a watch being passed through every
signature: `stage` does nothing while no watch is running.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

# RssShmem is anonymous in the sense that matters (no file to drop it to: swap-backed)
_ANON = ("RssAnon:", "RssShmem:")
_FILE = ("RssFile:",)


@dataclass
class MemoryPeak:
    anon_bytes: int = 0  # peak anonymous memory, this process and its children: cannot be reclaimed without swap
    file_bytes: int = 0  # peak mapped file pages (clean page cache: reclaimable, read again when touched)


def process_rss(pid: int | str = "self") -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of one process, from /proc/PID/status; (0, 0) once it is gone."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(_ANON):
                    anon += int(line.split()[1]) * 1024
                elif line.startswith(_FILE):
                    file += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return anon, file


def _children() -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process().children(recursive=True)]
    except Exception:  # psutil missing or a child gone mid-scan: the next sample sees them
        return []


_active: MemoryWatch | None = None


def stage(name: str) -> None:
    """Attribute what follows to stage `name` in the running watch (none running: nothing)."""
    if _active is not None:
        _active.stage(name)


class MemoryWatch:
    """Context manager: samples while open; `peaks` maps each stage to its MemoryPeak, `overall` is the whole run's."""

    def __init__(self, interval: float = 0.1, first_stage: str = "start"):
        self.interval = interval
        self.peaks: dict[str, MemoryPeak] = {}
        self.overall = MemoryPeak()
        self._stage = first_stage
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outer: MemoryWatch | None = None

    def sample(self) -> None:
        anon, file = process_rss()
        for pid in _children():
            a, f = process_rss(pid)
            anon, file = anon + a, file + f
        with self._lock:
            for peak in (self.peaks.setdefault(self._stage, MemoryPeak()), self.overall):
                peak.anon_bytes = max(peak.anon_bytes, anon)
                peak.file_bytes = max(peak.file_bytes, file)

    def stage(self, name: str) -> None:
        self.sample()  # the last moment of the stage that ends
        with self._lock:
            self._stage = name
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemoryWatch:
        global _active
        self._outer, _active = _active, self
        self.sample()
        self._thread = threading.Thread(target=self._run, name="memwatch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        global _active
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        _active = self._outer


def running() -> MemoryWatch | None:
    """The innermost watch running, if any."""
    return _active
