"""What a board can do: CPU features, core types, SVE width, RAM, disk -> llama.cpp build flags and memory fit.

Pure functions over text (so recorded /proc and /sys snippets test them) plus thin readers of the live machine.
The -march rules are in armflags.py and the model's memory arithmetic in ernie21b.py (both pure); this module feeds
them what it reads, and knows the board profiles (configs/boards/*.toml) `plan --board` and `build --board` use.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .armflags import CORES, arm_arch_flags, wide_sve_warning, without_wide_sve_i8mm  # noqa: F401 (board.arm_arch_flags: its API too)
from .ernie21b import (  # noqa: F401 (board.*: doctor's API, and the tests')
    ERNIE_21B,
    GIB,
    RUNTIME_RESERVE_BYTES,
    STOCK_FTYPES,
    ErnieShape,
    ModelFit,
    ernie_tensors,
    fit,
    kv_cache_bytes,
    model_bytes,
    n_params,
    stock_tensor_type,
    tensor_bytes,
)
from .errors import EdgeMoEError
from .store import configs_dir, home
from .tomlfile import load_toml

# The /proc/cpuinfo feature names doctor reports (what ggml's kernels care about).
ARM_KEY_FEATURES = (
    "asimd",
    "asimddp",
    "asimdhp",
    "fphp",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
    "svei8mm",
    "svebf16",
    "sme",
    "sme2",
)
X86_KEY_FEATURES = (
    "sse4_2",
    "f16c",
    "fma",
    "avx",
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512vbmi",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


@dataclass
class CoreGroup:
    name: str  # "Cortex-A720", or "part 0x... of implementer 0x..." when not in CORES
    cpus: list[int]
    capacity: int | None = None  # /sys/devices/system/cpu/cpuN/cpu_capacity (1024 = the fastest core)
    kind: str = "uniform"  # big | mid | little | uniform

    @property
    def count(self) -> int:
        return len(self.cpus)


@dataclass
class CpuInfo:
    arch: str  # aarch64 | x86_64 | ...
    model: str
    n_cpus: int
    features: list[str]  # common to every core, sorted
    cores: list[CoreGroup] = field(default_factory=list)
    parts: list[tuple[int, int]] = field(default_factory=list)  # (implementer, part) of each distinct core type
    sve_vector_bits: int | None = None


def _blocks(text: str) -> list[dict[str, str]]:
    blocks, cur = [], {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if not line.strip():
            if cur:
                blocks.append(cur)
                cur = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            cur[key.strip().lower()] = value.strip()
    if cur:
        blocks.append(cur)
    return blocks


def _int(value: str | None) -> int | None:
    try:
        return int(value, 0) if value is not None else None
    except ValueError:
        return None


def core_name(implementer: int, part: int) -> str:
    known = CORES.get((implementer, part))
    return known[0] if known else f"part 0x{part:03x} (implementer 0x{implementer:02x})"


def parse_cpuinfo(text: str, capacities: dict[int, int] | None = None, arch: str | None = None) -> CpuInfo:
    """Parse /proc/cpuinfo (aarch64 or x86). `capacities` maps cpu index -> cpu_capacity where the kernel tells.

    Features are those every core reports: a build must run on the little cores too.
    """
    procs = [b for b in _blocks(text) if "processor" in b and _int(b["processor"]) is not None]
    if not procs:
        raise EdgeMoEError("no processor entries in /proc/cpuinfo text", "pass the file's full contents")
    is_arm = any("cpu implementer" in b for b in procs)
    arch = arch or ("aarch64" if is_arm else "x86_64" if any("flags" in b for b in procs) else platform.machine())
    key = "features" if is_arm else "flags"
    sets = [set(b.get(key, "").split()) for b in procs]
    features = sorted(set.intersection(*sets)) if sets else []
    capacities = capacities or {}

    groups: dict[tuple, CoreGroup] = {}
    parts: list[tuple[int, int]] = []
    for b in procs:
        cpu = int(b["processor"], 0)
        if is_arm:
            imp, part = _int(b.get("cpu implementer")) or 0, _int(b.get("cpu part")) or 0
            if (imp, part) not in parts:
                parts.append((imp, part))
            name = core_name(imp, part)
        else:
            name = b.get("model name", "unknown")
        gkey = (name, capacities.get(cpu))
        groups.setdefault(gkey, CoreGroup(name=name, cpus=[], capacity=capacities.get(cpu))).cpus.append(cpu)
    cores = sorted(groups.values(), key=lambda g: (-(g.capacity or 0), g.cpus[0]))
    _label_kinds(cores)

    if is_arm:
        names = []
        for g in cores:
            if g.name not in names:
                names.append(g.name)
        model = " + ".join(f"{sum(c.count for c in cores if c.name == n)}x {n}" for n in names)
    else:
        model = procs[0].get("model name", "unknown")
    return CpuInfo(arch=arch, model=model, n_cpus=len(procs), features=features, cores=cores, parts=parts)


def _label_kinds(cores: list[CoreGroup]) -> None:
    """big/mid/little from cpu_capacity where present, else from distinct core names (order of first appearance
    is not a speed order, so without capacities mixed cores are only called 'mixed')."""
    caps = sorted({g.capacity for g in cores if g.capacity is not None}, reverse=True)
    if len(caps) > 1 and all(g.capacity is not None for g in cores):
        for g in cores:
            g.kind = "big" if g.capacity == caps[0] else "little" if g.capacity == caps[-1] else "mid"
    elif len({g.name for g in cores}) > 1:
        for g in cores:
            g.kind = "mixed"


def parse_capacities(files: dict[int, str]) -> dict[int, int]:
    """cpu index -> contents of /sys/devices/system/cpu/cpuN/cpu_capacity."""
    return {cpu: int(text.strip()) for cpu, text in files.items() if text.strip().isdigit()}


@dataclass
class Board:
    name: str
    description: str
    arch: str
    ram_bytes: int
    n_cpus: int
    cores: list[dict]
    features: list[str]
    sve_vector_bits: int | None
    ggml_cpu_arm_arch: str | None
    source: str = ""

    @property
    def parts(self) -> list[tuple[int, int]]:
        """(implementer, part) of each core type, for arm_arch_flags' base level (Arm Ltd cores: 0x41)."""
        return [(0x41, int(str(c["part"]), 0)) for c in self.cores if "part" in c]


