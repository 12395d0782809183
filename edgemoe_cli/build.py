"""`edgemoe build`: compile llama.cpp (tools + shared libraries) for this machine or cross for aarch64.

One build serves both the C++ tools and the Python binding: llama-cpp-python is installed without its own
library and loads ours through LLAMA_CPP_LIB_PATH (see llamacpp.select_binding_library).

A build is planned first (plan_build: source, flags, the exact cmake lines, the cache key) and then run
(run_build). The key hashes everything that changes the binaries, so a second `build` with the same inputs is a
cache hit and returns at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .armflags import SVE512_WARNING, wide_sve_warning, without_wide_sve_i8mm  # noqa: F401 (build.SVE512_WARNING: its API too)
from .binding_path import install_pth
from .errors import EdgeMoEError
from .llamacpp import LLAMA_CPP_PYTHON_VERSION, last_error
from .store import builds_dir, sha256_file

# The tools later stages call (quantize, imatrix, eval, bench, run under qemu). Libraries come with them.
TOOLS = (
    "llama-cli",
    "llama-server",
    "llama-quantize",
    "llama-imatrix",
    "llama-perplexity",
    "llama-bench",
    "llama-gguf-split",
    "llama-completion",
    "llama-simple",
    "llama-tokenize",
    "ggml-rpc-server",  # llama.cpp's RPC worker: several boards as one (`edgemoe worker`, `--workers`)
)
# Bump when the way we configure changes, so old cache entries are not mistaken for new ones.
RECIPE_VERSION = 2  # 2: GGML_RPC=ON and ggml-rpc-server
KLEIDIAI_HOST = ("github.com", 443)
# What ggml-cpu/CMakeLists.txt fetches (FetchContent name `kleidiai`, tag KLEIDIAI_COMMIT_TAG).
KLEIDIAI_DEFAULT_TAG = "v1.24.0"
CROSS_PREFIX = "aarch64-linux-gnu-"
# What Neoverse N2/V2 and Cortex-A720/X4 report (doctor's arm_arch_flags on their /proc/cpuinfo).
CROSS_DEFAULT_ARCH = "armv9-a+sve2+i8mm+bf16+dotprod"

ProgressFn = Callable[[int, int, str], None]


@dataclass
class BuildPlan:
    source_dir: str
    source_id: str  # what the key hashes for the source: sdist sha256 or git commit (+dirty hash)
    target: str  # native | aarch64
    arch: str  # GGML_CPU_ARM_ARCH for aarch64, "native" for an x86 native build
    kleidiai: bool
    kleidiai_src: Optional[str]
    jobs: int
    key: str
    out_dir: str
    work_dir: str
    configure: list[str]
    build: list[str]
    toolchain_file: Optional[str] = None
    toolchain_text: Optional[str] = None
    kleidiai_fix_file: Optional[str] = None
    kleidiai_fix_text: Optional[str] = None
    compiler: str = ""
    targets: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    request: dict = field(default_factory=dict)  # plan_build's arguments: a rebuild without a bad feature re-plans


@dataclass
class BuildResult:
    key: str
    path: str
    cached: bool
    target: str
    arch: str
    kleidiai: bool
    source_id: str
    seconds: float
    bin_dir: str
    lib_dir: str
    tools: list[str]
    log: str
    system_info: str = ""  # from the Python binding loading this libllama (native builds only)
    current: bool = False  # builds_dir()/native-current points here
    notes: list[str] = field(default_factory=list)
    smoke: Optional[dict] = None  # smoke.SmokeResult.to_dict() of this build (see verify_build)


# ---- source -------------------------------------------------------------------------------------------------


def vendored_source(version: str = LLAMA_CPP_PYTHON_VERSION) -> tuple[Path, str]:
    """The llama.cpp tree vendored in the pinned llama-cpp-python sdist: (path, source id).

    Downloaded once into builds_dir()/src with pip (PyPI is reachable where pip works), checked against the
    pinned sha256 (SDIST_SHA256) and extracted there. Under a lock, into a private directory renamed when complete:
    two first-time builds at once must not see (or stamp as good) each other's half-extracted tree.
    """
    src = builds_dir() / "src"
    name = f"llama_cpp_python-{version}"
    tree = src / name / "vendor" / "llama.cpp"
    sdist = src / f"{name}.tar.gz"
    src.mkdir(parents=True, exist_ok=True)
    with _lock(src / f".{name}.lock"):
        if not sdist.is_file():
            _download_sdist(version, sdist)
        digest = sha256_file(sdist)
        if (pinned := SDIST_SHA256.get(version)) and digest != pinned:
            sdist.unlink()
            raise EdgeMoEError(
                f"{sdist.name} has sha256 {digest[:16]}..., edgemoe pins {pinned[:16]}... (deleted)",
                "run the command again to download it afresh; if it repeats, your PyPI mirror serves a different file",
            )
        stamp = src / name / ".edgemoe-extracted"
        if not (tree / "CMakeLists.txt").is_file() or not stamp.is_file() or stamp.read_text() != digest:
            _extract(sdist, src, name, digest)
    return tree, f"llama-cpp-python-{version}+sha256:{digest[:16]}"


# sha256 of the sdists edgemoe builds from (PyPI's file): a mirror serving other bytes is refused.
SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}


def _download_sdist(version: str, sdist: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=sdist.parent))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={version}",
            "-d",
            str(tmp),
            "--disable-pip-version-check",
            "-q",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp / sdist.name
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise EdgeMoEError(
                f"cannot download the llama-cpp-python {version} sdist ({last})",
                f"check network access to PyPI, or put {sdist.name} into {sdist.parent}, or pass --source DIR",
            )
        os.replace(got, sdist)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(sdist: Path, src: Path, name: str, digest: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.extracting-", dir=src))
    try:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(tmp)
        (tmp / name / ".edgemoe-extracted").write_text(digest)
        shutil.rmtree(src / name, ignore_errors=True)
        os.replace(tmp / name, src / name)
    except (tarfile.TarError, OSError) as e:
        raise EdgeMoEError(f"cannot extract {sdist} ({e})", f"delete {sdist} and run the command again") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkout_source(path: str | Path) -> tuple[Path, str]:
    """A llama.cpp checkout given with --source DIR: (path, source id from git, or a content hash without git)."""
    tree = Path(path).expanduser().resolve()
    if not (tree / "CMakeLists.txt").is_file() or not (tree / "ggml" / "src").is_dir():
        raise EdgeMoEError(
            f"{tree} is not a llama.cpp source tree (no CMakeLists.txt and ggml/src)",
            "pass the top directory of a llama.cpp checkout, or --source vendored",
        )
    git = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True
    )
    lines = git.stdout.split()
    if git.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == tree:
        diff = subprocess.run(["git", "-C", str(tree), "diff", "HEAD"], capture_output=True).stdout
        dirty = f"+dirty:{hashlib.sha256(diff).hexdigest()[:12]}" if diff else ""
        return tree, f"git:{lines[1]}{dirty}"
    return tree, f"tree:{_tree_hash(tree)}"


def _tree_hash(tree: Path) -> str:
    h = hashlib.sha256()
    for sub in ("CMakeLists.txt", "cmake", "common", "examples", "ggml", "include", "src", "tools", "vendor"):
        p = tree / sub
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
        for f in files:
            h.update(str(f.relative_to(tree)).encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()[:16]


def kleidiai_tag(tree: Path) -> str:
    """The KleidiAI release ggml fetches, read from ggml-cpu's CMakeLists.txt."""
    cml = tree / "ggml" / "src" / "ggml-cpu" / "CMakeLists.txt"
    m = re.search(r'set\(KLEIDIAI_COMMIT_TAG\s+"([^"]+)"\)', cml.read_text()) if cml.is_file() else None
    return m.group(1) if m else KLEIDIAI_DEFAULT_TAG


