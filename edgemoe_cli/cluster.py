"""Several boards as one over llama.cpp's RPC backend: `edgemoe worker` and `--workers host:port,...`.

worker   starts the build's `ggml-rpc-server` (bound to 127.0.0.1 unless --host says otherwise: it has NO
         authentication, anyone who reaches the port can run code paths on it and read what it holds) and
         reports the address to give to the others.
split    the process that has the model registers each worker as a ggml device, asks each for its free
         memory, and gives every part (this process's CPU and each worker) a share of the layers in
         proportion to the memory it has (n_gpu_layers + tensor_split; llama.cpp keeps the first layers local
         and spreads the last ones over the workers in order).
supervise  llama.cpp aborts the whole process when a worker disappears mid-generation ("Remote RPC server
         crashed"), so `run`/`serve` with --workers execute in a child process; this parent turns such a
         death into one line naming the worker that stopped answering.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgeMoEError
from .units import human_bytes, parse_size

DEFAULT_PORT = 50052  # rpc-server's own default
SUPERVISED_ENV = "EDGEMOE_SUPERVISED"  # set in the child: it does the work, the parent only watches
NO_AUTH_WARNING = (
    "ggml-rpc-server has NO authentication: anyone who can reach the port can use this machine's "
    "memory and CPU through it and read what it holds; bind it to a private network only"
)


def _die_with_parent() -> None:
    """preexec_fn: on Linux, the child gets SIGTERM when the edgemoe process that started it dies, even by SIGKILL,
    so no rpc-server keeps listening (or model keeps running) without its owner."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---- addresses ----------------------------------------------------------------------------------------------------


@dataclass
class WorkerAddress:
    host: str
    port: int
    memory_bytes: int | None = None  # what the worker offers (`edgemoe worker --memory`), else its free memory

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


def parse_workers(text: str) -> list[WorkerAddress]:
    """`host:port[=SIZE],...` (as `edgemoe worker` prints it) -> addresses; a malformed entry is an error."""
    out = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        address, _, size = entry.partition("=")
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise EdgeMoEError(
                f"--workers entry {entry!r} is not HOST:PORT",
                "e.g. --workers 192.168.1.21:50052,192.168.1.22:50052 (what `edgemoe worker` prints)",
            )
        out.append(WorkerAddress(host.strip("[]"), int(port), parse_size(size) if size else None))
    if not out:
        raise EdgeMoEError("--workers is empty", "give HOST:PORT of at least one `edgemoe worker`")
    if len({w.endpoint for w in out}) != len(out):
        raise EdgeMoEError("--workers names a worker twice", "give each HOST:PORT once")
    return out


def reachable(worker: WorkerAddress, timeout: float = 3.0) -> str | None:
    """None when the worker accepts a TCP connection, else why not (refused, timed out, unknown host)."""
    try:
        with socket.create_connection((worker.host, worker.port), timeout=timeout):
            return None
    except socket.gaierror:
        return "unknown host"
    except socket.timeout:
        return f"no answer within {timeout:.0f} s"
    except OSError as e:
        return (e.strerror or str(e)).lower()


def check_workers(workers: list[WorkerAddress]) -> None:
    for w in workers:
        if why := reachable(w):
            raise EdgeMoEError(
                f"worker {w.endpoint} is not reachable ({why})",
                f"start it there with `edgemoe worker --host ADDRESS --port {w.port}` and check the "
                "network between the boards",
            )


# ---- edgemoe worker -----------------------------------------------------------------------------------------------


@dataclass
class WorkerInfo:
    address: str  # what to give the others: HOST:PORT[=SIZE]
    listen: str  # what rpc-server is bound to
    threads: int
    memory_bytes: int | None
    free_bytes: int
    tool: str
    pid: int
    public: bool  # bound to something other than loopback: the no-authentication warning applies


