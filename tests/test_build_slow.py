"""Slow tests of `edgemoe build`: the real native build, and the aarch64 cross build proven under qemu.

Native: the tools and shared libraries are installed with a working rpath, llama-cpp-python loads our libllama,
a second build is a cache hit.

Cross (x86_64 hosts; installs Debian's cross compilers and qemu-user when missing and running as root):
- the Armv9 build (armv9-a+sve2+i8mm+bf16+dotprod, KleidiAI) has SVE (whilelo, z registers), i8mm (smmla) and
  KleidiAI code in libggml-cpu;
- under `qemu-aarch64 -cpu max,sme=off` with 128- and 256-bit SVE it runs the tiny ERNIE fixture at Q8_0 and
  Q4_0 and reports SVE / MATMUL_INT8 / KLEIDIAI in system_info; greedy texts part after a few words (near-ties of
  a flat tiny model), so agreement with the x86 build is asserted on the logits: mean KL within KL_BOUND
  (llama-perplexity --kl-divergence);
- llama.cpp's test-quantize-fns passes at 128/256-bit SVE and fails q4_K/q6_K at 512 bits, and a tiny SVE program
  shows why (ggml, not qemu: see README "Armv9 notes");
- GCC 12 still ICEs on the KleidiAI file without edgemoe's workaround, and the build applied the workaround.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgemoe_cli import build as B
from edgemoe_cli import llamacpp, smoke
from edgemoe_cli.errors import EdgeMoEError
from edgemoe_cli.store import builds_dir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EDGEMOE = Path(sys.executable).with_name("edgemoe")
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")
CROSS_ARCH = B.CROSS_DEFAULT_ARCH  # armv9-a+sve2+i8mm+bf16+dotprod
CROSS_PACKAGES = ("gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu", "qemu-user", "binutils-aarch64-linux-gnu")
CROSS_TOOLS = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump", "qemu-aarch64")
SYSROOT = B.CROSS_SYSROOT
KLEIDIAI_MIRROR = Path(os.environ.get("EDGEMOE_KLEIDIAI_MIRROR", "/work/.mirror/ARM-software+kleidiai/repo"))
PROMPT = "The Debian package manager"
N_PREDICT = 24
# Mean KL(x86 || aarch64 under qemu) per token, llama-perplexity --kl-divergence on the fixture README (measured
# here: Q4_0 5.5e-5, Q8_0 7.9e-4, both at 128- and 256-bit SVE). Q8_0 differs more because KleidiAI's Q8_0 kernel
# (qai8dxp x qsi8cxp) requantizes weights per channel and activations per row, where ggml's x86 Q8_0 keeps blocks
# of 32; Q4_0 goes through qsi8d32p x qsi4c32p, the same blocks as ggml. For scale: f32 -> Q8_0 itself costs
# 1.75e-4 and f32 -> Q4_0 5.9e-3 on the x86 build. Bounds leave ~4-9x headroom over the measurement.
KL_BOUND = {"Q4_0": 5e-4, "Q8_0": 3e-3}
SAME_TOP_MIN = 95.0  # % of positions where both builds pick the same top token (measured 99.2 and 96.8)
# Debian 12's qemu 7.2 enables SME in `-cpu max`; KleidiAI then runs its SME kernels and the logits are garbage
# (mean KLD 2.9-3.5 and same top token 2-7%, varying run to run; fine with GGML_KLEIDIAI_SME=0: test_qemu_sme_...).
# The boards in scope (Neoverse N2/V2, Cortex-A720/X4) have no SME, so the emulated CPU leaves it out.
QEMU_CPU = B.QEMU_CPU  # max,sve-default-vector-length={vl},sme=off: what build.py smoke-tests cross builds with


# ---- native ----


@pytest.fixture(scope="session")
def native_build() -> dict:
    proc = subprocess.run([str(EDGEMOE), "build", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_native_build_tools_libraries_and_rpath(native_build):
    bin_dir, lib_dir = Path(native_build["bin_dir"]), Path(native_build["lib_dir"])
    for tool in B.TOOLS:
        assert (bin_dir / tool).is_file() and os.access(bin_dir / tool, os.X_OK)
    assert (lib_dir / "libllama.so").exists() and list(lib_dir.glob("libggml-cpu.so*"))
    ldd = subprocess.run(["ldd", str(bin_dir / "llama-quantize")], capture_output=True, text=True).stdout
    assert "not found" not in ldd
    resolved = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, re.MULTILINE))
    assert Path(resolved["libllama.so.0"]).resolve().parent == lib_dir.resolve()  # via RUNPATH $ORIGIN/../lib
    version = subprocess.run([str(bin_dir / "llama-quantize"), "--help"], capture_output=True, text=True)
    assert "usage" in (version.stdout + version.stderr).lower()
    assert Path(native_build["log"]).is_file()


def test_native_build_is_current_and_loaded_by_the_binding(native_build):
    assert native_build["current"] is True
    assert llamacpp.native_build_dir() == Path(native_build["path"]).resolve()
    info = B.check_binding(native_build["lib_dir"])
    assert Path(info["library"]).resolve().parent == Path(native_build["lib_dir"]).resolve()
    assert "CPU :" in info["system_info"]
    assert llamacpp.find_tool("llama-imatrix") == Path(native_build["bin_dir"]) / "llama-imatrix"


def test_second_build_is_a_cache_hit(native_build):
    proc = subprocess.run([str(EDGEMOE), "build", "--json"], capture_output=True, text=True)
    again = json.loads(proc.stdout)
    assert again["cached"] is True and again["key"] == native_build["key"] and again["seconds"] == 0.0


def test_binding_generates_with_our_library(native_build, tiny_gguf):
    model = tiny_gguf("pt", "q8_0")
    code = (
        "import json, llama_cpp\n"
        f"llm = llama_cpp.Llama({str(model)!r}, n_ctx=256, verbose=False)\n"
        "out = llm.create_completion('User: what is 2 plus 3?\\nAssistant: ', max_tokens=8, temperature=0)\n"
        "lib = [l.split()[-1] for l in open('/proc/self/maps') if 'libllama.so' in l][0]\n"
        "print(json.dumps({'text': out['choices'][0]['text'], 'lib': lib}))\n"
    )
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": native_build["lib_dir"]}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(doc["lib"]).resolve().parent == Path(native_build["lib_dir"]).resolve()
    assert doc["text"].strip()


# ---- cross + qemu ----


@pytest.fixture(scope="session")
def cross_tools() -> None:
    if not IS_X86:
        pytest.skip("the cross build and qemu proof run on x86_64 hosts; an arm64 host runs the native tests")
    if all(shutil.which(t) for t in CROSS_TOOLS) and Path(SYSROOT, "lib").is_dir():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"needs {' '.join(CROSS_PACKAGES)} (apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *CROSS_PACKAGES]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            pytest.skip(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-300:]}")


def kleidiai_source(tag: str) -> str | None:
    """KleidiAI `tag` extracted from a local mirror of ARM-software/kleidiai into the build cache, if present."""
    dest = builds_dir() / "src" / f"kleidiai-{tag}"
    if (dest / "CMakeLists.txt").is_file():
        return str(dest)
    if not KLEIDIAI_MIRROR.is_dir():
        return None
    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    archive = subprocess.run(["git", f"--git-dir={KLEIDIAI_MIRROR}", "archive", tag], capture_output=True)
    if archive.returncode != 0:
        return None
    tar = tmp / "src.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as tf:
        tf.extractall(tmp / "tree", filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(tmp / "tree")
    os.replace(tmp / "tree", dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


@pytest.fixture(scope="session")
def cross_build(cross_tools):
    tree, _ = B.vendored_source()
    ksrc = kleidiai_source(B.kleidiai_tag(tree))  # None: CMake downloads it, where GitHub is reachable
    kleidiai = True
    if ksrc is None:
        try:
            B.check_kleidiai_reachable(B.plan_build(target="aarch64", arch=CROSS_ARCH))
        except EdgeMoEError:
            kleidiai = False  # no mirror, no network: still prove SVE/i8mm; the KleidiAI checks skip
    plan = B.plan_build(
        target="aarch64", arch=CROSS_ARCH, kleidiai=kleidiai, kleidiai_src=ksrc, extra_targets=("test-quantize-fns",)
    )
    result = B.run_build(plan)
    return plan, result


def needs_kleidiai(plan) -> None:
    if not plan.kleidiai:
        pytest.skip(
            "cross build made without KleidiAI: no local source (EDGEMOE_KLEIDIAI_MIRROR) and GitHub unreachable"
        )


def qemu(vl_bytes: int, exe: str | Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    cmd = ["qemu-aarch64", "-cpu", QEMU_CPU.format(vl=vl_bytes), str(exe), *map(str, args)]
    env = {**os.environ, "QEMU_LD_PREFIX": SYSROOT}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def objdump(lib: Path) -> str:
    return subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(lib)], capture_output=True, text=True).stdout


def test_cross_build_passed_its_smoke_test_under_qemu(cross_build):
    """run_build proved the cross build before returning it: every type, through its tools, under qemu."""
    _, result = cross_build
    assert result.smoke["passed"] and not result.smoke["skipped"], result.smoke["summary"]
    assert result.smoke["runner"].startswith("qemu-aarch64 -cpu max,sve-default-vector-length=16")
    assert {c["ftype"] for c in result.smoke["cases"]} == set(smoke.SMOKE_FTYPES)
    assert "SVE = 1" in result.smoke["system_info"] and "MATMUL_INT8 = 1" in result.smoke["system_info"]


def test_cross_build_has_sve_i8mm_and_kleidiai_code(cross_build):
    plan, result = cross_build
    assert f"-DGGML_CPU_ARM_ARCH={CROSS_ARCH}" in plan.configure
    lib = sorted(Path(result.lib_dir).glob("libggml-cpu.so*"))[-1]
    asm = objdump(lib)
    assert re.search(r"\twhilelo\t", asm), "no SVE predicate loop (whilelo)"
    assert re.search(r"\bz\d+\.[bhsd]\b", asm), "no SVE z registers"
    assert re.search(r"\tsmmla\t", asm), "no i8mm (smmla)"
    needs_kleidiai(plan)
    assert "-DGGML_CPU_KLEIDIAI=ON" in plan.configure
    assert "<kai_" in asm, "no KleidiAI kernels linked into libggml-cpu"


def test_kleidiai_source_dir_and_gcc12_workaround_were_used(cross_build):
    plan, result = cross_build
    needs_kleidiai(plan)
    log = Path(result.log).read_text()
    if plan.kleidiai_src:
        assert f"-DFETCHCONTENT_SOURCE_DIR_KLEIDIAI={plan.kleidiai_src}" in log
    _, major = B.compiler_version("aarch64-linux-gnu-gcc")
    if B.kleidiai_needs_fix(major):
        assert "-fno-tree-loop-vectorize (GCC 12 ICE workaround)" in log


def test_gcc12_really_ices_on_kleidiai_without_the_workaround(cross_build, tmp_path):
    plan, _ = cross_build
    _, major = B.compiler_version("aarch64-linux-gnu-gcc")
    if major != 12 or not plan.kleidiai_src:
        pytest.skip("needs GCC 12 and the KleidiAI source")
    src = Path(plan.kleidiai_src) / B.KLEIDIAI_GCC12_FILES[0]

    def compile_(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "aarch64-linux-gnu-gcc",
                "-O3",
                "-march=armv8.2-a+bf16",
                *flags,
                f"-I{plan.kleidiai_src}",
                "-c",
                str(src),
                "-o",
                str(tmp_path / "k.o"),
            ],
            capture_output=True,
            text=True,
        )

    assert "internal compiler error" in compile_().stderr
    assert compile_("-fno-tree-loop-vectorize").returncode == 0


@pytest.fixture(scope="session")
def fixture_models(native_build, tiny_gguf, tmp_path_factory) -> dict[str, Path]:
    """The tiny Thinking fixture at Q8_0 (convert) and Q4_0 (the native llama-quantize from f32)."""
    q8 = tiny_gguf("thinking", "q8_0")
    q4 = tmp_path_factory.mktemp("q4") / "tiny-ernie-thinking-q4_0.gguf"
    llamacpp.run_tool("llama-quantize", [str(tiny_gguf("thinking", "f32")), str(q4), "Q4_0"])
    return {"Q8_0": q8, "Q4_0": q4}


def completion_args(model: Path) -> list[str]:
    return smoke.completion_args(model, PROMPT, N_PREDICT)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("vl_bytes", [16, 32])
def test_qemu_armv9_build_runs_fixture_greedy(cross_build, native_build, fixture_models, quant, vl_bytes):
    """Same greedy run on x86 and emulated Armv9. The tiny model's distributions are flat (PPL ~480), so near-ties
    make the texts part after some tokens (measured: the first 6-11 words equal, 24 tokens generated); agreement
    is asserted on the logits, within KL_BOUND, by test_qemu_armv9_logits_match_x86_within_kl_bound."""
    _, result = cross_build
    model = fixture_models[quant]
    x86 = subprocess.run(
        [str(Path(native_build["bin_dir"]) / "llama-completion"), *completion_args(model)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert x86.returncode == 0, x86.stderr[-2000:]
    arm = qemu(vl_bytes, Path(result.bin_dir) / "llama-completion", *completion_args(model))
    assert arm.returncode == 0, arm.stderr[-2000:]
    info = next(line for line in arm.stderr.splitlines() if "system_info" in line)
    plan, _ = cross_build
    expected = ("SVE = 1", "MATMUL_INT8 = 1", f"SVE_CNT = {vl_bytes}") + (("KLEIDIAI = 1",) if plan.kleidiai else ())
    for feature in expected:
        assert feature in info, info
    a, b = x86.stdout.split(), arm.stdout.split()
    same = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
    print(f"{quant} SVE {vl_bytes * 8}: {'identical' if a == b else f'first {same} words equal'}")
    assert b and same >= 1


def perplexity_text(tmp_path: Path) -> Path:
    text = (REPO / "data" / "fixtures" / "README.md").read_text()  # what the KL numbers above were measured on
    path = tmp_path / "eval.txt"
    path.write_text(text * 2)
    return path


PPL_ARGS = ["-c", "128", "--chunks", "4", "-t", "2", "-b", "128"]
KL_ATTEMPTS = 8  # kl_stats' retries of a run that ended without its statistics


def x86_logits(native_build, model: Path, tmp_path: Path) -> Path:
    """The x86 build's logits on the eval text (llama-perplexity --kl-divergence-base)."""
    base = tmp_path / f"x86-{model.stem}.kld"
    proc = subprocess.run(
        [
            str(Path(native_build["bin_dir"]) / "llama-perplexity"),
            "-m",
            str(model),
            *PPL_ARGS,
            "-f",
            str(perplexity_text(tmp_path)),
            "--kl-divergence-base",
            str(base),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return base


def kl_stats(run) -> tuple[float, float]:
    """(mean KLD, same-top-token %) of a llama-perplexity --kl-divergence run; `run()` returns its process.

    Retried: this llama-perplexity now and then stops after a chunk with exit 0 and no statistics (seen on x86
    too, same files, about one run in three here; a fresh-clone CI run once saw three in a row, stopping after
    chunk 3 of 4), which is the tool's flakiness, not a numeric result.
    """
    for _ in range(KL_ATTEMPTS):
        proc = run()
        out = proc.stdout + proc.stderr
        mean, same = re.search(r"Mean\s+KLD:\s+(-?[\d.e+-]+)", out), re.search(r"Same top p:\s+([\d.]+)", out)
        assert proc.returncode == 0, out[-3000:]
        if mean and same:
            return float(mean.group(1)), float(same.group(1))
    raise AssertionError(f"no KL statistics in {KL_ATTEMPTS} runs: {out[-3000:]}")


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("vl_bytes", [16, 32])
def test_qemu_armv9_logits_match_x86_within_kl_bound(
    cross_build, native_build, fixture_models, quant, vl_bytes, tmp_path
):
    _, result = cross_build
    model = fixture_models[quant]
    base = x86_logits(native_build, model, tmp_path)
    mean_kld, same_top = kl_stats(
        lambda: qemu(
            vl_bytes,
            Path(result.bin_dir) / "llama-perplexity",
            "-m",
            str(model),
            *PPL_ARGS,
            "--kl-divergence-base",
            str(base),
            "--kl-divergence",
        )
    )
    print(f"{quant}: mean KLD(x86 || aarch64, {vl_bytes * 8}-bit SVE) = {mean_kld:.3g}, same top token {same_top}%")
    assert mean_kld < KL_BOUND[quant] and same_top >= SAME_TOP_MIN


def test_kl_scale_of_quantization_itself(native_build, fixture_models, tiny_gguf, tmp_path):
    """For scale: what Q8_0 and Q4_0 cost against f32 on the x86 build, on the same text."""
    base = x86_logits(native_build, tiny_gguf("thinking", "f32"), tmp_path)
    kld = {}
    for quant, model in fixture_models.items():
        cmd = [
            str(Path(native_build["bin_dir"]) / "llama-perplexity"),
            "-m",
            str(model),
            *PPL_ARGS,
            "--kl-divergence-base",
            str(base),
            "--kl-divergence",
        ]
        kld[quant], _ = kl_stats(lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=600))
        print(f"x86 f32 -> {quant}: mean KLD {kld[quant]:.3g}")
    assert 0 < kld["Q8_0"] < kld["Q4_0"]


def test_qemu_sme_with_kleidiai(cross_build, native_build, fixture_models, tmp_path):
    """qemu's SME with KleidiAI's SME kernels: measured, not trusted (see QEMU_CPU). With GGML_KLEIDIAI_SME=0 the
    same emulated CPU must agree with x86 again, which pins the garbage on the SME kernels' path."""
    plan, result = cross_build
    needs_kleidiai(plan)
    model = fixture_models["Q8_0"]
    base = x86_logits(native_build, model, tmp_path)
    exe = str(Path(result.bin_dir) / "llama-perplexity")
    args = [exe, "-m", str(model), *PPL_ARGS, "--kl-divergence-base", str(base), "--kl-divergence"]
    stats = {}
    for label, extra_env in (("SME kernels", {}), ("GGML_KLEIDIAI_SME=0", {"GGML_KLEIDIAI_SME": "0"})):
        env = {**os.environ, "QEMU_LD_PREFIX": SYSROOT, **extra_env}
        stats[label] = kl_stats(
            lambda: subprocess.run(
                ["qemu-aarch64", "-cpu", "max,sve-default-vector-length=32", *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=1800,
            )
        )
        print(f"qemu -cpu max (SME on), {label}: mean KLD {stats[label][0]:.3g}, same top {stats[label][1]}%")
    assert stats["GGML_KLEIDIAI_SME=0"][0] < KL_BOUND["Q8_0"]


@pytest.mark.parametrize("vl_bytes", [16, 32, 64])
def test_quantize_fns_by_sve_length(cross_build, vl_bytes):
    """llama.cpp's own kernel test: passes at 128/256-bit SVE; at 512 bits the q4_K/q6_K SVE+i8mm path fails."""
    _, result = cross_build
    exe = Path(result.bin_dir) / "test-quantize-fns"
    proc = qemu(vl_bytes, exe)
    out = proc.stdout + proc.stderr
    failed = re.findall(r"^\s*(\w+) (.+?):\s+FAILED", proc.stdout, re.MULTILINE)
    if vl_bytes <= 32:
        assert proc.returncode == 0 and not failed, out[-3000:]
    else:
        # if this starts passing, ggml fixed its 512-bit SVE path: drop build.SVE512_WARNING and the README note
        assert proc.returncode != 0, "test-quantize-fns now passes at 512-bit SVE"
        assert sorted(failed) == [("q4_K", "dot product error (nrc=2)"), ("q6_K", "dot product error (nrc=2)")], out


def test_sve512_bsums_probe_shows_the_kernel_assumption(cross_tools, tmp_path):
    exe = tmp_path / "probe"
    subprocess.run(
        [
            "aarch64-linux-gnu-gcc",
            "-O2",
            "-march=armv9-a+sve2",
            str(REPO / "tests" / "data" / "sve512_q8k_bsums.c"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    assert "lanes 8-15 are row 1: yes" in qemu(32, exe).stdout
    assert "lanes 8-15 are row 1: no" in qemu(64, exe).stdout
