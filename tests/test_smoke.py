"""The build smoke test (smoke.py) and what `edgemoe build` does with its verdict (build.run_build).

A broken build is made for real: a copy of the active native build whose libggml-cpu has one quantized dot
product patched (to a trapping instruction: a crash, as the AMX kernels crash on AMX hosts; or to an immediate
return: a wrong result). F16 still runs on it, so only the quantized types may fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe_cli import build as B
from edgemoe_cli import smoke
from edgemoe_cli.errors import EdgeMoEError
from edgemoe_cli.llamacpp import native_build_dir

UD2 = b"\x0f\x0b"  # x86 "undefined instruction": SIGILL where it runs
RET = b"\xc3"  # return at once: the dot product's output is never written


@pytest.fixture(scope="module")
def active_build() -> Path:
    build = native_build_dir()
    if build is None:
        pytest.skip("no native llama.cpp build (make setup builds one)")
    return build


@pytest.fixture(scope="module")
def native_plan(active_build):
    return B.plan_build()  # the real plan of this machine's build, resolved with the real builds dir


def _file_offset(elf: bytes, vaddr: int) -> int:
    """Where virtual address `vaddr` of an ELF64 shared library is in the file (through its PT_LOAD segments)."""
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type == 1 and p_vaddr <= vaddr < p_vaddr + p_filesz:
            return vaddr - p_vaddr + p_offset
    raise AssertionError(f"{vaddr:#x} is in no loaded segment")


def broken_copy(active_build: Path, dest: Path, symbol: str, code: bytes) -> Path:
    """A copy of the active build whose `symbol` in libggml-cpu starts with `code`; its smoke record removed."""
    if platform_machine() != "x86_64" or shutil.which("nm") is None:
        pytest.skip("patches x86_64 machine code and needs nm")
    shutil.copytree(active_build, dest, symlinks=True)
    lib = (dest / "lib" / "libggml-cpu.so").resolve()
    nm = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    vaddr = next(int(line.split()[0], 16) for line in nm.splitlines() if line.split()[-1] == symbol)
    data = bytearray(lib.read_bytes())
    at = _file_offset(bytes(data), vaddr)
    data[at : at + len(code)] = code
    lib.write_bytes(bytes(data))
    manifest = json.loads((dest / "build.json").read_text())
    manifest.pop("smoke", None)
    manifest["key"] = dest.name
    (dest / "build.json").write_text(json.dumps(manifest))
    return dest


def platform_machine() -> str:
    import platform

    return platform.machine().lower()


@pytest.mark.slow  # runs the smoke test: ~20 s each on 2 cores
def test_active_build_passes_every_type_through_tools_and_binding(active_build):
    result = smoke.run_smoke(active_build / "bin", active_build / "lib")
    assert result.passed, result.summary()
    seen = {(c.ftype, c.path) for c in result.cases}
    assert seen == {(t, p) for t in smoke.SMOKE_FTYPES for p in ("tools", "binding")}
    for case in result.cases:
        if case.path == "binding" and case.ftype != "F16":
            assert case.mean_kl <= smoke.MAX_MEAN_KL and case.top1 >= smoke.MIN_TOP1, case
            print(f"{case.ftype}: {case.detail}")
    assert "CPU" in result.system_info


@pytest.mark.slow  # runs the smoke test: ~20 s each on 2 cores
def test_a_crashing_kernel_fails_the_smoke_test_on_its_type_only(active_build, tmp_path):
    broken = broken_copy(active_build, tmp_path / "native-broken", "ggml_vec_dot_q8_0_q8_0", UD2)
    result = smoke.run_smoke(broken / "bin", broken / "lib")
    assert not result.passed
    failing = {(c.ftype, c.path) for c in result.failing}
    assert ("Q8_0", "binding") in failing and ("Q8_0", "tools") in failing, result.summary()
    assert {t for t, _ in failing} == {"Q8_0"}, result.summary()
    crash = next(c for c in result.failing if c.path == "binding")
    assert crash.crashed and "SIGILL" in crash.detail


@pytest.mark.slow  # runs the smoke test: ~20 s each on 2 cores
def test_a_wrong_result_fails_the_smoke_test(active_build, tmp_path):
    broken = broken_copy(active_build, tmp_path / "native-wrong", "ggml_vec_dot_q8_0_q8_0", RET)
    result = smoke.run_smoke(broken / "bin", broken / "lib")
    q8 = [c for c in result.cases if c.ftype == "Q8_0"]
    assert not result.passed and q8 and not any(c.ok for c in q8), result.summary()
    assert not any(c.crashed for c in q8)
    assert "wrong result" in result.summary()


@pytest.fixture
def isolated_builds(tmp_path, monkeypatch, native_plan):
    """A builds dir of this test's own, holding a good copy of the active build as native-current."""
    builds = tmp_path / "builds"
    builds.mkdir()
    monkeypatch.setenv("EDGEMOE_BUILDS", str(builds))
    tree = Path(native_plan.source_dir)
    monkeypatch.setattr(B, "vendored_source", lambda version=None: (tree, native_plan.source_id))
    return builds


