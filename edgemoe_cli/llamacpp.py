"""Find and build llama.cpp; run its tools and parse what they print.

Layout of the build cache (store.builds_dir()):
    <key>/bin/llama-*      the tools of one build (key = source commit, target, flags)
    <key>/lib/lib*.so      its shared libraries (libllama, libggml*), also what the Python binding loads
    native-current         symlink to the newest successful build for this machine (target native)
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import EdgeMoEError
from .store import builds_dir, home

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # keep equal to the pin in pyproject.toml


def native_build_dir() -> Path | None:
    """The current native build (bin/ and lib/), or None when `edgemoe build` has not run on this machine."""
    current = builds_dir() / "native-current"
    return current.resolve() if (current / "lib").is_dir() else None


def select_binding_library() -> str | None:
    """Point llama-cpp-python at our native build's libllama, before `llama_cpp` is first imported.

    Returns the directory the binding will load from, or None when it will use the library inside its own wheel.
    An explicit LLAMA_CPP_LIB_PATH from the user always wins.
    """
    if explicit := os.environ.get("LLAMA_CPP_LIB_PATH"):
        return explicit
    build = native_build_dir()
    if build is not None and (build / "lib" / "libllama.so").exists():
        os.environ["LLAMA_CPP_LIB_PATH"] = str(build / "lib")
        return str(build / "lib")
    return None


def find_tool(name: str) -> Path:
    """Path of a llama.cpp tool (llama-quantize, llama-imatrix, ...): $EDGEMOE_LLAMA_BIN, our native build, PATH."""
    candidates = []
    if env := os.environ.get("EDGEMOE_LLAMA_BIN"):
        candidates.append(Path(env) / name)
    if (build := native_build_dir()) is not None:
        candidates.append(build / "bin" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    if found := shutil.which(name):
        return Path(found)
    raise EdgeMoEError(f"llama.cpp tool {name} not found", "run `edgemoe build` first (or set EDGEMOE_LLAMA_BIN)")


def import_binding():
    """Import llama_cpp (llama-cpp-python) bound to our build's libllama when there is one.

    Every module that needs the binding calls this instead of `import llama_cpp`, so the library choice is made
    once, before the first import, and a missing library is a one-line error rather than a ctypes traceback.
    """
    select_binding_library()
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as e:
        raise EdgeMoEError(
            f"cannot load llama.cpp's library for the Python binding ({e})",
            "run `edgemoe build` (or `make setup`), or set LLAMA_CPP_LIB_PATH to a directory holding libllama.so",
        ) from e
    return llama_cpp


_MUTED_LOG: list = []  # the log callback that drops every line, made once and never freed (see load_vocab)


def load_vocab(model: str | Path):
    """A llama_cpp.Llama of `model`'s vocabulary only (tokenizing needs no weights), llama.cpp's log muted while it
    loads: it warns of a context longer than the training length, which a vocabulary-only model reports as 0."""
    import ctypes

    llama_cpp = import_binding()
    import llama_cpp._logger as binding_logger

    if not _MUTED_LOG:
        # kept for the process's life: llama.cpp's log hook is global, and another thread loading a model may have
        # read it and still be calling it after this load put the binding's logger back (a freed one crashed)
        _MUTED_LOG.append(llama_cpp.llama_log_callback(lambda level, text, user_data: None))
    llama_cpp.llama_log_set(_MUTED_LOG[0], ctypes.c_void_p(0))
    try:
        return llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    finally:
        llama_cpp.llama_log_set(binding_logger.llama_log_callback, ctypes.c_void_p(0))


# ---- running the tools ----------------------------------------------------------------------------------------


def last_error(
    text: str,
    patterns: tuple[str, ...] = (r"internal compiler error", r"\berror\b", r"CMake Error", r"FAILED", r"\bfailed\b"),
) -> str:
    """The most telling single line of a failed run's output: the last line matching the first pattern that hits."""
    import re

    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for pattern in patterns:
        hits = [i for i, line in enumerate(lines) if re.search(pattern, line, re.IGNORECASE)]
        if hits:
            i = hits[-1]
            line = lines[i]
            if line.startswith("CMake Error"):  # CMake puts the reason on the next lines
                line = " ".join([line, *lines[i + 1 : i + 3]])
            return line[:400]
    return (lines[-1] if lines else "no output")[:400]