# ---- flags --------------------------------------------------------------------------------------------------


def detect_arm_arch() -> str:
    """GGML_CPU_ARM_ARCH for this aarch64 CPU, from doctor's detection (board.py): only extensions every core has."""
    from . import board

    cpu = board.read_cpu()
    return board.arm_arch_flags(cpu.features, cpu.parts)


def compiler_version(cc: str) -> tuple[str, int]:
    """(`cc --version` first line, GCC major or 0 when the compiler is not GCC)."""
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "", 0
    first = (out.splitlines() or [""])[0]
    if "clang" in first.lower():
        return first, 0
    major = subprocess.run([cc, "-dumpversion"], capture_output=True, text=True).stdout.strip().split(".")[0]
    return first, int(major) if major.isdigit() else 0


def toolchain_text() -> str:
    """CMake toolchain file for Debian/Ubuntu's aarch64-linux-gnu cross compilers."""
    return f"""# generated by edgemoe build --target aarch64
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER {CROSS_PREFIX}gcc)
set(CMAKE_CXX_COMPILER {CROSS_PREFIX}g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
"""


# GCC 12.2 (Debian 12's native and cross gcc) ICEs on this KleidiAI file at -O3: "internal compiler error: in
# vect_transform_reduction, at tree-vect-loop.cc" (loop vectorizer). -O2 or -fno-tree-loop-vectorize avoid it, so
# only this file loses loop vectorization; ggml's own kernels and every other KleidiAI file keep -O3. It costs
# nothing at run time: ggml's KleidiAI integration never calls this bf16 pack routine.
KLEIDIAI_GCC12_FILES = ("kai/ukernels/matmul/pack/kai_lhs_quant_pack_qai8dxp_bf16_neon.c",)


