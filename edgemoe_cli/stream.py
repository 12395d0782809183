"""`edgemoe run --memory SIZE`: run a GGUF larger than memory by streaming routed experts from the file.

Stock llama.cpp, public seams only. The model is loaded with mmap on and llama.cpp's extra buffer types off (weight
repacking and AMX copy every expert into anonymous memory at load; without them each weight stays in the GGUF's own
layout), so the non-expert weights stay what they are today: pages of the file, faulted in once and kept hot.
The routed experts (`blk.N.ffn_{gate,up,down}_exps.weight`, 3-D tensors stacking every expert of a layer) never
run from the file mapping. A `cb_eval` callback on the scheduler:

- asks for each MoE layer's routing node `ffn_moe_topk-N`, so ggml computes the graph up to it, stops, and hands
  over the chosen expert ids (int32 [experts used, tokens]); the callback reads the missing experts' slices from
  the file (`pread` at tensor offset + e * nb[2]) into that tensor's stand-in before the layer's expert matmuls run;
- points each expert tensor's `->data` (seen as src[0] of a MUL_MAT_ID node) at its stand-in: one anonymous
  MAP_NORESERVE region of the tensor's full size, in which only the cached experts' pages exist. MUL_MAT_ID reads
  only the slices of the experts a token was routed to, so the rest of the region is never touched.

The cache holds (layer, expert) sets and evicts the least often routed first (least recently used among equals):
a miss reads the expert's three slices (4 reads in flight), an eviction hands the evicted expert's pages to the
read that replaces it (mremap moves them, so no page is freed, zeroed and faulted in again: that cost ~14 ms of CPU
per token on the benchmark model) and gives back the rest (madvise MADV_DONTNEED), so resident expert bytes stay
within the cache budget. Reads are O_DIRECT where the file system
allows (no page-cache copy to allocate and reclaim under a cap, no readahead of unrouted neighbours), else
buffered and dropped from the page cache at once. The expert ranges of llama.cpp's own mapping are dropped
(MADV_RANDOM, MADV_DONTNEED) once their tensors point at the stand-ins, so they never count again.
Greedy output is identical to the resident run without repacking: the same bytes reach the same kernels. (With
repacking, the default when a model fits, llama.cpp runs other kernels whose rounding differs.)

The callback runs for every graph node (~340 calls per token at 5 layers, ~1900 at 28), and reads are asynchronous: the
routing node queues them in the order the layer's expert matmuls run, and each matmul waits only for its own
tensor's slices, so the first projection computes while the others are still being read. stream_cb.c, compiled
once per machine into the store, does the per-node answers, the reads (POSIX threads) and the waits in C; Python
sees one call per MoE layer and step (what to read, what to evict) and none of the interpreter-lock contention that
reader threads in Python cause. Without a C compiler, or with EDGEMOE_STREAM_NATIVE=0, Python does all of it, the
same way, slower.

Opt-in (EDGEMOE_STREAM_PREFETCH=1): the experts the next layer's router would pick from this layer's FFN input are
read ahead while this layer computes (queued to the C readers behind this layer's reads, or on a Python thread);
measured to cost more than it gains on the benchmark model (bench/stream.md), so it is off by default.

Budget: --memory = resident weights (everything in the file but the routed experts) + KV cache + runtime
(the process's anonymous memory and llama.cpp's compute buffers) + expert cache. A prompt ubatch can route to every
expert of a layer, and a layer's experts must all be present while its matmuls run, so the physical batch is cut to
what the cache holds (cache experts / experts per token): prompts are processed in smaller steps, tokens are not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import heapq
import mmap
import os
import platform
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgeMoEError
from .units import human_bytes, parse_size

_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_ROUTING_NODE = re.compile(rb"^ffn_moe_topk-(\d+)$")
_PROJECTIONS = ("gate", "up", "down")
_MAP_NORESERVE = 0x4000  # Linux: no swap/commit reservation for a region that is mostly never touched
_PAGE = mmap.PAGESIZE
_MAX_UBATCH = 512  # llama.cpp's default physical batch
_READERS = 4  # reads in flight at once
_PREFETCH_RANKS = 2  # with C readers, the next layer's 2 likeliest experts are read ahead when not cached
# llama.cpp's compute buffers and the runtime's own allocations, beyond the interpreter measured before loading:
# a fixed part (graph metadata, output buffer, allocator slack) and a part per token of the physical batch.
_RUNTIME_FIXED = 48 * 2**20
_F32 = 4


@dataclass
class ExpertTensor:
    name: str
    layer: int
    projection: str  # gate | up | down
    file_offset: int  # absolute offset of the tensor's data in the GGUF
    nbytes: int
    slice_bytes: int  # one expert's slice: nb[2]
    n_expert: int


@dataclass
class MemoryPlan:
    """How --memory is split; `streams` is False when the whole model fits (then the run is today's run)."""

    memory_bytes: int
    model_bytes: int  # the GGUF file
    expert_bytes: int  # routed-expert tensors in it
    resident_weight_bytes: int  # the rest of the file: weights every token uses, metadata
    kv_bytes: int
    runtime_bytes: int  # estimate: this process before loading + compute buffers
    cache_bytes: int  # what is left for experts
    expert_set_bytes: int  # one expert's gate+up+down slices (largest over layers)
    n_expert: int
    n_expert_used: int
    n_ubatch: int
    streams: bool


@dataclass
class StreamStats:
    """What streaming did over one run; decode_* count generation only (the steps after the prompt)."""

    cache_bytes: int
    cache_experts: int  # (layer, expert) sets the cache holds at most
    resident_expert_bytes: int  # in the cache at the end
    peak_expert_bytes: int
    n_ubatch: int
    lookups: int
    hits: int
    misses: int
    hit_rate: float
    bytes_read: int
    read_wait_s: float  # blocked in pread
    hook_s: float  # the rest of the callback's time (bookkeeping, madvise)
    decode_tokens: int
    decode_bytes_read: int
    bytes_read_per_token: float  # decode bytes read / decode tokens
    decode_read_wait_s: float
    decode_hit_rate: float
    # CPU time of the whole process (compute, reader threads, kernel work such as page faults) and minor page faults
    # per generated token: what reading experts costs besides waiting
    decode_cpu_ms_per_token: float = 0.0
    decode_page_faults_per_token: float = 0.0
    prefetch_reads: int = 0  # experts read ahead by the prefetcher (next layer's router on this layer's input)
    prefetch_used: int = 0  # of those, asked for before being evicted
    prefetch_wait_s: float = 0.0  # waiting for a prefetch read of an expert the layer needed
    warm_bytes: int = 0  # read from the file before the first token, from a profile (not in bytes_read)
    recycled_bytes: int = 0  # evicted experts' pages moved under new reads instead of freed and faulted anew
    compute_s: float | None = None  # run time minus read wait and hook time, filled in by the caller
    native_callback: bool = False  # stream_cb.c answered the nodes streaming ignores (else Python did)
    callbacks: int = 0  # node callbacks over the run, and how many of them reached Python
    python_callbacks: int = 0
    plan: dict = field(default_factory=dict)


# ---- the GGUF's experts and the budget ----


def expert_tensors(reader) -> list[ExpertTensor]:
    """Every routed-expert tensor of an open GGUFReader, with its place in the file (checked to lie inside it: the
    streamer sizes regions and reads by these numbers)."""
    found = []
    file_size = len(reader.data)
    for t in reader.tensors:
        m = _EXPERT_TENSOR.match(t.name)
        if not m:
            continue
        n_expert = int(t.shape[2]) if len(t.shape) >= 3 else 0
        nbytes = int(t.n_bytes)
        if n_expert < 1 or nbytes < 1 or nbytes % n_expert:
            raise EdgeMoEError(f"{t.name} is not a stack of experts ({list(t.shape)})", "convert the model again")
        if not 0 <= int(t.data_offset) <= file_size - nbytes:
            raise EdgeMoEError(f"{t.name} lies outside the GGUF (truncated file?)", "download or convert it again")
        found.append(
            ExpertTensor(
                name=t.name,
                layer=int(m.group(1)),
                projection=m.group(2),
                file_offset=int(t.data_offset),
                nbytes=nbytes,
                slice_bytes=nbytes // n_expert,
                n_expert=n_expert,
            )
        )
    return found


def _field(reader, key: str, default=None):
    f = reader.get_field(key)
    return f.contents() if f is not None else default


def kv_cache_bytes(reader, ctx: int) -> int:
    """f16 K and V for `ctx` tokens in every layer (llama.cpp's default cache types); ctx 0 = the trained length."""
    arch = _field(reader, "general.architecture", "")
    n_layer = int(_field(reader, f"{arch}.block_count", 0))
    n_embd = int(_field(reader, f"{arch}.embedding_length", 0))
    n_head = int(_field(reader, f"{arch}.attention.head_count", 1)) or 1
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    head_k = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    head_v = int(_field(reader, f"{arch}.attention.value_length", n_embd // n_head))
    n_ctx = ctx or int(_field(reader, f"{arch}.context_length", 4096))
    return n_layer * n_ctx * n_head_kv * (head_k + head_v) * 2


def _runtime_per_token(reader) -> int:
    """Compute-buffer bytes per token of the physical batch: activations of the widest layer and the logits."""
    arch = _field(reader, "general.architecture", "")
    n_embd = int(_field(reader, f"{arch}.embedding_length", 0))
    n_ff = max(
        int(_field(reader, f"{arch}.feed_forward_length", 0)),
        int(_field(reader, f"{arch}.expert_feed_forward_length", 0))
        * int(_field(reader, f"{arch}.expert_used_count", 1)),
    )
    tokens = reader.get_field("tokenizer.ggml.tokens")
    n_vocab = len(tokens.data) if tokens is not None else 0
    return _F32 * (8 * n_embd + 3 * n_ff + n_vocab)


def anonymous_rss() -> int:
    """This process's resident anonymous memory (heap, interpreter, buffers), not counting mapped file pages."""
    return _status_rss(("RssAnon:",))


def _status_rss(kinds: tuple[str, ...]) -> int:
    """The sum of these /proc/self/status Rss lines (RssAnon:, RssFile:, ...) of this process."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            found = [int(line.split()[1]) * 1024 for line in f if line.startswith(kinds)]
        if found:
            return sum(found)
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc (macOS: bytes): an upper bound
    return peak if sys.platform == "darwin" else peak * 1024


def _own_cgroup_dirs() -> list[Path]:
    """This process's memory cgroup directory and its ancestors (cgroup v1 `memory` or v2), innermost first."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    dirs = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            root = Path("/sys/fs/cgroup/memory")
        elif controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            root = Path("/sys/fs/cgroup")
        else:
            continue
        here = root / rel.lstrip("/")
        while True:
            dirs.append(here)
            if here == root:
                break
            here = here.parent
    return dirs


def _cgroup_headroom(d: Path) -> int | None:
    """limit - (usage - page cache) of one cgroup directory (page cache counts but is given back), or None."""
    for limit_file, usage_file, cache_key in (
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache"),
        ("memory.max", "memory.current", "file"),
    ):
        try:
            limit = (d / limit_file).read_text().strip()
            usage = int((d / usage_file).read_text())
            stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines() if " " in line)
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 2**60:
            return None
        return int(limit) - (usage - int(stat.get(cache_key, 0)))
    return None


def _runtime_rss() -> int:
    """What this process holds before the model loads, llama.cpp's libraries mapped: anonymous memory and the
    pages of mapped files (interpreter, libraries). Both count against a board's RAM and a cgroup's limit; counting
    only the anonymous part left the smallest caps on the edge, the weights every token uses evicted and re-read
    (bench/stream.md, 25% cap)."""
    from .llamacpp import import_binding

    import_binding()
    return _status_rss(("RssAnon:", "RssFile:"))


def available_memory() -> int:
    """What --memory auto gives this process: what it holds now plus what it may still fill (the machine's
    available memory, or its cgroups' headroom if smaller)."""
    import psutil

    free = psutil.virtual_memory().available
    for d in _own_cgroup_dirs():
        room = _cgroup_headroom(d)
        if room is not None:
            free = min(free, room)
    return max(free, 0) + anonymous_rss()


def parse_memory(memory: str | int) -> int:
    """--memory: a size (units.parse_size) or 'auto' (the RAM available now)."""
    if isinstance(memory, int):
        return memory
    if str(memory).strip().lower() == "auto":
        return available_memory()
    return parse_size(memory, "--memory")


def minimum_memory(model: str | Path, ctx: int = 4096, reader=None) -> int:
    """The smallest --memory that streams `model`: resident weights, KV cache, runtime at a 1-token batch and the
    experts one token routes to in one layer (a layer's routed experts must all be present while it runs)."""
    from .gguffile import moe_shape, open_gguf

    path = Path(model)
    reader = reader if reader is not None else open_gguf(path)
    experts = expert_tensors(reader)
    _, _, n_used, _ = moe_shape(reader, path)
    per_layer: dict[int, int] = {}
    for t in experts:
        per_layer[t.layer] = per_layer.get(t.layer, 0) + t.slice_bytes
    resident = path.stat().st_size - sum(t.nbytes for t in experts)
    runtime = _runtime_rss() + _RUNTIME_FIXED + _runtime_per_token(reader)
    return resident + kv_cache_bytes(reader, ctx) + runtime + n_used * max(per_layer.values(), default=0)


def plan_memory(model: str | Path, memory: str | int, ctx: int = 4096, batch: int | None = None) -> MemoryPlan:
    """Split --memory into resident weights, KV cache, runtime and expert cache, before anything is loaded.

    `ctx`: the context the KV cache is sized for; `batch`: the most tokens the run decodes at once, when known (the
    physical batch, and with it the compute buffer, is then planned no larger than the power of two holding it).
    EdgeMoEError when the memory cannot hold the weights every token uses plus one token's experts.
    """
    from .gguffile import moe_shape, open_gguf

    path = Path(model)
    budget = parse_memory(memory)
    reader = open_gguf(path)
    model_bytes = path.stat().st_size
    experts = expert_tensors(reader)
    expert_bytes = sum(t.nbytes for t in experts)
    kv = kv_cache_bytes(reader, ctx)
    per_token = _runtime_per_token(reader)
    base_runtime = _runtime_rss() + _RUNTIME_FIXED
    full_runtime = base_runtime + per_token * _MAX_UBATCH
    resident = model_bytes - expert_bytes
    if budget >= model_bytes + kv + full_runtime or not experts:
        if not experts and budget < model_bytes + kv + full_runtime:
            raise EdgeMoEError(
                f"{path.name} ({human_bytes(model_bytes)}) does not fit in --memory {human_bytes(budget)} and has "
                "no routed experts to stream",
                f"give --memory of at least {human_bytes(model_bytes + kv + full_runtime)} or leave it out",
            )
        return MemoryPlan(
            memory_bytes=budget,
            model_bytes=model_bytes,
            expert_bytes=expert_bytes,
            resident_weight_bytes=resident,
            kv_bytes=kv,
            runtime_bytes=full_runtime,
            cache_bytes=expert_bytes,
            expert_set_bytes=0,
            n_expert=0,
            n_expert_used=0,
            n_ubatch=_MAX_UBATCH,
            streams=False,
        )
    _, n_expert, n_used, _ = moe_shape(reader, path)
    per_layer: dict[int, int] = {}
    for t in experts:
        per_layer[t.layer] = per_layer.get(t.layer, 0) + t.slice_bytes
    set_bytes = max(per_layer.values())
    # the physical batch is chosen so that one layer's routed experts for a whole ubatch fit in the cache
    fixed = resident + kv + base_runtime
    cache = budget - fixed - per_token  # with a 1-token ubatch
    if cache < n_used * set_bytes:
        need = minimum_memory(path, ctx, reader)
        context = f"a {ctx}-token context" if ctx else "the model's context"
        raise EdgeMoEError(
            f"--memory {human_bytes(budget)} is too small for {path.name}: the weights every token uses take "
            f"{human_bytes(resident)}, the KV cache {human_bytes(kv)} for {context}, the runtime "
            f"~{human_bytes(base_runtime + per_token)}, and one token's {n_used} experts per layer "
            f"{human_bytes(n_used * set_bytes)}",
            f"give --memory {human_bytes(need)} or more, or a smaller --ctx",
        )
    n_ubatch = 1
    for u in (_MAX_UBATCH, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if batch is not None and u >= 2 * max(batch, 1):  # half of it still holds the largest batch
            continue
        room = budget - fixed - per_token * u
        if room >= min(n_expert, n_used * u) * set_bytes:
            n_ubatch, cache = u, room
            break
    return MemoryPlan(
        memory_bytes=budget,
        model_bytes=model_bytes,
        expert_bytes=expert_bytes,
        resident_weight_bytes=resident,
        kv_bytes=kv,
        runtime_bytes=base_runtime + per_token * n_ubatch,
        cache_bytes=cache,
        expert_set_bytes=set_bytes,
        n_expert=n_expert,
        n_expert_used=n_used,
        n_ubatch=n_ubatch,
        streams=True,
    )


def page_cache_bytes(path: str | Path, ranges: list[tuple[int, int]]) -> int:
    """Bytes of `path`'s whole pages inside the [start, end) `ranges` that are in the page cache now (mincore over
    a private mapping of the file, never written; Linux). What the benchmark reports of the expert ranges."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        present = (ctypes.c_ubyte * (-(-size // _PAGE)))()
        base = ctypes.c_char.from_buffer(m)
        try:
            if libc.mincore(ctypes.addressof(base), size, present) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        finally:
            del base  # the mapping closes only without exported pointers
    pages = bytes(present)
    return _PAGE * sum(
        sum(b & 1 for b in pages[-(-start // _PAGE) : end // _PAGE]) for start, end in ranges if end > start
    )


# ---- the streamer ----


def _direct_fd(path: Path) -> int:
    """An O_DIRECT descriptor of `path` that has been seen to read (one aligned page), or -1: some file systems
    refuse O_DIRECT when opening, others only when reading (EINVAL). Decided once, here, for every reader."""
    if not hasattr(os, "O_DIRECT"):
        return -1
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return -1
    page = mmap.mmap(-1, _PAGE)  # page-aligned, as direct I/O wants its buffer
    try:
        os.preadv(fd, [page], 0)
        return fd
    except OSError:
        os.close(fd)
        return -1
    finally:
        page.close()


def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    if hasattr(libc, "mremap"):  # glibc, musl and bionic have it; elsewhere pages are freed and faulted as before
        libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        libc.mremap.restype = ctypes.c_void_p
    return libc


_MADV_RANDOM, _MADV_DONTNEED = 1, 4
# mremap: move the pages and leave the old range mapped but empty (Linux >= 5.7 for private anonymous memory)
_MREMAP_MAYMOVE, _MREMAP_FIXED, _MREMAP_DONTUNMAP = 1, 2, 4
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_CHECK_EVERY = 256  # moves between counts of the process's mappings


def _map_count() -> int:
    """This process's memory mappings (lines of /proc/self/maps); 0 where there is no /proc."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _max_map_count() -> int:
    """The kernel's limit on a process's mappings (vm.max_map_count, 65530 by default)."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65530


class _NativeRead(ctypes.Structure):
    """stream_cb.c's `struct edgemoe_read`."""

    _fields_ = [
        ("slot", ctypes.c_int32),
        ("fd", ctypes.c_int32),
        ("drop_cache", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("into", ctypes.c_int64),
        ("offset", ctypes.c_int64),
        ("size", ctypes.c_int64),
        ("need", ctypes.c_int64),
    ]


def _native_library():
    """stream_cb.c compiled for this machine (once, into the store), or None: no C compiler, or
    EDGEMOE_STREAM_NATIVE=0. Without it Python answers every node and reads on Python threads, the same way, slower."""
    from .store import atomic_output, home

    if os.environ.get("EDGEMOE_STREAM_NATIVE", "1") == "0":
        return None
    source = Path(__file__).with_name("stream_cb.c")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not source.is_file() or not cc:
        return None
    key = hashlib.sha256(source.read_bytes() + f"{cc}|{platform.machine()}|{sys.platform}".encode()).hexdigest()[:16]
    lib = home() / "cache" / "native" / f"stream_cb-{key}.so"
    try:
        if not lib.is_file():
            with atomic_output(lib) as part:
                subprocess.run(
                    [cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(part), str(source)],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
        native = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError):
        return None
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    native.edgemoe_stream_eval.restype = ctypes.c_bool
    native.edgemoe_stream_eval.argtypes = [ptr, ctypes.c_bool, ptr]
    native.edgemoe_stream_new.restype = ptr
    native.edgemoe_stream_new.argtypes = [i64, i64, i64, i32, ptr, i32, i32]
    native.edgemoe_stream_bind.restype = i32
    native.edgemoe_stream_bind.argtypes = [ptr, i32, ptr, i32]
    native.edgemoe_stream_submit.restype = i32
    native.edgemoe_stream_submit.argtypes = [ptr, ctypes.POINTER(_NativeRead), i32]
    for name in ("edgemoe_stream_drain", "edgemoe_stream_free"):
        getattr(native, name).restype = None
        getattr(native, name).argtypes = [ptr]
    native.edgemoe_stream_stats.restype = None
    native.edgemoe_stream_stats.argtypes = [ptr, ctypes.POINTER(i64 * 6)]
    return native


class ExpertStreamer:
    """The cb_eval callback, the expert stand-ins and the expert cache of one loaded model (see the module doc)."""

    def __init__(self, path: str | Path, plan: MemoryPlan, prefetch: bool = False):
        from .gguffile import open_gguf
        from .llamacpp import import_binding
        from .profile import _GGMLTensor

        llama_cpp = import_binding()
        self.plan = plan
        reader = open_gguf(path)
        self.tensors = {t.name: t for t in expert_tensors(reader)}
        self.by_layer: dict[int, list[ExpertTensor]] = {}
        for t in self.tensors.values():
            self.by_layer.setdefault(t.layer, []).append(t)
        self.set_bytes = {il: sum(t.slice_bytes for t in ts) for il, ts in self.by_layer.items()}
        self.fd = os.open(path, os.O_RDONLY)
        self.file_size = os.fstat(self.fd).st_size
        # O_DIRECT: reads go from the disk into the cache's pages, with no page-cache copy to allocate, reclaim or
        # read ahead of (measured: ~1.5x the throughput of buffered reads into fresh pages); where the file system
        # refuses it, buffered reads whose pages are dropped at once
        self.direct_fd = _direct_fd(path)
        self.libc = _libc()
        # one stand-in per expert tensor: its full size reserved, only cached experts' pages ever present
        self.regions: dict[str, mmap.mmap] = {}
        self.addresses: dict[str, int] = {}
        # a tensor starts in its region at the same offset within a page as in the file, so a page-aligned direct
        # read lands every byte where the tensor wants it; the page before and after absorb the rounding
        self.shift: dict[str, int] = {}
        for t in self.tensors.values():
            shift = t.file_offset % _PAGE
            region = mmap.mmap(-1, t.nbytes + 2 * _PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
            self.regions[t.name], self.shift[t.name] = region, shift
            self.addresses[t.name] = ctypes.addressof(ctypes.c_char.from_buffer(region)) + shift
        self.cache: dict[tuple[int, int], int] = {}  # (layer, expert) -> bytes
        # the eviction order as a heap of (uses, last use, key), not a scan of the cache per eviction: the 21B on an
        # 8 GB board caches ~750 sets and evicts ~40 a token; entries go stale when a key is used again (a newer
        # entry is pushed) and are dropped when they surface
        self.heap: list[tuple[int, int, tuple[int, int]]] = []
        self.stamp: dict[tuple[int, int], int] = {}  # key -> its last use (the clock), the heap entry that counts
        self.clock = 0
        self.resident = self.peak = 0
        # EDGEMOE_STREAM_RECYCLE=0: free an evicted expert's pages and fault fresh ones (what _recycle avoids)
        self.no_recycle = os.environ.get("EDGEMOE_STREAM_RECYCLE", "1") == "0"
        # expert-range pages that reach the page cache after binding are dropped when the prompt is done and at each
        # generated token after (drop_file_cache); EDGEMOE_STREAM_DROP_LATE=0 keeps them, to measure what they cost
        self.drop_late = os.environ.get("EDGEMOE_STREAM_DROP_LATE", "1") != "0"
        self.recycled_bytes = self.recycles = 0
        self.uses: dict[tuple[int, int], int] = {}  # routing counts per (layer, expert): the eviction order
        self.uses_since_halving = 0
        self.halve_every = 64 * max(plan.cache_bytes // max(plan.expert_set_bytes, 1), 1)
        self.bound: dict[int, str] = {}  # ggml tensor address -> expert tensor name, once its data is rebound
        self.first_layer = min(self.by_layer) if self.by_layer else 0
        self.lookups = self.hits = self.misses = self.bytes_read = 0
        self.read_s = self.hook_s = 0.0
        self.python_calls = 0
        self.warm_bytes = 0  # read before the first token from a profile (warm)
        self.steps = 0  # ubatches seen (counted at the first MoE layer)
        self.at_prompt_end: tuple | None = None  # counters when the prompt was done: the rest is generation
        self.error: BaseException | None = None  # raised by the callback, re-raised by check()
        self._struct = _GGMLTensor
        self._off_op = _GGMLTensor.op.offset
        self._off_src0 = _GGMLTensor.src.offset
        self._off_data = _GGMLTensor.data.offset
        self._off_name = _GGMLTensor.name.offset
        self._ops = _op_codes(llama_cpp)
        # prefetch: while layer N's experts compute, read what layer N+1's router would pick from layer N's input
        self.lock = threading.Condition()
        self.in_flight: set[tuple[int, int]] = set()  # being read by the prefetcher
        self.pinned: set[tuple[int, int]] = set()  # routed for the layer now computing: never evicted
        self.prefetched: set[tuple[int, int]] = set()  # read ahead and not yet asked for
        self.prefetch_reads = self.prefetch_used = 0
        self.prefetch_wait_s = 0.0
        self.routers = _routers(reader, sorted(self.by_layer)) if prefetch else {}
        self.next_layer = dict(zip(sorted(self.by_layer), sorted(self.by_layer)[1:]))
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.readers = ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="edgemoe-expert-read")
        self.worker = None
        # reads started at a routing node and not yet waited for: (layer, projection) -> futures, in the order the
        # layer's expert matmuls run (learnt from the graph: `order`), so the first matmul waits only for its own
        self.pending: dict[tuple[int, str], list] = {}
        self.reading: dict[tuple[int, int], int] = {}  # (layer, expert) -> its slices still being read
        self.order: list[str] = list(_PROJECTIONS)
        self.seen_order: dict[int, list[str]] = {}
        self.python_callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)
        # C: the per-node answers, the reads and the waits (stream_cb.c); else all of it here, on Python threads
        self.slots = {name: i for i, name in enumerate(sorted(self.tensors))}
        self.native, self.state = _native_library(), None
        if self.native is not None:
            self.state = self.native.edgemoe_stream_new(
                self._off_op,
                self._off_name,
                self._off_src0,
                self._ops["MUL_MAT_ID"],
                ctypes.cast(self.python_callback, ctypes.c_void_p).value,
                len(self.slots),
                _READERS,
            )
        if self.state:
            for name, slot in self.slots.items():
                self.native.edgemoe_stream_bind(self.state, slot, None, self.tensors[name].layer)
            address = ctypes.cast(self.native.edgemoe_stream_eval, ctypes.c_void_p).value
            self.callback = llama_cpp.ggml_backend_sched_eval_callback(address)
            self.user_data = self.state
        else:
            self.native = self.state = None
            self.callback, self.user_data = self.python_callback, None
        if self.routers and self.state is None:  # with C readers, the guesses are queued to them at once
            self.worker = threading.Thread(target=self._prefetcher, name="edgemoe-expert-prefetch", daemon=True)
            self.worker.start()

    # -- the callback --

    def _on_node(self, t_ptr: int, ask: bool, _user) -> bool:
        """The scheduler asks about each node before computing (ask=True: stop after it?) and hands over the ones
        we said yes to once computed (ask=False). Routing nodes: yes, then start reading the routed experts.
        Expert matmuls: bind the tensor to its stand-in (once), wait for this projection's reads, and stop after
        it while other projections of the layer are still being read, so the next matmul's wait holds back
        nothing computed before it. Waiting in the ask holds back the nodes since the last stop, which are
        the few between the routing node, or the previous expert matmul, and this one."""
        start = time.perf_counter()
        read_before = self.read_s
        self.python_calls += 1
        try:
            op = ctypes.c_int.from_address(t_ptr + self._off_op).value
            if ask:
                if op == self._ops["MUL_MAT_ID"]:
                    try:
                        src0 = ctypes.c_void_p.from_address(t_ptr + self._off_src0).value
                        self._bind(src0)
                        if self.state is not None:
                            return False  # C waits for the reads of the tensor now bound
                        return self._await(self.bound.get(src0, ""))
                    except BaseException as e:
                        self.error = self.error or e
                    return False
                if op in self._ops["routing"]:
                    return _ROUTING_NODE.match(ctypes.string_at(t_ptr + self._off_name)) is not None
                return False
            m = _ROUTING_NODE.match(ctypes.string_at(t_ptr + self._off_name))
            if m is None:
                return True
            import numpy as np

            from .profile import _tensor_array

            layer = int(m.group(1))
            node = self._struct.from_address(t_ptr)
            # llama.cpp drops the rows it need not output before the last layer: a ubatch may route no token there
            if layer in self.by_layer and all(n > 0 for n in node.ne) and self.error is None:
                ids = _tensor_array(node)
                ids = ids.reshape(-1, ids.shape[-1])  # [tokens, experts used]
                if layer == self.first_layer:
                    self.steps += 1
                    if self.at_prompt_end is not None and self.drop_late:
                        self.drop_file_cache()  # one fadvise per expert tensor, once a token
                # a prompt's batch counts an expert once per token that chose it, as decoding does token by token
                # (once per batch instead: 79.7% decode hits over 16 tokens at the target point, 81.3% so)
                experts, routed = np.unique(ids, return_counts=True)
                try:
                    self.ensure(layer, experts.tolist(), routed.tolist())
                except BaseException as e:  # nothing may escape into ggml; run() raises it once decoding returns
                    self.error = e
                    return True
                if self.routers and ids.shape[0] == 1:
                    self._predict_next(node, layer)
            return True
        finally:
            self.hook_s += time.perf_counter() - start - (self.read_s - read_before)

    def _await(self, name: str) -> bool:
        """Before an expert matmul: wait for the reads of its tensor's routed experts; True (stop after this
        node) while reads of another projection of the layer are still going on."""
        t = self.tensors.get(name)
        if t is None:
            return False
        futures = self.pending.pop((t.layer, t.projection), None)
        if futures:
            started = time.perf_counter()
            try:
                for f in futures:
                    f.result()
            finally:
                self.read_s += time.perf_counter() - started
        return any(key[0] == t.layer for key in self.pending)

    def _predict_next(self, node, layer: int) -> None:
        """Queue the experts the next MoE layer's router picks for this layer's FFN input (a guess: never needed
        for correctness, so a failure only turns prefetching off)."""
        nxt = self.next_layer.get(layer)
        if nxt not in self.routers:
            return
        try:
            hidden = _find_input(node, b"ffn_inp-%d" % layer, self._struct)
            if hidden is None or hidden.size != self.routers[nxt].norm.size:
                return
            if self.state is None:
                self.jobs.put((nxt, self.routers[nxt].predict(hidden)))
                return
        except Exception:
            self.routers = {}
            return
        self._prefetch_native(nxt, self.routers[nxt].ranked(hidden)[:_PREFETCH_RANKS])

    def _prefetch_native(self, layer: int, guesses: list[int]) -> None:
        """Queue reads of the guessed experts of `layer` not in the cache to the C readers, behind this layer's
        reads. They enter the cache first in line for eviction; the next layer's routing waits for them (drain)
        before it looks up its experts."""
        with self.lock:
            take = [e for e in guesses if self._admit_guess((layer, e))]
            self.prefetch_reads += len(take)
        if take:
            self._submit_native(layer, sorted(take))

    def _admit_guess(self, key: tuple[int, int]) -> bool:
        """Make room for a guessed expert not in the cache and count it in, first in line for eviction (a guess
        may be wrong); False if it is cached already or there is no room. Its reads are the caller's."""
        size = self.set_bytes[key[0]]
        if key in self.cache or not self._make_room(size, into=[key]):
            return False
        self.cache[key] = size
        self._touch(key, ahead=True)
        self.resident += size
        self.peak = max(self.peak, self.resident)
        self.prefetched.add(key)
        return True

    def _bind(self, tensor_ptr: int | None) -> None:
        """Point an expert tensor's data at its stand-in (once) and let go of its pages in the file mapping."""
        if not tensor_ptr or tensor_ptr in self.bound:
            return
        name = ctypes.string_at(tensor_ptr + self._off_name).decode("utf-8", "replace")
        t = self.tensors.get(name)
        if t is None:
            self.bound[tensor_ptr] = ""  # a MUL_MAT_ID over some other weight: not ours
            return
        struct = self._struct.from_address(tensor_ptr)
        if struct.nb[2] != t.slice_bytes or struct.ne[2] != t.n_expert:
            raise RuntimeError(f"{name}: llama.cpp's layout ({struct.nb[2]} B per expert) is not the file's")
        original = struct.data
        ctypes.c_void_p.from_address(tensor_ptr + self._off_data).value = self.addresses[name]
        self.bound[tensor_ptr] = name
        # tensors are bound as the scheduler first asks about their matmuls: in the graph's order, which reads follow
        seen = self.seen_order.setdefault(t.layer, [])
        seen.append(t.projection)
        if len(seen) == len(_PROJECTIONS):
            self.order = list(seen)
        if self.state is not None:
            self.native.edgemoe_stream_bind(self.state, self.slots[name], tensor_ptr, t.layer)
        # the mapping's pages of this tensor are never read again: drop them from this process and the page cache
        lo = (original + _PAGE - 1) // _PAGE * _PAGE
        hi = (original + t.nbytes) // _PAGE * _PAGE
        if hi > lo:
            self.libc.madvise(lo, hi - lo, _MADV_RANDOM)
            self.libc.madvise(lo, hi - lo, _MADV_DONTNEED)
        os.posix_fadvise(self.fd, t.file_offset, t.nbytes, os.POSIX_FADV_DONTNEED)

    # -- the cache --

    def ensure(self, layer: int, experts: list[int], routed: list[int] | None = None) -> None:
        """Make `experts` of `layer` present in the stand-ins, evicting others in _victim's order; `routed[i]`: how
        many tokens of the batch chose experts[i] (1 each if not given), what the eviction order counts."""
        self._drain()  # reads of a layer none of whose matmuls awaited them (not expected; kept safe)
        if self.state is not None:
            self._native_error()
        with self.lock:
            self.pinned = {(layer, e) for e in experts}  # the previous layer's matmuls are done
            waited = time.perf_counter()
            # the prefetcher may be reading some of them, and the previous layer's reads must be out of flight
            # before they may be evicted: let both finish
            while self.pinned & self.in_flight or self.reading:
                self.lock.wait()
            self.prefetch_wait_s += time.perf_counter() - waited
            missing = []
            for e, n in zip(experts, routed or [1] * len(experts)):
                self.lookups += 1
                key = (layer, e)
                self._count_use(key, n)
                if key in self.cache:
                    self.hits += 1
                    if key in self.prefetched:
                        self.prefetched.discard(key)
                        self.prefetch_used += 1
                else:
                    self.misses += 1
                    missing.append(e)
            if not missing:
                return
            self._make_room(self.set_bytes[layer] * len(missing), into=[(layer, e) for e in missing])
            # counted before the read: the prefetcher sees the room as taken; pages are not read until the reads
            for e in missing:
                self.cache[(layer, e)] = self.set_bytes[layer]
                self._push((layer, e))
            self.resident += self.set_bytes[layer] * len(missing)
            self.peak = max(self.peak, self.resident)
            if self.state is None:  # Python reads them; C's reads are awaited before the next layer (pinned till then)
                self.in_flight.update((layer, e) for e in missing)
                for e in missing:
                    self.reading[(layer, e)] = len(self.by_layer[layer])  # slices still to come
        # one read per tensor and run of adjacent experts, a few at a time, in the order the layer's matmuls will
        # want them: page faults and copies in the kernel use the core ggml is not using, the disk sees a queue,
        # and the first matmul starts as soon as its own slices are in while the others' are still coming
        if self.state is not None:  # C reads them, and C's callback waits for them before each matmul
            self._submit_native(layer, missing)
            return
        by_projection = {t.projection: t for t in self.by_layer[layer]}
        runs = _runs(missing)
        for projection in sorted(by_projection, key=self._rank):
            t = by_projection[projection]
            futures = []
            for run in runs:
                f = self.readers.submit(self._read, layer, run[0], len(run), t)
                f.add_done_callback(functools.partial(self._slice_read, [(layer, e) for e in run]))
                futures.append(f)
            self.pending[(layer, projection)] = futures

    def _submit_native(self, layer: int, experts: list[int]) -> None:
        """Queue the reads of `experts` (sorted) of `layer` to stream_cb.c's readers: one per tensor and run of
        adjacent experts, in the order the layer's matmuls run."""
        runs = _runs(experts)
        reads = [
            (self.slots[t.name], t, *self._geometry(t, run[0], len(run)))
            for t in sorted(self.by_layer[layer], key=lambda t: self._rank(t.projection))
            for run in runs
        ]
        batch = (_NativeRead * len(reads))()
        for r, (slot, t, fd, into, offset, size, need, drop) in zip(batch, reads):
            r.slot, r.fd, r.drop_cache = slot, fd, drop
            r.into, r.offset, r.size, r.need = (
                self.addresses[t.name] - self.shift[t.name] + into,
                offset,
                size,
                need,
            )
        if self.native.edgemoe_stream_submit(self.state, batch, len(reads)):
            raise RuntimeError(f"layer {layer}: the reads could not be queued")
        with self.lock:
            self.bytes_read += len(experts) * self.set_bytes[layer]  # what the queued reads bring in

    def _slice_read(self, keys: list[tuple[int, int]], _future) -> None:
        """A read ended (well or not: whoever awaits it sees a failure): experts with all slices in are no
        longer in flight."""
        with self.lock:
            for key in keys:
                self.reading[key] -= 1
                if self.reading[key] == 0:
                    del self.reading[key]
                    self.in_flight.discard(key)
            self.lock.notify_all()

    def _rank(self, projection: str) -> int:
        return self.order.index(projection) if projection in self.order else len(self.order)

    def _drain(self) -> None:
        """Wait for every read still going on (a layer whose matmuls were not all seen, or closing)."""
        if self.state is not None:
            self.native.edgemoe_stream_drain(self.state)
        for key in list(self.pending):
            for f in self.pending.pop(key, []):
                try:
                    f.result()
                except BaseException as e:
                    self.error = self.error or e

    def warm(self, counts, layers: list[int]) -> int:
        """Read the experts a profile routed most (counts [moe layer, expert] for blocks `layers`, from
        `edgemoe profile`'s profile.json) into the cache before the first token, hottest first until the cache is
        full; they start with one use each, so what the run routes decides from then on. Returns bytes read."""
        import numpy as np

        counts = np.asarray(counts, dtype=np.float64)
        ranked = sorted(
            (
                (float(counts[i, e]), layer, e)
                for i, layer in enumerate(layers)
                if layer in self.by_layer
                for e in range(counts.shape[1])
                if counts[i, e] > 0
            ),
            reverse=True,
        )
        chosen: dict[int, list[int]] = {}
        room = self.plan.cache_bytes - self.resident
        for _, layer, e in ranked:
            if self.set_bytes[layer] > room:
                break
            if (layer, e) not in self.cache:
                chosen.setdefault(layer, []).append(e)
                room -= self.set_bytes[layer]
        before = self.bytes_read
        for layer, experts in sorted(chosen.items()):
            experts.sort()
            with self.lock:
                for e in experts:
                    self.cache[(layer, e)] = self.set_bytes[layer]
                    self.uses[(layer, e)] = 1
                    self._touch((layer, e))
                self.resident += self.set_bytes[layer] * len(experts)
                self.peak = max(self.peak, self.resident)
            jobs = [(layer, run[0], len(run), t) for run in _runs(experts) for t in self.by_layer[layer]]
            for _ in self.readers.map(lambda job: self._read(*job), jobs):
                pass
        # counted apart: what streaming reads while running is what the run's statistics report
        self.warm_bytes, self.bytes_read = self.bytes_read - before, before
        return self.warm_bytes

    def _make_room(self, need: int, into: list[tuple[int, int]] = ()) -> bool:
        """Evict until `need` more bytes fit: the least often routed expert first, the least recently used among
        equals; never a pinned or in-flight one. (On recorded decode routing of the benchmark model, frequency
        first hit 77% where plain LRU hit 72% with a cache of a third of the experts, 53% vs 38% with an eighth.)
        `into`: the experts about to be read; each victim's pages move to one of them (_recycle) instead of being
        freed, so the read lands in pages that exist."""
        into = list(into)
        while self.resident + need > self.plan.cache_bytes:
            victim = self._victim()
            if victim is None:
                return False
            if into:
                self._recycle(victim, into.pop(0))
            self._evict(victim)
        return True

    def _interior(self, t: ExpertTensor, e: int) -> tuple[int, int]:
        """The pages of t's region [first, end) that hold only expert e's bytes (its first and last page may be
        shared with a neighbour)."""
        start = self.shift[t.name] + e * t.slice_bytes
        return -(-start // _PAGE), (start + t.slice_bytes) // _PAGE

    def _recycle(self, victim: tuple[int, int], key: tuple[int, int]) -> None:
        """Move the victim's pages to where `key`'s slices go, projection by projection, before they are read.

        Freeing an evicted expert's pages and faulting in fresh ones for the next read costs the kernel a page
        fault and zeroing per 4 KiB (~10 800 faults and 15-23 ms of CPU per generated token on the benchmark model,
        beside the compute thread on a small board: bench/stream.md, mode stream-free). mremap moves the page-table
        entries instead: no page is freed, zeroed or faulted, and the read overwrites every byte moved. The old range
        stays mapped and empty (MREMAP_DONTUNMAP); where the kernel refuses that, nothing moves."""
        if self.no_recycle or not hasattr(self.libc, "mremap"):
            return
        old = {t.projection: t for t in self.by_layer[victim[0]]}
        for t in self.by_layer[key[0]]:
            source = old.get(t.projection)
            if source is None:
                continue
            a0, a1 = self._interior(source, victim[1])
            b0, b1 = self._interior(t, key[1])
            n = min(a1 - a0, b1 - b0)
            if n <= 0:
                continue
            src = self.addresses[source.name] - self.shift[source.name] + a0 * _PAGE
            dst = self.addresses[t.name] - self.shift[t.name] + b0 * _PAGE
            flags = _MREMAP_MAYMOVE | _MREMAP_FIXED | _MREMAP_DONTUNMAP
            if self.libc.mremap(src, n * _PAGE, n * _PAGE, flags, dst) in (_MAP_FAILED, None):
                # EINVAL: a kernel without MREMAP_DONTUNMAP for this memory (< 5.7): free and fault from now on;
                # anything else (a range split by an earlier partial move): this slice is freed and faulted
                if ctypes.get_errno() == errno.EINVAL:
                    self.no_recycle = True
                    return
                continue
            self.recycled_bytes += n * _PAGE
            self.recycles += 1
            if self.recycles % _MAP_CHECK_EVERY == 0 and _map_count() > _max_map_count() // 2:
                # every moved range is a mapping of its own (a few per expert slice ever moved: at the 21B's 27 MoE
                # layers x 3 x 64 slices, some 10^4): stop well before the kernel's limit on mappings, which every
                # other mmap of the process shares
                self.no_recycle = True

    def _victim(self) -> tuple[int, int] | None:
        """The cached expert to evict: fewest uses, then least recently used; never a pinned (routed this step: the
        plan's ubatch keeps that set within the cache) or in-flight one (being read)."""
        aside, victim = [], None
        while self.heap:
            entry = heapq.heappop(self.heap)
            uses, stamp, key = entry
            if key not in self.cache or self.stamp.get(key) != stamp or self.uses.get(key, 0) != uses:
                continue  # stale: used again since, evicted, or its count halved (the heap was rebuilt then)
            if key in self.pinned or key in self.in_flight:
                aside.append(entry)
                continue
            victim = key
            break
        for entry in aside:
            heapq.heappush(self.heap, entry)
        return victim

    def _touch(self, key: tuple[int, int], ahead: bool = False) -> None:
        """`key` was used now (or read ahead: then older than any use, first to go among equal counts)."""
        self.clock += 1
        self.stamp[key] = -self.clock if ahead else self.clock
        if key in self.cache:  # else pushed once it is (_push): the heap holds cached keys only
            self._push(key)

    def _push(self, key: tuple[int, int]) -> None:
        heapq.heappush(self.heap, (self.uses.get(key, 0), self.stamp.get(key, 0), key))
        if len(self.heap) > 4 * len(self.cache) + 1024:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        self.heap = [(self.uses.get(k, 0), self.stamp.get(k, 0), k) for k in self.cache]
        heapq.heapify(self.heap)

    def _count_use(self, key: tuple[int, int], n: int = 1) -> None:
        """Routing frequency (`n` tokens chose it now), halved now and then so that what a long conversation routed
        early fades."""
        self.uses[key] = self.uses.get(key, 0) + n
        self.uses_since_halving += n
        if self.uses_since_halving >= self.halve_every:
            self.uses = {k: v // 2 for k, v in self.uses.items() if v > 1}
            self.uses_since_halving = 0
            self._rebuild_heap()
        self._touch(key)

    def _prefetcher(self) -> None:
        """Worker thread: read predicted experts of the next layer while the current one computes."""
        while True:
            job = self.jobs.get()
            if job is None:
                return
            layer, experts = job
            for e in experts:
                key = (layer, e)
                with self.lock:
                    if key in self.in_flight or not self._admit_guess(key):
                        continue
                    self.in_flight.add(key)
                try:
                    self._read(layer, e, 1)  # overlaps computing: not counted as waiting
                finally:
                    with self.lock:
                        self.in_flight.discard(key)
                        self.prefetch_reads += 1
                        self.lock.notify_all()

    def _geometry(self, t: ExpertTensor, first: int, count: int) -> tuple[int, int, int, int, int, int]:
        """How to read experts first..first+count-1 of `t`: (fd, offset in its region, file offset, bytes to read,
        bytes that must arrive, drop from the page cache after)."""
        at, size = first * t.slice_bytes, count * t.slice_bytes
        if self.direct_fd >= 0:
            # whole pages around the slice: the extra bytes are the file's own (a neighbour's, or padding)
            lo = (t.file_offset + at) // _PAGE * _PAGE
            hi = min(-(-(t.file_offset + at + size) // _PAGE) * _PAGE, -(-self.file_size // _PAGE) * _PAGE)
            into = self.shift[t.name] + at - (t.file_offset + at - lo)
            return self.direct_fd, into, lo, hi - lo, t.file_offset + at + size - lo, 0
        # buffered: the file's pages are dropped after, they would compete with the hot weights
        return self.fd, self.shift[t.name] + at, t.file_offset + at, size, size, 1

    def _read(self, layer: int, first: int, count: int, only: ExpertTensor | None = None) -> None:
        """Read experts first..first+count-1 of `layer` (of one tensor `only`, or all three) into the regions, on
        this thread."""
        n = 0
        for t in [only] if only is not None else self.by_layer[layer]:
            fd, into, offset, size, need, drop = self._geometry(t, first, count)
            self._pread(fd, t, into, offset, size, need=need)
            if drop:
                os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
            n += count * t.slice_bytes
        with self.lock:
            self.bytes_read += n

    def _pread(self, fd: int, t: ExpertTensor, into: int, offset: int, size: int, need: int) -> None:
        """Read `size` bytes of the file at `offset` into `t`'s region at `into`; at least `need` must come."""
        view = memoryview(self.regions[t.name])[into : into + size]
        try:
            done = 0
            while done < need:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise RuntimeError(f"{t.name}: the GGUF ended early (truncated while running?)")
                done += got
        finally:
            view.release()

    def _evict(self, key: tuple[int, int]) -> None:
        layer, e = key
        self.resident -= self.cache.pop(key)
        self.prefetched.discard(key)
        for t in self.by_layer[layer]:
            start, end = self.shift[t.name] + e * t.slice_bytes, self.shift[t.name] + (e + 1) * t.slice_bytes
            lo, hi = start // _PAGE, -(-end // _PAGE)
            # a page shared with a neighbouring expert still cached stays
            if lo < hi and self._page_in_use(t, lo, e):
                lo += 1
            if lo < hi and self._page_in_use(t, hi - 1, e):
                hi -= 1
            if lo < hi:
                self.regions[t.name].madvise(mmap.MADV_DONTNEED, lo * _PAGE, (hi - lo) * _PAGE)

    def _page_in_use(self, t: ExpertTensor, page: int, evicted: int) -> bool:
        shift = self.shift[t.name]
        first = max(page * _PAGE - shift, 0) // t.slice_bytes
        last = min(((page + 1) * _PAGE - 1 - shift) // t.slice_bytes, t.n_expert - 1)
        return any(
            e != evicted and ((t.layer, e) in self.cache or (t.layer, e) in self.in_flight)
            for e in range(first, last + 1)
        )

    def check(self) -> None:
        """Raise what went wrong inside the callback (a read failing): the tokens generated since are not valid."""
        if self.error is None and self.state is not None:
            try:
                self._native_error()
            except RuntimeError as e:
                self.error = e
        if self.error is not None:
            raise EdgeMoEError(
                f"streaming experts from the GGUF failed: {self.error}", "check the model file and its disk"
            ) from self.error

    def _counters(self) -> tuple:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return (
            self.steps,
            self.bytes_read,
            self._read_wait(),
            self.lookups,
            self.hits,
            usage.ru_utime + usage.ru_stime,
            usage.ru_minflt,
        )

    def _native_stats(self) -> list[int]:
        """stream_cb.c's counters: calls, python_calls, bytes_read, reads, wait_ns, error."""
        out = (ctypes.c_int64 * 6)()
        self.native.edgemoe_stream_stats(self.state, ctypes.byref(out))
        return list(out)

    def _read_wait(self) -> float:
        """Seconds blocked waiting for reads: here, and in C's callback."""
        return self.read_s + (self._native_stats()[4] / 1e9 if self.state is not None else 0.0)

    def _native_error(self) -> None:
        err = self._native_stats()[5] if self.state is not None else 0
        if err:
            raise RuntimeError("the GGUF ended early (truncated while running?)" if err < 0 else os.strerror(err))

    def prompt_done(self) -> None:
        """Called once the prompt is processed: what follows counts as generation (per-token numbers)."""
        self.at_prompt_end = self._counters()
        if self.drop_late:
            self.drop_file_cache()

    def drop_file_cache(self) -> None:
        """Drop the expert ranges' pages from the page cache (once every tensor is bound: at the prompt's end and
        at each generated token). Pages of those ranges come in after a tensor was bound and its range dropped: the
        load's read-ahead (MAP_POPULATE, then madvise WILLNEED over the whole file) still arriving on a slow disk,
        and the kernel's read-around whenever a neighbouring weight is faulted in (up to read_ahead_kb on either
        side: 8 MiB here), which under a tight cap happens again and again. Unmapped and never read again, they
        count against a cgroup's limit all the same (bench/stream.md: 64 MiB of 968 left without this)."""
        for t in self.tensors.values():
            os.posix_fadvise(self.fd, t.file_offset, t.nbytes, os.POSIX_FADV_DONTNEED)

    def stats(self) -> StreamStats:
        from dataclasses import asdict

        steps, read, read_s, lookups, hits, cpu_s, faults = (
            a - b for a, b in zip(self._counters(), self.at_prompt_end or self._counters())
        )
        native = self._native_stats() if self.state is not None else None

        return StreamStats(
            cache_bytes=self.plan.cache_bytes,
            cache_experts=self.plan.cache_bytes // max(self.plan.expert_set_bytes, 1),
            resident_expert_bytes=self.resident,
            peak_expert_bytes=self.peak,
            n_ubatch=self.plan.n_ubatch,
            lookups=self.lookups,
            hits=self.hits,
            misses=self.misses,
            hit_rate=round(self.hits / self.lookups, 4) if self.lookups else 0.0,
            bytes_read=self.bytes_read,
            read_wait_s=round(self._read_wait(), 6),
            hook_s=round(self.hook_s, 6),
            decode_tokens=steps,
            decode_bytes_read=read,
            bytes_read_per_token=round(read / steps, 1) if steps else 0.0,
            decode_read_wait_s=round(read_s, 6),
            decode_hit_rate=round(hits / lookups, 4) if lookups else 0.0,
            decode_cpu_ms_per_token=round(cpu_s * 1000 / steps, 2) if steps else 0.0,
            decode_page_faults_per_token=round(faults / steps, 1) if steps else 0.0,
            prefetch_reads=self.prefetch_reads,
            prefetch_used=self.prefetch_used,
            prefetch_wait_s=round(self.prefetch_wait_s, 6),
            warm_bytes=self.warm_bytes,
            recycled_bytes=self.recycled_bytes,
            native_callback=self.state is not None,
            callbacks=native[0] if native else self.python_calls,
            python_callbacks=native[1] if native else self.python_calls,
            plan=asdict(self.plan),
        )

    def close(self) -> None:
        self._drain()
        if self.worker is not None:
            self.jobs.put(None)
            self.worker.join()
            self.worker = None
        self.readers.shutdown(wait=True)
        if self.state is not None:  # after the model: its context called into this state until it was freed
            self.native.edgemoe_stream_free(self.state)
            self.state = None
        for region in self.regions.values():
            try:
                region.close()
            except BufferError:  # a view still exported (an exception mid-read): the process exit frees it
                pass
        self.regions.clear()
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1


class _Router:
    """One MoE layer's router (ERNIE: softmax over W x, plus the score-correction bias for selection only),
    applied to another layer's FFN input to guess which experts this layer will want."""

    def __init__(self, weight, bias, norm, eps: float, k: int):
        self.weight, self.bias, self.norm, self.eps, self.k = weight, bias, norm, eps, k

    def predict(self, residual) -> list[int]:
        return sorted(self.ranked(residual)[: self.k])

    def ranked(self, residual) -> list[int]:
        """Every expert, the likeliest pick first."""
        import numpy as np

        x = residual.reshape(-1).astype(np.float32)
        x = x / np.sqrt(np.mean(x * x) + self.eps) * self.norm
        logits = self.weight @ x
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        score = probs + self.bias if self.bias is not None else probs
        return [int(e) for e in np.argsort(-score, kind="stable")]


def _routers(reader, layers: list[int]) -> dict[int, _Router]:
    """Routers of the MoE layers (f32/f16 in the file, as llama.cpp keeps them); {} if any is missing."""
    import numpy as np

    arch = _field(reader, "general.architecture", "")
    eps = float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5))
    k = int(_field(reader, f"{arch}.expert_used_count", 0))
    by_name = {t.name: t for t in reader.tensors}
    routers = {}
    for il in layers:
        w, b, n = (by_name.get(f"blk.{il}.{x}") for x in ("ffn_gate_inp.weight", "exp_probs_b.bias", "ffn_norm.weight"))
        if w is None or n is None or k < 1 or w.data.dtype not in (np.float32, np.float16):
            return {}
        routers[il] = _Router(
            np.asarray(w.data, dtype=np.float32).reshape(-1, int(w.shape[0])),
            None if b is None else np.asarray(b.data, dtype=np.float32).reshape(-1),
            np.asarray(n.data, dtype=np.float32).reshape(-1),
            eps,
            k,
        )
    return routers


def _find_input(node, name: bytes, struct, depth: int = 8):
    """A copy of the graph tensor called `name` among `node`'s sources (breadth first), or None."""
    from .profile import _DTYPES, _tensor_array

    seen, frontier = set(), [node]
    for _ in range(depth):
        nxt = []
        for t in frontier:
            for src in t.src:
                if not src or src in seen:
                    continue
                seen.add(src)
                s = struct.from_address(src)
                if s.name == name:
                    return _tensor_array(s) if s.type in _DTYPES and s.data else None
                nxt.append(s)
        frontier = nxt
    return None


def _runs(sorted_ids: list[int]) -> list[list[int]]:
    """Consecutive ids grouped, so adjacent experts are one read."""
    runs: list[list[int]] = []
    for e in sorted_ids:
        if runs and runs[-1][-1] == e - 1:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def _op_codes(llama_cpp) -> dict:
    """ggml op numbers by name, asked from the loaded ggml (the enum moves between llama.cpp versions)."""
    lib_dir = Path(getattr(llama_cpp.llama_cpp._lib, "_name", "")).parent
    candidates = [lib_dir / "libggml-base.so", lib_dir / "libggml-base.dylib", lib_dir / "libggml.so"]
    lib = None
    for c in candidates:
        if c.exists():
            lib = ctypes.CDLL(str(c))
            break
    if lib is None:
        lib = llama_cpp.llama_cpp._lib  # a static build: ggml's symbols are in libllama itself
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    codes: dict = {}
    for i in range(256):
        name = lib.ggml_op_name(i)
        if name is None or name == b"" or (i > 0 and name == lib.ggml_op_name(0)):
            break
        codes[name.decode()] = i
        if name == b"COUNT":
            break
    if "MUL_MAT_ID" not in codes:
        raise EdgeMoEError("this llama.cpp's ggml has no MUL_MAT_ID op", "run `edgemoe build` for the pinned llama.cpp")
    # llama.cpp names the routing result `ffn_moe_topk-N`: a view of an argsort, or a TOP_K node
    codes["routing"] = {codes[n] for n in ("VIEW", "TOP_K", "ARGSORT") if n in codes}
    return codes


# ---- loading a model that streams ----


def load_streaming(path: str | Path, plan: MemoryPlan, load, warm: str | Path | None = None):
    """(llama_cpp.Llama, ExpertStreamer) for a model that streams its experts under `plan`; `load` is
    generate.load_model with the run's context and threads bound (passed in: generate imports this module).

    `warm`: a profile.json of `edgemoe profile` for this model; its most routed experts are read into the cache
    before the first token (ExpertStreamer.warm).

    EDGEMOE_STREAM_PREFETCH=1 turns on the next-layer prefetcher (off by default: on the benchmark model an uncached
    guess of rank 1-2 is routed ~72% of the time, yet the reads ahead, sharing the disk with the demand reads behind
    them, left it slower than without; bench/stream.md, bench/stream_policy.md).
    """
    from .gguffile import check_gguf
    from .profile import load_usage

    path = check_gguf(path)
    usage = load_usage(warm) if warm is not None else None
    streamer = ExpertStreamer(path, plan, prefetch=os.environ.get("EDGEMOE_STREAM_PREFETCH", "0") == "1")
    try:
        if usage is not None:
            _check_usage(usage, streamer, warm, path)
        # no repacking: experts must stay in the file's layout, where a slice is `e * nb[2]` into the tensor
        llm = load(
            path, n_ubatch=plan.n_ubatch, repack=False, cb_eval=streamer.callback, cb_eval_user_data=streamer.user_data
        )
        if usage is not None:
            streamer.warm(*usage)
    except BaseException:
        streamer.close()
        raise
    return llm, streamer


def _check_usage(usage, streamer: ExpertStreamer, warm, path: Path) -> None:
    counts, layers = usage
    if counts.ndim != 2 or counts.shape[1] != streamer.plan.n_expert or sorted(layers) != sorted(streamer.by_layer):
        raise EdgeMoEError(
            f"{warm} profiles a different model ({counts.shape[0]} MoE layers x {counts.shape[-1]} experts, "
            f"{path.name} has {len(streamer.by_layer)} x {streamer.plan.n_expert})",
            f"run `edgemoe profile {path.name} --text FILE` and pass its profile.json",
        )


if sys.platform != "linux":  # MAP_NORESERVE and /proc are Linux's; elsewhere the region is reserved normally
    _MAP_NORESERVE = 0
