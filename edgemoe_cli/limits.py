"""A wall-clock bound on pure-Python work driven by untrusted input (recipe regexes, chat templates).

Python's `re` and jinja2 have no timeout of their own, and a pattern like `(.|.)*Z` or nested template loops can
run for hours on a few bytes of input. SIGALRM interrupts both (the regex engine checks for signals while it
backtracks). Signals reach only the main thread: elsewhere the work runs unbounded, as before.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class TimeLimitExceeded(Exception):
    """The bounded block ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeLimitExceeded inside the block once it has run `seconds` (main thread only)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    previous_timer = signal.getitimer(signal.ITIMER_REAL)
    if previous_timer[0] > 0:  # someone else's timer is running: do not take it over
        yield
        return

    def on_alarm(signum, frame):
        raise TimeLimitExceeded(f"ran longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def memory_limit(extra_bytes: int) -> Iterator[None]:
    """Let the process's address space grow by at most `extra_bytes` inside the block (MemoryError beyond).

    For short pure-Python work on untrusted input (rendering a chat template), where no time limit stops one
    huge allocation in time. Linux only; elsewhere the block runs unbounded. Main thread only, like time_limit:
    RLIMIT_AS is the whole process's, so in a threaded server two overlapping blocks could restore each other's
    limit and leave the process capped for good (serve relies on the bounded environment's size checks instead).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        import resource

        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        yield
        return
    target = used + extra_bytes
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if soft != resource.RLIM_INFINITY and soft <= target:  # already bounded at least as tightly
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (target, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
