"""Find and build llama.cpp; run its tools and parse what they print.

Layout of the build cache (store.builds_dir()):
    <key>/bin/llama-*      the tools of one build (key = source commit, target, flags)
    <key>/lib/lib*.so      its shared libraries (libllama, libggml*), also what the Python binding loads
    native-current         symlink to the newest successful build for this machine (target native)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import EdgeMoEError
from .store import builds_dir

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