@pytest.mark.slow  # runs the smoke test: ~20 s each on 2 cores
def test_a_broken_build_is_not_activated_and_the_error_names_the_type(
    active_build, native_plan, isolated_builds, monkeypatch
):
    good = isolated_builds / "native-good"
    shutil.copytree(active_build, good, symlinks=True)
    (isolated_builds / "native-current").symlink_to("native-good")
    broken = broken_copy(active_build, isolated_builds / "native-broken", "ggml_vec_dot_q8_0_q8_0", UD2)
    plan = dataclasses.replace(native_plan, key=broken.name, out_dir=str(broken))
    monkeypatch.setattr(B, "host_cpu_flags", lambda: set())  # no known-bad feature to blame: a plain failure
    with pytest.raises(EdgeMoEError) as err:
        B.run_build(plan)
    assert "failed its smoke test" in err.value.message and "Q8_0" in err.value.message
    assert "SIGILL" in err.value.message and "smoke.log" in err.value.hint
    assert os.readlink(isolated_builds / "native-current") == "native-good"
    recorded = json.loads((broken / "build.json").read_text())["smoke"]
    assert recorded["passed"] is False and recorded["version"] == smoke.SMOKE_VERSION
    # the verdict is kept: asking again does not re-run the test, and fails the same way
    (broken / "smoke.log").unlink()
    with pytest.raises(EdgeMoEError, match="Q8_0"):
        B.run_build(plan)
    assert not (broken / "smoke.log").exists()