def kleidiai_fix_text() -> str:
    # Included right after KleidiAI's project() (CMAKE_PROJECT_KleidiAI_INCLUDE); DEFER runs the function at
    # the end of KleidiAI's CMakeLists, after it has set its own per-file options.
    files = " ".join(f'"${{CMAKE_CURRENT_SOURCE_DIR}}/{f}"' for f in KLEIDIAI_GCC12_FILES)
    return f"""# generated by edgemoe build: GCC 12 internal compiler error in KleidiAI at -O3 (loop vectorizer)
cmake_minimum_required(VERSION 3.19)
function(edgemoe_kleidiai_gcc12_fix)
  foreach(f {files})
    if(EXISTS "${{f}}")
      # APPEND: KleidiAI sets each file's -march in the same property
      set_property(SOURCE "${{f}}" APPEND PROPERTY COMPILE_OPTIONS "-fno-tree-loop-vectorize")
      message(STATUS "edgemoe: ${{f}} compiled with -fno-tree-loop-vectorize (GCC 12 ICE workaround)")
    endif()
  endforeach()
endfunction()
cmake_language(DEFER CALL edgemoe_kleidiai_gcc12_fix)
"""


def kleidiai_needs_fix(gcc_major: int) -> bool:
    return 0 < gcc_major <= 12


# ---- plan ---------------------------------------------------------------------------------------------------