def run_tool(
    name: str,
    args: list[str],
    *,
    log: str | Path | None = None,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    on_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool of our build; returns its CompletedProcess (stdout, stderr as text).

    The command and both streams are written to `log` (default <store>/logs/<tool>-<time>.log). `on_line` gets
    every output line as it comes (progress). A non-zero exit raises EdgeMoEError naming the tool, its last error
    line and the log.
    """
    import threading

    tool = find_tool(name)
    log_path = Path(log) if log else home() / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(tool), *map(str, args)]
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
    except OSError as e:
        raise EdgeMoEError(f"cannot start {name} ({e.strerror})", f"rebuild with `edgemoe build` ({tool})") from e
    out: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def pump(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            if on_line:
                on_line(line.rstrip("\n"))

    threads = [
        threading.Thread(target=pump, args=(proc.stdout, out["stdout"]), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, out["stderr"]), daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    for t in threads:
        t.join()
    stdout, stderr = "".join(out["stdout"]), "".join(out["stderr"])
    log_path.write_text(f"$ {shlex.join(cmd)}\n# exit {rc}\n---- stdout\n{stdout}\n---- stderr\n{stderr}")
    if rc is None:
        raise EdgeMoEError(f"{name} did not finish within {timeout:.0f} s", f"full output: {log_path}")
    if rc != 0:
        raise EdgeMoEError(f"{name} failed (exit {rc}): {last_error(stderr + stdout)}", f"full output: {log_path}")
    return subprocess.CompletedProcess(cmd, rc, stdout, stderr)


@dataclass
class BindingInfo:
    library: str  # the libllama file the binding loaded
    source: str  # "LLAMA_CPP_LIB_PATH", "edgemoe build" or "llama-cpp-python wheel"
    llama_cpp_python: str
    system_info: str  # llama.cpp's own llama_print_system_info() line


def binding_info() -> BindingInfo:
    """Which libllama the Python binding loaded, and what llama.cpp says it was built with (the one place that asks
    the loaded library)."""
    llama_cpp = import_binding()
    library = str(getattr(llama_cpp.llama_cpp._lib, "_name", "") or "")
    build = native_build_dir()
    if build is not None and Path(library).resolve().is_relative_to(build):
        source = "edgemoe build"
    elif os.environ.get("LLAMA_CPP_LIB_PATH"):
        source = "LLAMA_CPP_LIB_PATH"
    else:
        source = "llama-cpp-python wheel"
    return BindingInfo(
        library=library,
        source=source,
        llama_cpp_python=llama_cpp.__version__,
        system_info=llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
    )


# ---- which build is in use -------------------------------------------------------------------------------------


@dataclass
class BuildInfo:
    build_dir: str | None  # the native build in use (builds/native-current), None without one
    key: str | None
    target: str | None
    arch: str | None
    kleidiai: bool | None
    source_id: str | None
    binding_library: str | None  # directory llama-cpp-python loads libllama from (None: its own wheel's)
    system_info: str | None  # llama.cpp's system_info line (recorded at build time, or live)
    tools: list[str] = field(default_factory=list)
    smoke: dict | None = None  # the build's smoke test (smoke.SmokeResult.to_dict()), None before it ran


def native_build_manifest() -> dict:
    """The active native build's build.json ({} without one, or when it cannot be read): no library is loaded."""
    import json

    build = native_build_dir()
    try:
        manifest = json.loads((build / "build.json").read_text()) if build is not None else {}
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def build_info(live: bool = False) -> BuildInfo:
    """Which llama.cpp build edgemoe uses (tools and binding) and its system_info.

    Cheap by default (reads the build's build.json); `live=True` loads the binding and asks the library itself.
    """
    build = native_build_dir()
    manifest = native_build_manifest()
    library = select_binding_library()
    system_info = manifest.get("system_info")
    if live or (library and build and Path(library).resolve() != (build / "lib").resolve()):
        system_info = binding_info().system_info
    return BuildInfo(
        build_dir=str(build) if build else None,
        key=manifest.get("key"),
        target=manifest.get("target"),
        arch=manifest.get("arch"),
        kleidiai=manifest.get("kleidiai"),
        source_id=manifest.get("source_id"),
        binding_library=library,
        system_info=system_info,
        tools=list(manifest.get("tools", [])),
        smoke=manifest.get("smoke"),
    )