@pytest.mark.slow  # runs the smoke test: ~20 s each on 2 cores
def test_known_bad_feature_on_the_host_rebuilds_without_it(active_build, native_plan, isolated_builds, monkeypatch):
    """An AMX host (simulated: /proc/cpuinfo flags) whose -march=native build fails: the build without AMX is
    planned from the same request plus AMX-off flags, made (here: found ready in the cache under its key), proven
    and activated, and the note says why."""
    broken = broken_copy(active_build, isolated_builds / "native-broken", "ggml_vec_dot_q8_0_q8_0", UD2)
    plan = dataclasses.replace(native_plan, key=broken.name, out_dir=str(broken))
    amx = next(f for f in B.KNOWN_BAD_FEATURES if f.name == "AMX")
    retry_plan = B.plan_build(**dict(native_plan.request, extra_cmake=amx.cmake))
    assert set(amx.cmake) <= set(retry_plan.configure) and retry_plan.key != native_plan.key
    shutil.copytree(active_build, retry_plan.out_dir, symlinks=True)
    manifest = json.loads((Path(retry_plan.out_dir) / "build.json").read_text())
    manifest.pop("smoke", None)
    manifest["key"] = retry_plan.key
    (Path(retry_plan.out_dir) / "build.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(B, "host_cpu_flags", lambda: {"avx512f", "amx_tile", "amx_int8", "amx_bf16"})

    result = B.run_build(plan)
    assert result.key == retry_plan.key and result.current and result.smoke["passed"]
    assert os.readlink(isolated_builds / "native-current") == retry_plan.key
    assert result.notes[0].startswith(f"build {broken.name} failed its smoke test") and "without AMX" in result.notes[0]


def test_feature_to_drop_only_blames_what_native_builds_take_from_the_host(native_plan):
    failed = {"passed": False}
    amx_host = {"amx_tile", "amx_int8"}
    assert B.feature_to_drop(native_plan, failed, amx_host).name == "AMX"
    assert B.feature_to_drop(native_plan, {"passed": True}, amx_host) is None
    assert B.feature_to_drop(native_plan, failed, {"avx512f"}) is None
    without = dataclasses.replace(native_plan, configure=[*native_plan.configure, *B.KNOWN_BAD_FEATURES[0].cmake])
    assert B.feature_to_drop(without, failed, amx_host) is None  # already left out: the failure is something else
    arm = dataclasses.replace(native_plan, arch="armv9-a+sve2")
    assert B.feature_to_drop(arm, failed, amx_host) is None


def test_amx_off_flags_remove_what_ggml_tests_even_after_march(tmp_path):
    """The flags go before ggml's own -march=..., which on an AMX host expands to explicit -mamx-*: the macros
    ggml's AMX code is compiled under must be gone all the same."""
    if platform_machine() != "x86_64" or shutil.which("gcc") is None:
        pytest.skip("x86 gcc")
    flags = B.KNOWN_BAD_FEATURES[0].cmake[0].split("=", 1)[1].split()
    proc = subprocess.run(
        ["gcc", *flags, "-march=sapphirerapids", "-mamx-tile", "-mamx-int8", "-dM", "-E", "-"],
        input="",
        capture_output=True,
        text=True,
        check=True,
    )
    assert "__AMX_INT8__" not in proc.stdout and "__AMX_TILE__" not in proc.stdout
    assert "__AVX512F__" in proc.stdout


def test_doctor_and_build_json_report_the_active_builds_smoke_test(active_build):
    edgemoe = Path(sys.executable).with_name("edgemoe")
    built = json.loads(
        subprocess.run([str(edgemoe), "build", "--json"], capture_output=True, text=True, check=True).stdout
    )
    assert built["smoke"]["passed"] is True and built["current"]
    doctor = json.loads(
        subprocess.run([str(edgemoe), "doctor", "--json"], capture_output=True, text=True, check=True).stdout
    )
    assert doctor["build_smoke"]["summary"] == built["smoke"]["summary"]
    assert doctor["build_smoke"]["summary"].startswith("passed: F16, Q8_0, Q4_0, Q4_K_M, Q6_K, IQ4_NL")


def test_bare_import_llama_cpp_in_the_venv_finds_the_active_build(active_build):
    """llama-cpp-python is installed without a library; the .pth hook `edgemoe build` writes points it at ours."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a virtual environment")
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    code = (
        "import os, llama_cpp; print(os.environ['LLAMA_CPP_LIB_PATH']); "
        "print([l.split()[-1] for l in open('/proc/self/maps') if 'libllama.so' in l][0])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    lib_dir, loaded = proc.stdout.split()
    assert Path(lib_dir).resolve() == (active_build / "lib").resolve()
    assert Path(loaded).resolve().parent == (active_build / "lib").resolve()
    # the user's own choice still wins
    proc = subprocess.run(
        [sys.executable, "-c", "import os, edgemoe_cli; print(os.environ['LLAMA_CPP_LIB_PATH'])"],
        capture_output=True,
        text=True,
        env={**env, "LLAMA_CPP_LIB_PATH": "/somewhere/else"},
    )
    assert proc.stdout.strip() == "/somewhere/else"