def plan_build(
    source: str = "vendored",
    target: str = "native",
    arch: Optional[str] = None,
    kleidiai: Optional[bool] = None,
    kleidiai_src: Optional[str] = None,
    jobs: Optional[int] = None,
    extra_targets: tuple[str, ...] = (),
    extra_cmake: tuple[str, ...] = (),
) -> BuildPlan:
    """Decide everything about a build without running it (this is what --dry-run prints)."""
    request = dict(
        source=source,
        target=target,
        arch=arch,
        kleidiai=kleidiai,
        kleidiai_src=kleidiai_src,
        jobs=jobs,
        extra_targets=tuple(extra_targets),
        extra_cmake=tuple(extra_cmake),
    )
    if target not in ("native", "aarch64"):
        raise EdgeMoEError(f"unknown --target {target!r}", "use native (this machine) or aarch64 (cross-compile)")
    tree, source_id = vendored_source() if source == "vendored" else checkout_source(source)
    host = platform.machine().lower()
    cross = target == "aarch64" and host not in ("aarch64", "arm64")
    arm = target == "aarch64" or host in ("aarch64", "arm64")
    notes: list[str] = []

    if cross:
        for tool in ("gcc", "g++"):
            if shutil.which(CROSS_PREFIX + tool) is None:
                raise EdgeMoEError(
                    f"cross compiler {CROSS_PREFIX}{tool} not found",
                    "apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu",
                )
    cc = CROSS_PREFIX + "gcc" if cross else os.environ.get("CC", "cc")
    compiler, gcc_major = compiler_version(cc)

    if arm:
        if arch is None and not cross:
            arch = detect_arm_arch()
            arch, note = avoid_wide_sve_i8mm(arch)
            notes += [note] if note else []
        arch = arch or CROSS_DEFAULT_ARCH
        if not re.fullmatch(r"armv[0-9.]+-a(\+[a-z0-9]+)*", arch):
            raise EdgeMoEError(
                f"--arch {arch!r} is not an -march value like armv9-a+sve2+i8mm+dotprod",
                "give armv<N>-a followed by +extension parts",
            )
        kleidiai = True if kleidiai is None else kleidiai
    else:
        if arch and arch != "native":
            raise EdgeMoEError(f"--arch {arch} applies to Arm targets only", "drop --arch, or use --target aarch64")
        arch = "native"
        if kleidiai:
            raise EdgeMoEError("KleidiAI kernels exist only for Arm CPUs", "drop --kleidiai on this x86 machine")
        kleidiai = False

    tag = kleidiai_tag(tree)
    if kleidiai:
        if kleidiai_src:
            ksrc = Path(kleidiai_src).expanduser().resolve()
            if not (ksrc / "CMakeLists.txt").is_file() or not (ksrc / "kai").is_dir():
                raise EdgeMoEError(
                    f"{ksrc} is not a KleidiAI source tree (no CMakeLists.txt and kai/)",
                    f"extract kleidiai-{tag}-src.tar.gz and pass that directory",
                )
            kleidiai_src = str(ksrc)
        elif (cached := builds_dir() / "src" / f"kleidiai-{tag}").is_dir():
            kleidiai_src = str(cached)
            notes.append(f"KleidiAI {tag} from {cached}")

    flags = ["-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={arch}"] if arm else ["-DGGML_NATIVE=ON"]
    if arm:
        flags.append(f"-DGGML_CPU_KLEIDIAI={'ON' if kleidiai else 'OFF'}")
    fix_needed = bool(kleidiai and kleidiai_needs_fix(gcc_major))
    cpu_sig = "" if arm else _x86_cpu_signature()  # -march=native binaries depend on the CPU they were built on
    key_doc = {
        "recipe": RECIPE_VERSION,
        "source": source_id,
        "target": target,
        "cross": cross,
        "flags": flags,
        "kleidiai_tag": tag if kleidiai else None,
        "kleidiai_fix": fix_needed,
        "compiler": compiler,
        "cpu": cpu_sig,
        "extra_cmake": list(extra_cmake),
        "extra_targets": sorted(extra_targets),
    }
    key = f"{target}-{hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:12]}"
    out_dir = builds_dir() / key
    work_dir = builds_dir() / "work" / key
    build_dir = work_dir / "build"

    configure = [
        "cmake",
        "-S",
        str(tree),
        "-B",
        str(build_dir),
        "-G",
        "Ninja",
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON",
        # binaries find their libraries beside them in bin/ (build tree) or in ../lib (installed)
        "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
        "-DCMAKE_INSTALL_RPATH=$ORIGIN/../lib;$ORIGIN",
        "-DLLAMA_BUILD_TESTS=" + ("ON" if any(t.startswith("test-") for t in extra_targets) else "OFF"),
        "-DLLAMA_BUILD_EXAMPLES=ON",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # else configure downloads the web UI
        "-DLLAMA_BUILD_UI=OFF",
        "-DGGML_BACKEND_DL=OFF",
        "-DGGML_RPC=ON",  # the RPC backend and its server: a model split across boards over the network
        *flags,
    ]
    if cross:
        # the host's libcrypto would be found and then silently rejected for the aarch64 link
        configure.append("-DLLAMA_OPENSSL=OFF")
    toolchain_file = toolchain = None
    if cross:
        toolchain_file, toolchain = str(work_dir / "aarch64-linux-gnu.cmake"), toolchain_text()
        configure.append(f"-DCMAKE_TOOLCHAIN_FILE={toolchain_file}")
    fix_file = fix = None
    if kleidiai:
        if kleidiai_src:
            configure.append(f"-DFETCHCONTENT_SOURCE_DIR_KLEIDIAI={kleidiai_src}")
        if fix_needed:
            fix_file, fix = str(work_dir / "kleidiai-gcc12.cmake"), kleidiai_fix_text()
            configure.append(f"-DCMAKE_PROJECT_KleidiAI_INCLUDE={fix_file}")
            notes.append(
                f"GCC {gcc_major}: KleidiAI's {Path(KLEIDIAI_GCC12_FILES[0]).name} is compiled with "
                "-fno-tree-loop-vectorize (GCC 12 ICEs on it at -O3); everything else keeps -O3"
            )
    configure += list(extra_cmake)
    targets = [*TOOLS, *extra_targets]
    jobs = jobs or os.cpu_count() or 2
    build = ["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *targets]
    if shutil.which("nice"):
        build = ["nice", "-n", "10", *build]
    return BuildPlan(
        source_dir=str(tree),
        source_id=source_id,
        target=target,
        arch=arch,
        kleidiai=bool(kleidiai),
        kleidiai_src=kleidiai_src,
        jobs=jobs,
        key=key,
        out_dir=str(out_dir),
        work_dir=str(work_dir),
        configure=configure,
        build=build,
        toolchain_file=toolchain_file,
        toolchain_text=toolchain,
        kleidiai_fix_file=fix_file,
        kleidiai_fix_text=fix,
        compiler=compiler,
        targets=targets,
        notes=notes,
        request=request,
    )


def _x86_cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha256(" ".join(sorted(line.split(":", 1)[1].split())).encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.processor()


def command_lines(plan: BuildPlan) -> list[str]:
    """The shell lines a build runs, for --dry-run and the log."""
    return [shlex.join(plan.configure), shlex.join(plan.build)]


# ---- run ----------------------------------------------------------------------------------------------------


def load_manifest(path: str | Path) -> Optional[dict]:
    try:
        return json.loads((Path(path) / "build.json").read_text())
    except (OSError, ValueError):
        return None


def run_build(
    plan: BuildPlan,
    progress: Optional[ProgressFn] = None,
    keep_work: bool = False,
    make_current: bool = True,
    verify: bool = True,
) -> BuildResult:
    """Configure, compile, install into builds_dir()/<key>/{bin,lib}, then prove it; a cache hit returns at once.

    `verify` runs the smoke test (smoke.py) once per build and records it in build.json. A build that fails it is
    never activated: where a known-bad CPU feature explains the failure (KNOWN_BAD_FEATURES) it is rebuilt without
    that feature, once, and the rebuild is what is returned; otherwise EdgeMoEError names the failing types and
    the log. For native builds, builds_dir()/native-current is switched to the build only after that, and after
    llama-cpp-python has loaded its libllama in a child process.
    """
    out = Path(plan.out_dir)
    builds_dir().mkdir(parents=True, exist_ok=True)
    with _lock(builds_dir() / f".{plan.key}.lock"):
        if (manifest := load_manifest(out)) is not None:
            result = _result_from_manifest(out, manifest, cached=True)
        else:
            result = _compile_and_install(plan, progress)
            if not keep_work:
                shutil.rmtree(plan.work_dir, ignore_errors=True)
        if verify:
            result.smoke = verify_build(plan, result, progress).to_dict()
    if verify and not result.smoke["passed"]:
        return _after_failed_smoke(plan, result, progress, keep_work, make_current)
    if plan.target == "native" and make_current:
        result.current = _maybe_make_current(result)
        # a bare `import llama_cpp` in this venv finds the active build too (binding_path.py)
        if result.current and install_pth() is None and sys.prefix != sys.base_prefix:
            result.notes.append(
                "could not write the .pth hook into this venv: `import llama_cpp` outside edgemoe "
                "needs LLAMA_CPP_LIB_PATH=" + result.lib_dir
            )
    return result


# ---- proving a build ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadFeature:
    """A CPU feature ggml compiles in from the host that has crashed or miscomputed with the pinned llama.cpp."""

    name: str
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags with which -march=native compiles it in
    cmake: tuple[str, ...]  # configure arguments that leave it out
    why: str


# -march=native expands to explicit -mamx-* flags on an AMX host, which would win over -mno-amx-* given earlier on
# the command line (CMAKE_<LANG>_FLAGS come before ggml's own -march=native); -U removes the macros ggml tests
# (`__AMX_INT8__`, ...) whatever the order, so its AMX code is compiled out either way.
_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -U__AMX_TILE__ -U__AMX_INT8__ -U__AMX_BF16__"
KNOWN_BAD_FEATURES = (
    BadFeature(
        name="AMX",
        cpu_flags=("amx_tile", "amx_int8", "amx_bf16"),
        cmake=(f"-DCMAKE_C_FLAGS={_NO_AMX}", f"-DCMAKE_CXX_FLAGS={_NO_AMX}"),
        why="this llama.cpp's AMX kernels (ggml_backend_amx_mul_mat, tinygemm_kernel_amx) crash on quantized "
        "models on x86 hosts that report AMX",
    ),
)


def host_cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def feature_to_drop(plan: BuildPlan, smoke: dict, cpu_flags: set[str]) -> Optional[BadFeature]:
    """The known-bad feature that explains a failed smoke test of `plan`, if it is still compiled in.

    Only -march=native builds take features from the host; a feature already left out is not blamed twice.
    """
    if smoke.get("passed") or plan.arch != "native":
        return None
    for feature in KNOWN_BAD_FEATURES:
        if cpu_flags & set(feature.cpu_flags) and not set(feature.cmake) <= set(plan.configure):
            return feature
    return None


def _after_failed_smoke(
    plan: BuildPlan, result: BuildResult, progress: Optional[ProgressFn], keep_work: bool, make_current: bool
) -> BuildResult:
    from .smoke import SmokeResult

    smoke = SmokeResult.from_dict(result.smoke or {})
    feature = feature_to_drop(plan, result.smoke or {}, host_cpu_flags())
    if feature is not None:
        request = dict(plan.request, extra_cmake=(*plan.request.get("extra_cmake", ()), *feature.cmake))
        retry = run_build(plan_build(**request), progress, keep_work, make_current)
        retry.notes.insert(
            0,
            f"build {plan.key} failed its smoke test ({smoke.summary()}); {feature.why}: "
            f"rebuilt without {feature.name} as {retry.key}",
        )
        return retry
    raise EdgeMoEError(
        f"llama.cpp build {plan.key} failed its smoke test, so it was not activated: {smoke.summary()}",
        f"log: {smoke.log or result.path}; build log: {result.log}",
    )


def smoke_runner(plan: BuildPlan) -> tuple[Optional[list[str]], dict, bool, str]:
    """How to run a build's tools here: (command prefix, its environment, test the binding?, why skipped or "")."""
    host = platform.machine().lower()
    if plan.target == "aarch64" and host not in ("aarch64", "arm64"):
        if shutil.which("qemu-aarch64") is None:
            return None, {}, False, "qemu-aarch64 not found: apt-get install qemu-user to test a cross build here"
        # 128-bit SVE as on Neoverse N2 / the Orion O6; SME off: no board in scope has it, and qemu 7.2's SME with
        # KleidiAI's SME kernels gives garbage (README "Armv9 notes")
        return (["qemu-aarch64", "-cpu", QEMU_CPU.format(vl=16)], {"QEMU_LD_PREFIX": CROSS_SYSROOT}, False, "")
    return None, {}, True, ""


QEMU_CPU = "max,sve-default-vector-length={vl},sme=off"
CROSS_SYSROOT = "/usr/aarch64-linux-gnu"


def verify_build(plan: BuildPlan, result: BuildResult, progress: Optional[ProgressFn] = None):
    """The build's smoke test (smoke.SmokeResult), run once and recorded in its build.json."""
    from .smoke import SMOKE_VERSION, SmokeResult, run_smoke

    out = Path(result.path)
    recorded = (load_manifest(out) or {}).get("smoke")
    if recorded and recorded.get("version") == SMOKE_VERSION:
        return SmokeResult.from_dict(recorded)
    runner, env, binding, skipped = smoke_runner(plan)
    if skipped:
        smoke = SmokeResult(passed=True, skipped=skipped, runner="none")
    else:
        if progress:
            progress(0, 0, "smoke test")
        timeout = 900.0 if runner else 120.0
        smoke = run_smoke(
            result.bin_dir,
            result.lib_dir,
            runner=runner,
            runner_env=env,
            binding=binding,
            log_path=out / "smoke.log",
            timeout=timeout,
        )
    _update_manifest(out, smoke=smoke.to_dict())
    return smoke


def _update_manifest(out: Path, **fields) -> None:
    manifest = load_manifest(out) or {}
    manifest.update(fields)
    tmp = out / f"build.json.{os.getpid()}.part"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "build.json")


@contextlib.contextmanager
def _lock(path: Path):
    # Two `edgemoe build` runs of the same key (two terminals, parallel tests) would compile into the same
    # work directory; the second waits and then finds the cache entry.
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile_and_install(plan: BuildPlan, progress: Optional[ProgressFn]) -> BuildResult:
    work = Path(plan.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "build.log"
    if plan.toolchain_file:
        Path(plan.toolchain_file).write_text(plan.toolchain_text or "")
    if plan.kleidiai_fix_file:
        Path(plan.kleidiai_fix_file).write_text(plan.kleidiai_fix_text or "")
    if plan.kleidiai and not plan.kleidiai_src and not _kleidiai_already_fetched(work):
        check_kleidiai_reachable(plan)
    env = dict(os.environ, NINJA_STATUS="[%f/%t] ")
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("# edgemoe build " + plan.key + "\n" + "\n".join(command_lines(plan)) + "\n\n")
        for note in plan.notes:
            log.write(f"# note: {note}\n")
        log.flush()
        if progress:
            progress(0, 0, "configuring")
        _run_logged(plan.configure, log, env, None, "configure", log_path)
        _run_logged(plan.build, log, env, progress, "compile", log_path)
    seconds = time.monotonic() - start
    return _install(plan, log_path, seconds)


def _kleidiai_already_fetched(work: Path) -> bool:
    return (work / "build" / "_deps" / "kleidiai-src" / "CMakeLists.txt").is_file()


def check_kleidiai_reachable(plan: BuildPlan, timeout: float = 5.0) -> None:
    """Fail in seconds, not after CMake's FetchContent timeout, when KleidiAI cannot be downloaded."""
    try:
        socket.create_connection(KLEIDIAI_HOST, timeout=timeout).close()
    except OSError as e:
        tag = kleidiai_tag(Path(plan.source_dir))
        raise EdgeMoEError(
            f"KleidiAI {tag} must be downloaded from {KLEIDIAI_HOST[0]} at configure time, which is unreachable "
            f"({e.strerror or e})",
            f"on a machine with network get https://github.com/ARM-software/kleidiai/releases/download/{tag}/"
            f"kleidiai-{tag}-src.tar.gz, extract it and pass --kleidiai-src DIR (or build with --no-kleidiai)",
        ) from e


_PROGRESS = re.compile(r"^\[(\d+)/(\d+)\]\s*(.*)")


def _run_logged(cmd: list[str], log, env: dict, progress: Optional[ProgressFn], step: str, log_path: Path) -> None:
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, errors="replace"
        )
    except OSError as e:
        raise EdgeMoEError(f"cannot run {cmd[0]} ({e.strerror})", "install cmake and ninja-build") from e
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        if progress and (m := _PROGRESS.match(line)):
            progress(int(m.group(1)), int(m.group(2)), m.group(3).strip())
    log.flush()
    if proc.wait() != 0:
        error = last_error(log_path.read_text(errors="replace"))
        raise EdgeMoEError(f"llama.cpp {step} failed: {error}", f"full log: {log_path}")


def _install(plan: BuildPlan, log_path: Path, seconds: float) -> BuildResult:
    built = Path(plan.work_dir) / "build" / "bin"
    out = Path(plan.out_dir)
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    (part / "bin").mkdir(parents=True)
    (part / "lib").mkdir()
    tools = []
    for name in plan.targets:
        if (built / name).is_file():
            shutil.copy2(built / name, part / "bin" / name)
            tools.append(name)
    for lib in sorted(built.glob("lib*.so*")):
        shutil.copy2(lib, part / "lib" / lib.name, follow_symlinks=False)
    missing = [t for t in TOOLS if t not in tools]
    if missing or not (part / "lib" / "libllama.so").exists():
        shutil.rmtree(part, ignore_errors=True)
        raise EdgeMoEError(f"build finished but {', '.join(missing) or 'libllama.so'} is missing", f"see {log_path}")
    shutil.copy2(log_path, part / "build.log")
    manifest = {
        "key": plan.key,
        "target": plan.target,
        "arch": plan.arch,
        "kleidiai": plan.kleidiai,
        "source_id": plan.source_id,
        "source_dir": plan.source_dir,
        "compiler": plan.compiler,
        "configure": plan.configure,
        "build": plan.build,
        "notes": plan.notes,
        "tools": tools,
        "seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.machine(),
    }
    (part / "build.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(part, out)
    return _result_from_manifest(out, manifest, cached=False)


def _result_from_manifest(out: Path, m: dict, cached: bool) -> BuildResult:
    return BuildResult(
        key=m["key"],
        path=str(out),
        cached=cached,
        target=m["target"],
        arch=m["arch"],
        kleidiai=m["kleidiai"],
        source_id=m["source_id"],
        seconds=0.0 if cached else m["seconds"],
        bin_dir=str(out / "bin"),
        lib_dir=str(out / "lib"),
        tools=m["tools"],
        log=str(out / "build.log"),
        system_info=m.get("system_info", ""),
        notes=list(m.get("notes", [])),
        smoke=m.get("smoke"),
    )


def check_binding(lib_dir: str | Path, python: str = sys.executable) -> dict:
    """Load `lib_dir`/libllama.so into llama-cpp-python in a child process: {version, library, system_info}.

    A child process, because this one may already hold another libllama.
    """
    code = (
        "import json, llama_cpp\n"
        "llama_cpp.llama_backend_init()\n"
        "lib = [l.split()[-1] for l in open('/proc/self/maps') if 'libllama.so' in l]\n"
        "print(json.dumps({'version': llama_cpp.__version__, 'library': lib[0] if lib else '',\n"
        "  'system_info': llama_cpp.llama_print_system_info().decode().strip()}))\n"
    )
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib_dir))
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeMoEError(
            f"llama-cpp-python cannot load {lib_dir}/libllama.so ({last})",
            f"reinstall llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} or build --source vendored",
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _maybe_make_current(result: BuildResult) -> bool:
    out = Path(result.path)
    link = builds_dir() / "native-current"
    if result.cached and result.system_info and link.resolve() == out.resolve():
        return True  # already checked and current: `make setup` stays instant
    try:
        info = check_binding(result.lib_dir)
    except EdgeMoEError as e:
        result.notes.append(f"not made current: {e}")
        return False
    result.system_info = info["system_info"]
    if info["version"] != LLAMA_CPP_PYTHON_VERSION:
        result.notes.append(f"llama-cpp-python {info['version']} installed, edgemoe pins {LLAMA_CPP_PYTHON_VERSION}")
    if (load_manifest(out) or {}).get("system_info") != info["system_info"]:
        _update_manifest(out, system_info=info["system_info"])
    tmp_link = builds_dir() / f".native-current.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp_link.unlink()
    tmp_link.symlink_to(out.name)  # relative: the builds dir can move as a whole
    os.replace(tmp_link, link)
    return True


# ---- 512-bit SVE --------------------------------------------------------------------------------------------


def avoid_wide_sve_i8mm(arch: str, vector_bits: Optional[int] = None) -> tuple[str, Optional[str]]:
    """The detected arch for this CPU, minus i8mm when SVE vectors are wider than 256 bits (see SVE512_WARNING).

    Only for flags edgemoe chose itself; an explicit --arch is kept and warned about instead.
    """
    if vector_bits is None:
        from .board import sve_vector_bits

        vector_bits = sve_vector_bits()
    return without_wide_sve_i8mm(arch, vector_bits)


def sve_warning(plan: BuildPlan, vector_bits: Optional[int] = None) -> Optional[str]:
    """The wide-SVE warning for a native build on this CPU (a cross build's vector length is chosen at run time)."""
    if plan.target != "native":
        return None
    if vector_bits is None:
        from .board import sve_vector_bits

        vector_bits = sve_vector_bits()
    return wide_sve_warning(plan.arch, vector_bits)
