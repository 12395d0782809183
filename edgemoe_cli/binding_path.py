"""Where edgemoe's active llama.cpp library is, importing nothing but `os`.

llama-cpp-python is installed without a library of its own (one llama.cpp build serves the tools and the binding),
so a bare `import llama_cpp` needs LLAMA_CPP_LIB_PATH. `edgemoe build` installs a one-line .pth file into the
venv that calls `export()` at every interpreter start: that is why this module must stay this cheap.
"""

from __future__ import annotations

import os
import sys
import sysconfig

PTH_NAME = "edgemoe-llama-lib.pth"  # sorts after the editable-install .pth files that make edgemoe_cli importable
PTH_LINE = "import edgemoe_cli.binding_path as _edgemoe_lib; _edgemoe_lib.export()\n"


def home() -> str:
    """Root of the store: $EDGEMOE_HOME, else $XDG_CACHE_HOME/edgemoe, else ~/.cache/edgemoe."""
    if env := os.environ.get("EDGEMOE_HOME"):
        return os.path.expanduser(env)
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "edgemoe")


def builds_dir() -> str:
    """Where `edgemoe build` caches llama.cpp builds: $EDGEMOE_BUILDS, else <store>/builds."""
    if env := os.environ.get("EDGEMOE_BUILDS"):
        return os.path.expanduser(env)
    return os.path.join(home(), "builds")


def active_lib_dir() -> str | None:
    """The active native build's lib/ (builds/native-current), or None before `edgemoe build` has activated one."""
    lib = os.path.join(builds_dir(), "native-current", "lib")
    return lib if os.path.exists(os.path.join(lib, "libllama.so")) else None


def export() -> None:
    """Point llama-cpp-python at the active build unless the user chose a library (LLAMA_CPP_LIB_PATH)."""
    if not os.environ.get("LLAMA_CPP_LIB_PATH") and (lib := active_lib_dir()):
        os.environ["LLAMA_CPP_LIB_PATH"] = lib


def install_pth() -> str | None:
    """Write the .pth hook into this interpreter's site-packages when it is a virtual environment.

    Returns its path, or None outside a venv (a system Python is not ours to change) or where it is not writable.
    """
    if sys.prefix == sys.base_prefix:
        return None
    path = os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)
    try:
        with open(path) as f:
            if f.read() == PTH_LINE:
                return path
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}.part"
    try:
        with open(tmp, "w") as f:
            f.write(PTH_LINE)
        os.replace(tmp, path)
    except OSError:
        return None
    return path