def _address_for_others(host: str) -> str:
    """The address another board should use: the host given, or this machine's outward address for 0.0.0.0."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    try:  # no packet is sent: connecting a UDP socket only picks the interface a route would use
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


class Worker:
    """A running ggml-rpc-server child; `wait()` until it exits, `stop()` to end it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        memory: str | None = None,
        threads: int | None = None,
        ready_timeout: float = 60.0,
    ):
        import psutil

        from .generate import default_threads
        from .llamacpp import find_tool

        if not 0 < port < 65536:
            raise EdgeMoEError(f"--port {port} is not a TCP port", f"give 1-65535, e.g. --port {DEFAULT_PORT}")
        tool = find_tool("ggml-rpc-server")
        free = psutil.virtual_memory().available
        memory_bytes = parse_size(memory) if memory else None
        if memory_bytes is not None and memory_bytes > free:
            raise EdgeMoEError(
                f"--memory {human_bytes(memory_bytes)} is more than this machine has free ({human_bytes(free)})",
                "offer less, or free memory first",
            )
        threads = threads or default_threads()
        self.proc = subprocess.Popen(
            [str(tool), "--host", host, "--port", str(port), "--threads", str(threads)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        probe = WorkerAddress("127.0.0.1" if host in ("0.0.0.0", "") else host, port)
        deadline = time.monotonic() + ready_timeout
        while reachable(probe, timeout=1.0) is not None:
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                last = next((line for line in reversed(self.output) if line.strip()), "no output")
                raise EdgeMoEError(
                    f"ggml-rpc-server exited ({self.proc.returncode}) before listening on "
                    f"{host}:{port}: {last.strip()}",
                    "is the port taken? choose another with --port",
                )
            if time.monotonic() > deadline:
                self.stop()
                last = next((line for line in reversed(self.output) if line.strip()), "no output")
                raise EdgeMoEError(
                    f"ggml-rpc-server did not listen on {host}:{port} within {ready_timeout:.0f} s "
                    f"(last output: {last.strip()})",
                    "check the address is this machine's",
                )
            time.sleep(0.1)
        others = _address_for_others(host)
        self.info = WorkerInfo(
            address=f"{others}:{port}" + (f"={human_bytes(memory_bytes).replace(' ', '')}" if memory_bytes else ""),
            listen=f"{host}:{port}",
            threads=threads,
            memory_bytes=memory_bytes,
            free_bytes=free,
            tool=str(tool),
            pid=self.proc.pid,
            public=host not in ("127.0.0.1", "localhost", "::1"),
        )

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def wait(self) -> int:
        """Block until the rpc-server exits (SIGTERM/SIGINT to this process end it cleanly); its exit code."""

        def forward(signum, frame):
            # only signal here: the main thread is inside proc.wait(), holding the lock a second wait would need
            if self.proc.returncode is None:
                self.proc.send_signal(signal.SIGTERM)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self.proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- the split (in the process that loads the model) --------------------------------------------------------------


@dataclass
class SplitPart:
    device: str  # "local" or the worker's HOST:PORT
    memory_bytes: int  # free memory it reported (or what it offers)
    layers: int


@dataclass
class Split:
    n_layers: int
    parts: list[SplitPart] = field(default_factory=list)

    @property
    def n_gpu_layers(self) -> int:
        return sum(p.layers for p in self.parts if p.device != "local")

    @property
    def tensor_split(self) -> list[float]:
        return [float(p.layers) for p in self.parts if p.device != "local"]


def _rpc_library():
    from .llamacpp import select_binding_library

    lib_dir = select_binding_library()
    path = Path(lib_dir or "") / "libggml-rpc.so"
    if not lib_dir or not path.exists():
        raise EdgeMoEError(
            "this llama.cpp build has no RPC backend (libggml-rpc.so)",
            "rebuild with `edgemoe build` (every build since issue 11 has GGML_RPC=ON)",
        )
    rpc = ctypes.CDLL(str(path))
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_get_device_memory.argtypes = [
        ctypes.c_char_p,
        ctypes.c_uint32,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    rpc.ggml_backend_rpc_get_device_memory.restype = None
    base = ctypes.CDLL(str(Path(lib_dir) / "libggml.so"))  # the backend registry lives in libggml, not ggml-base
    base.ggml_backend_register.argtypes = [ctypes.c_void_p]
    base.ggml_backend_register.restype = None
    return rpc, base


def plan_split(n_layers: int, local_bytes: int, workers: list[tuple[str, int]]) -> Split:
    """Layers in proportion to memory, every worker at least one layer, the local process keeping the rest (at
    least one: llama.cpp keeps the first layers and the token embedding here)."""
    total = local_bytes + sum(m for _, m in workers)
    counts = [max(1, round(n_layers * m / total)) if total else 1 for _, m in workers]
    while sum(counts) > n_layers - 1 and max(counts) > 1:  # leave the local process one layer
        counts[counts.index(max(counts))] -= 1
    if sum(counts) > n_layers - 1:
        raise EdgeMoEError(
            f"the model has {n_layers} layers, too few for {len(workers)} workers and this process", "use fewer workers"
        )
    local = n_layers - sum(counts)
    return Split(
        n_layers,
        [
            SplitPart("local", local_bytes, local),
            *(SplitPart(endpoint, m, c) for (endpoint, m), c in zip(workers, counts)),
        ],
    )


def attach_workers(workers: list[WorkerAddress], n_layers: int) -> Split:
    """Register each worker as a ggml device of this process and choose the split from their memory.

    Call before loading the model (llama.cpp picks its devices at load). Workers are checked to accept a
    connection first: llama.cpp aborts the process on one that does not.
    """
    import psutil

    check_workers(workers)
    rpc, base = _rpc_library()
    for w in workers:
        reg = rpc.ggml_backend_rpc_add_server(w.endpoint.encode())
        if not reg:
            raise EdgeMoEError(f"worker {w.endpoint} offers no device", "restart it with `edgemoe worker`")
        base.ggml_backend_register(reg)
    return plan_split(n_layers, psutil.virtual_memory().available, worker_memory(workers, rpc))


def worker_memory(workers: list[WorkerAddress], rpc=None) -> list[tuple[str, int]]:
    """(HOST:PORT, bytes) per worker: what it offered (`=SIZE`), else the free memory its rpc-server reports."""
    check_workers(workers)  # llama.cpp aborts the process on a worker it cannot connect to
    rpc = rpc or _rpc_library()[0]
    out = []
    for w in workers:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        rpc.ggml_backend_rpc_get_device_memory(w.endpoint.encode(), 0, ctypes.byref(free), ctypes.byref(total))
        out.append((w.endpoint, w.memory_bytes if w.memory_bytes is not None else free.value))
    return out


def gguf_layers(path: str | Path) -> int:
    """The model's block count (what a split divides), from its GGUF header."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = reader.get_field("general.architecture")
    blocks = reader.get_field(f"{arch.contents()}.block_count") if arch is not None else None
    if blocks is None:
        raise EdgeMoEError(f"{path}: no block_count in the GGUF, cannot split it", "give a model GGUF")
    return int(blocks.contents())


def llama_tool_args(split: Split, workers: list[WorkerAddress]) -> list[str]:
    """The same split for llama.cpp's own tools (llama-bench, llama-server): --rpc, -ngl and -ts."""
    return [
        "-rpc",
        ",".join(w.endpoint for w in workers),
        "-ngl",
        str(split.n_gpu_layers),
        "-ts",
        "/".join(f"{t:g}" for t in split.tensor_split),
    ]


def load_split_model(path: str | Path, workers: list[WorkerAddress], ctx: int = 4096, threads: int | None = None):
    """generate.load_model with the layers spread over `workers`: (llama_cpp.Llama, Split)."""
    from . import generate
    from .llamacpp import import_binding

    path = generate.check_gguf(path)
    llama_cpp = import_binding()
    split = attach_workers(workers, gguf_layers(path))
    threads = threads or generate.default_threads()
    try:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=split.n_gpu_layers,
            tensor_split=split.tensor_split,
            verbose=False,
        )
    except (ValueError, RuntimeError, OSError) as e:
        raise EdgeMoEError(
            f"{path}: llama.cpp could not load the model across the workers ({e})",
            "check each worker's free memory and that all run the same edgemoe build",
        ) from e
    return llm, split


# ---- supervision --------------------------------------------------------------------------------------------------

# what llama.cpp prints when a worker goes away mid-run; the parent replaces it with one line naming the worker
_ABORT_LINES = re.compile(
    r"GGML_ABORT|ggml_abort|Remote RPC server crashed|Failed to connect to|"
    r"^\s*(#\d+|\[New LWP|Aborted|core dumped)"
)


def supervised() -> bool:
    return os.environ.get(SUPERVISED_ENV) == "1"


def supervise(argv: list[str], workers: list[WorkerAddress]) -> int:
    """Run `edgemoe ARGV` in a child (it loads the model with the workers) and return its exit code; if it dies of
    a signal, raise the one-line error naming the worker that stopped answering. stdout is the child's own;
    stderr passes through line by line, without llama.cpp's abort noise."""
    check_workers(workers)
    env = {**os.environ, SUPERVISED_ENV: "1", "GGML_NO_BACKTRACE": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "edgemoe_cli.cli", *argv],
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        errors="replace",
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    held: list[str] = []

    def pump() -> None:
        for line in child.stderr:
            if _ABORT_LINES.search(line):
                held.append(line)
            else:
                sys.stderr.write(line)
                sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    reader.join(timeout=10)
    if code >= 0:
        return code
    gone = [(w, why) for w in workers if (why := reachable(w, timeout=2.0))]
    if gone:
        w, why = gone[0]
        raise EdgeMoEError(
            f"worker {w.endpoint} stopped answering mid-run ({why})", "restart `edgemoe worker` there, then run again"
        )
    detail = next((line.strip() for line in held if "RPC" in line or "ABORT" in line), "")
    raise EdgeMoEError(
        f"the run died of signal {signal.Signals(-code).name}" + (f": {detail}" if detail else ""),
        "every worker still answers; check each worker's output",
    )


def run_split(
    model: str | Path,
    prompt: str,
    workers: list[WorkerAddress],
    *,
    system: str | None = None,
    max_tokens: int = 512,
    threads: int | None = None,
    ctx: int = 4096,
    temp: float = 0.0,
    seed: int | None = None,
    on_text=None,
):
    """`edgemoe run --workers`: generate.run with the model's layers spread over the workers; (RunResult, Split)."""
    from . import generate

    if not prompt.strip():
        raise EdgeMoEError("the prompt is empty", "give a question with -p TEXT or -f FILE")
    llm, split = load_split_model(model, workers, ctx=ctx, threads=threads)
    try:
        result = generate.chat_reply(llm, prompt, system, max_tokens=max_tokens, temp=temp, seed=seed, on_text=on_text)
    finally:
        llm.close()
    return result, split