def boards_dir() -> Path:
    return configs_dir() / "boards"


def list_boards() -> list[str]:
    return sorted(p.stem for p in boards_dir().glob("*.toml"))


def load_board(name: str) -> Board:
    """A known board's profile by name (configs/boards/NAME.toml) or a path to such a TOML file."""
    path = Path(name) if name.endswith(".toml") else boards_dir() / f"{name}.toml"
    if not path.is_file():
        raise EdgeMoEError(f"unknown board {name!r}", f"choose one of: {', '.join(list_boards())} (or a .toml path)")
    try:
        d = load_toml(path.read_text(), f"board file {path}")
        return Board(
            name=d.get("name", path.stem),
            description=d.get("description", ""),
            arch=d["arch"],
            ram_bytes=int(float(d["ram_gib"]) * GIB),
            n_cpus=int(d["cpus"]),
            cores=list(d.get("cores", [])),
            features=list(d.get("features", [])),
            sve_vector_bits=d.get("sve_vector_bits"),
            ggml_cpu_arm_arch=d.get("ggml_cpu_arm_arch"),
            source=d.get("source", ""),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise EdgeMoEError(f"malformed board file {path}: {e}", "fix it after configs/boards/*.toml's example") from e


def build_options(name: str, arch: str | None, host_machine: str | None = None) -> tuple[str, str, list[str]]:
    """(target, GGML_CPU_ARM_ARCH, notes) for `edgemoe build --board NAME`: the profile's flags, minus i8mm where its
    SVE is wider than 256 bits; cross-compiled unless this machine is aarch64 itself."""
    if arch is not None:
        raise EdgeMoEError("give --board or --arch, not both", "--board NAME takes the board profile's flags")
    profile = load_board(name)
    if profile.arch != "aarch64" or not profile.ggml_cpu_arm_arch:
        raise EdgeMoEError(
            f"board {profile.name} is {profile.arch}, not an Arm board with GGML_CPU_ARM_ARCH",
            "build on that machine with `edgemoe build` (its own flags)",
        )
    flags, note = without_wide_sve_i8mm(profile.ggml_cpu_arm_arch, profile.sve_vector_bits)
    host = host_machine or platform.machine()
    return ("native" if host in ("aarch64", "arm64") else "aarch64"), flags, [note] if note else []


# ---- the live machine ----


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def sve_vector_bits(path: str = "/proc/sys/abi/sve_default_vector_length") -> int | None:
    """The kernel's default SVE vector length for new processes, in bits (None without SVE or on other arches).

    The file holds bytes (16 on Neoverse N2/V2, 32 on V1, 64 on A64FX). 512-bit SVE matters: llama.cpp's
    q4_K/q6_K SVE+i8mm dot products are under suspicion there (see `edgemoe build`).
    """
    text = _read(path)
    return int(text.strip()) * 8 if text and text.strip().isdigit() else None


def read_cpu() -> CpuInfo:
    text = _read("/proc/cpuinfo") or ""
    caps = parse_capacities(
        {int(p.parent.name[3:]): p.read_text() for p in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpu_capacity")}
    )
    if not text.strip():
        n = os.cpu_count() or 1
        return CpuInfo(
            arch=platform.machine(),
            model=platform.processor() or "unknown",
            n_cpus=n,
            features=[],
            cores=[CoreGroup("unknown", list(range(n)))],
        )
    info = parse_cpuinfo(text, caps, arch=platform.machine())
    info.sve_vector_bits = sve_vector_bits()
    return info


def memory() -> tuple[int, int]:
    """(total, available) RAM in bytes."""
    import psutil

    vm = psutil.virtual_memory()
    return vm.total, vm.available


def free_disk(path: Path) -> tuple[str, int]:
    """Free bytes on the filesystem that holds `path` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p), shutil.disk_usage(p).free


def binding_report():
    """(llamacpp.BindingInfo, None) for the llama.cpp library the Python binding loads, or (None, why not).

    Never raises: doctor reports a missing or broken binding instead of crashing.
    """
    try:
        from .llamacpp import binding_info

        return binding_info(), None
    except EdgeMoEError as e:
        return None, e.message
    except Exception as e:  # a broken binding must not stop doctor from reporting everything else
        return None, f"{type(e).__name__}: {e}"


@dataclass
class DoctorReport:
    os: str
    arch: str
    cpu_model: str
    n_cpus: int
    cores: list[CoreGroup]
    features: list[str]  # the ones ggml cares about, present on this CPU
    all_features: list[str]
    sve_vector_bits: int | None
    ram_total_bytes: int
    ram_available_bytes: int
    store: str
    disk_free_bytes: int
    binding: object | None  # llamacpp.BindingInfo: library, source, llama_cpp_python, system_info
    llama_error: str | None
    native_build: str | None
    build_smoke: dict | None  # the active build's smoke test as recorded by `edgemoe build` (smoke.SmokeResult)
    ggml_cpu_arm_arch: str | None
    recommendations: list[str]
    ctx: int
    fits: list[ModelFit]


def doctor(ctx: int = 4096) -> DoctorReport:
    """Everything `edgemoe doctor` reports about this machine."""
    from . import llamacpp

    cpu = read_cpu()
    total, avail = memory()
    store_path, free = free_disk(home())
    binding, err = binding_report()
    build = llamacpp.native_build_dir()
    build_smoke = llamacpp.native_build_manifest().get("smoke")
    is_arm = cpu.arch in ("aarch64", "arm64")
    key = ARM_KEY_FEATURES if is_arm else X86_KEY_FEATURES
    arch_flags = arm_arch_flags(cpu.features, cpu.parts) if is_arm else None
    fits = [fit(ft, ctx, total) for ft in STOCK_FTYPES]
    rec = []
    if is_arm:
        # Recommend exactly what `edgemoe build` would use: on SVE wider than 256 bits it drops i8mm (ggml bug).
        safe_flags, _ = without_wide_sve_i8mm(arch_flags, cpu.sve_vector_bits)
        rec.append(f"build llama.cpp with -DGGML_CPU_ARM_ARCH={safe_flags} (`edgemoe build` does)")
        if warning := wide_sve_warning(arch_flags, cpu.sve_vector_bits):
            rec.append(warning)
        arch_flags = safe_flags
    else:
        rec.append(f"{cpu.arch} is a development host: build and tests run here, speed numbers belong to the board")
    if build is None:
        rec.append("no native llama.cpp build yet: run `edgemoe build`")
    elif not build_smoke or build_smoke.get("version") is None:
        rec.append("the active llama.cpp build has no smoke-test record: run `edgemoe build` to prove it")
    best = [f.ftype for f in fits if f.fits]
    rec.append(
        f"ERNIE-4.5-21B-A3B at ctx {ctx}: "
        + (
            f"fits at {', '.join(best)}"
            if best
            else f"does not fit in {total / GIB:.1f} GiB even at Q4_0; use `edgemoe plan` for a smaller mix"
        )
    )
    short_now = [f.ftype for f in fits if f.fits and f.need_bytes > avail]
    if short_now:
        rec.append(
            f"only {avail / GIB:.1f} GiB is available right now: {', '.join(short_now)} would need other "
            "programs closed (or swap)"
        )
    return DoctorReport(
        os=f"{platform.system()} {platform.release()}",
        arch=cpu.arch,
        cpu_model=cpu.model,
        n_cpus=cpu.n_cpus,
        cores=cpu.cores,
        features=[f for f in key if f in cpu.features],
        all_features=cpu.features,
        sve_vector_bits=cpu.sve_vector_bits,
        ram_total_bytes=total,
        ram_available_bytes=avail,
        store=store_path,
        disk_free_bytes=free,
        binding=binding,
        llama_error=err,
        native_build=str(build) if build else None,
        build_smoke=build_smoke,
        ggml_cpu_arm_arch=arch_flags,
        recommendations=rec,
        ctx=ctx,
        fits=fits,
    )
