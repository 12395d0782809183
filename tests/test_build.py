"""Fast tests of `edgemoe build`: planning (flags, keys, toolchain, KleidiAI), cache, failures, run_tool.

Nothing here compiles: a fake llama.cpp tree stands in for the source and tiny shell commands for cmake.
The real builds (native, cross + qemu) are in test_build_slow.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgemoe_cli import build as B
from edgemoe_cli import llamacpp
from edgemoe_cli.cli import app
from edgemoe_cli.errors import EdgeMoEError
from edgemoe_cli.smoke import SMOKE_VERSION

REPO = Path(__file__).resolve().parents[1]
EDGEMOE = Path(sys.executable).with_name("edgemoe")
MACHINE_BUILDS = Path(os.environ["EDGEMOE_BUILDS"])  # conftest: the machine's real build cache


@pytest.fixture
def fake_tree(tmp_path: Path) -> Path:
    """The few files of a llama.cpp checkout that planning reads."""
    tree = tmp_path / "llama.cpp"
    (tree / "ggml" / "src" / "ggml-cpu").mkdir(parents=True)
    (tree / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    (tree / "ggml" / "src" / "ggml-cpu" / "CMakeLists.txt").write_text('set(KLEIDIAI_COMMIT_TAG "v1.24.0")\n')
    return tree


@pytest.fixture
def builds(tmp_path: Path, monkeypatch) -> Path:
    d = tmp_path / "builds"
    monkeypatch.setenv("EDGEMOE_BUILDS", str(d))
    return d


@pytest.fixture
def cross_gcc(monkeypatch):
    """Pretend Debian's aarch64 cross compilers (GCC `version`) are installed."""

    def use(version: int = 12):
        real_which = shutil.which
        monkeypatch.setattr(
            B.shutil, "which", lambda n: f"/usr/bin/{n}" if n.startswith(B.CROSS_PREFIX) else real_which(n)
        )
        monkeypatch.setattr(B, "compiler_version", lambda cc: (f"{cc} (Debian {version}.2.0) {version}.2.0", version))
        monkeypatch.setattr(B.platform, "machine", lambda: "x86_64")

    return use


def test_cross_plan_flags_and_toolchain(fake_tree, builds, cross_gcc):
    cross_gcc(12)
    plan = B.plan_build(source=str(fake_tree), target="aarch64", arch="armv9-a+sve2+i8mm+dotprod", jobs=2)
    cfg = plan.configure
    for flag in (
        "-DGGML_NATIVE=OFF",
        "-DGGML_CPU_ARM_ARCH=armv9-a+sve2+i8mm+dotprod",
        "-DGGML_CPU_KLEIDIAI=ON",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DBUILD_SHARED_LIBS=ON",
        "-G",
    ):
        assert flag in cfg
    assert f"-DCMAKE_TOOLCHAIN_FILE={plan.toolchain_file}" in cfg
    assert "set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)" in plan.toolchain_text
    assert "set(CMAKE_SYSTEM_PROCESSOR aarch64)" in plan.toolchain_text
    assert plan.key.startswith("aarch64-") and plan.out_dir == str(builds / plan.key)
    assert plan.build[:3] == ["nice", "-n", "10"] or plan.build[0] == "cmake"
    assert plan.build[plan.build.index("-j") + 1] == "2"
    for tool in ("llama-quantize", "llama-imatrix", "llama-bench", "llama-server", "llama-gguf-split"):
        assert tool in plan.build


def test_gcc12_kleidiai_fix_is_scoped_to_one_file(fake_tree, builds, cross_gcc):
    cross_gcc(12)
    plan = B.plan_build(source=str(fake_tree), target="aarch64", arch="armv9-a+sve2")
    assert f"-DCMAKE_PROJECT_KleidiAI_INCLUDE={plan.kleidiai_fix_file}" in plan.configure
    text = plan.kleidiai_fix_text
    # appended to the file's own options (KleidiAI sets -march there), not replacing them, and not global
    assert 'APPEND PROPERTY COMPILE_OPTIONS "-fno-tree-loop-vectorize"' in text
    assert "kai_lhs_quant_pack_qai8dxp_bf16_neon.c" in text and "CMAKE_C_FLAGS" not in " ".join(plan.configure)
    assert any("GCC 12" in n for n in plan.notes)

    cross_gcc(13)
    plan13 = B.plan_build(source=str(fake_tree), target="aarch64", arch="armv9-a+sve2")
    assert plan13.kleidiai_fix_file is None and plan13.key != plan.key


def test_key_changes_with_inputs_and_only_with_them(fake_tree, builds, cross_gcc):
    cross_gcc(12)
    a = B.plan_build(source=str(fake_tree), target="aarch64", arch="armv9-a+sve2+i8mm")
    assert B.plan_build(source=str(fake_tree), target="aarch64", arch="armv9-a+sve2+i8mm", jobs=7).key == a.key
    assert B.plan_build(source=str(fake_tree), target="aarch64", arch="armv9-a+sve2").key != a.key
    assert B.plan_build(source=str(fake_tree), target="aarch64", arch="armv9-a+sve2+i8mm", kleidiai=False).key != a.key
    (fake_tree / "ggml" / "src" / "ggml.c").write_text("/* changed source */\n")
    assert B.plan_build(source=str(fake_tree), target="aarch64", arch="armv9-a+sve2+i8mm").key != a.key


def test_dry_run_prints_cmake_lines(fake_tree, builds, cross_gcc):
    cross_gcc(12)
    res = CliRunner().invoke(app, ["build", "--source", str(fake_tree), "--target", "aarch64", "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert any(line.startswith("cmake -S ") and f"-DGGML_CPU_ARM_ARCH={B.CROSS_DEFAULT_ARCH}" in line for line in lines)
    assert any(line.startswith("nice -n 10 cmake --build ") for line in lines)
    assert "set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)" in res.stdout
    assert not (builds / "work").exists()  # a dry run writes nothing

    res = CliRunner().invoke(app, ["build", "--source", str(fake_tree), "--target", "aarch64", "--dry-run", "--json"])
    doc = json.loads(res.stdout)
    assert doc["target"] == "aarch64" and doc["kleidiai"] is True and doc["configure"][0] == "cmake"


def test_bad_inputs_are_one_line_errors(fake_tree, builds, tmp_path):
    def fails(*args: str) -> str:
        proc = subprocess.run(
            [str(EDGEMOE), "build", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "EDGEMOE_BUILDS": str(builds)},
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2
        return proc.stderr

    assert "not a llama.cpp source tree" in fails("--source", str(tmp_path), "--dry-run")
    assert "--target" in fails("--source", str(fake_tree), "--target", "riscv", "--dry-run")
    err = fails("--source", str(fake_tree), "--target", "native", "--arch", "not an arch", "--dry-run")
    assert "--arch" in err


def test_arch_must_look_like_march(fake_tree, builds, cross_gcc):
    cross_gcc(12)
    with pytest.raises(EdgeMoEError, match="--arch"):
        B.plan_build(source=str(fake_tree), target="aarch64", arch="-O3; rm -rf /")


def test_kleidiai_src_is_validated_and_passed_to_fetchcontent(fake_tree, builds, cross_gcc, tmp_path):
    cross_gcc(13)
    bad = tmp_path / "empty"
    bad.mkdir()
    with pytest.raises(EdgeMoEError, match="not a KleidiAI source tree"):
        B.plan_build(source=str(fake_tree), target="aarch64", kleidiai_src=str(bad))
    good = tmp_path / "kleidiai"
    (good / "kai").mkdir(parents=True)
    (good / "CMakeLists.txt").write_text("project(KleidiAI)\n")
    plan = B.plan_build(source=str(fake_tree), target="aarch64", kleidiai_src=str(good))
    assert f"-DFETCHCONTENT_SOURCE_DIR_KLEIDIAI={good}" in plan.configure
    # where the source comes from does not change the binaries, so not the key either
    assert plan.key == B.plan_build(source=str(fake_tree), target="aarch64").key


def test_offline_without_kleidiai_src_fails_before_cmake(fake_tree, builds, cross_gcc, monkeypatch):
    cross_gcc(13)
    plan = B.plan_build(source=str(fake_tree), target="aarch64")

    def unreachable(*a, **k):
        raise OSError(101, "Network is unreachable")

    def no_cmake(*a, **k):
        raise AssertionError("cmake must not run when KleidiAI cannot be fetched")

    monkeypatch.setattr(B.socket, "create_connection", unreachable)
    monkeypatch.setattr(B, "_run_logged", no_cmake)
    with pytest.raises(EdgeMoEError) as e:
        B.run_build(plan)
    assert "unreachable" in e.value.message and "--kleidiai-src" in e.value.hint
    assert "kleidiai-v1.24.0-src.tar.gz" in e.value.hint


def test_failed_build_names_the_error_and_the_log(fake_tree, builds, cross_gcc):
    cross_gcc(13)
    plan = B.plan_build(source=str(fake_tree), target="aarch64", kleidiai=False)
    plan.configure = ["sh", "-c", "echo '-- Configuring done'"]
    plan.build = [
        "sh",
        "-c",
        "echo '[1/2] Building C object a.o'; "
        "echo 'x.c:3:1: internal compiler error: in vect_transform_reduction'; echo 'ninja: build stopped'; exit 1",
    ]
    with pytest.raises(EdgeMoEError) as e:
        B.run_build(plan)
    assert "internal compiler error: in vect_transform_reduction" in e.value.message
    log = Path(plan.work_dir) / "build.log"
    assert str(log) in e.value.hint and "ninja: build stopped" in log.read_text()
    assert not Path(plan.out_dir).exists()  # nothing under the final name


def test_progress_steps_are_reported(fake_tree, builds, cross_gcc, tmp_path):
    cross_gcc(13)
    plan = B.plan_build(source=str(fake_tree), target="aarch64", kleidiai=False)
    plan.configure = ["true"]
    plan.build = [
        "sh",
        "-c",
        "echo '[1/3] Building C object a.o'; echo warning; echo '[3/3] Linking llama-cli'; exit 3",
    ]
    seen = []
    with pytest.raises(EdgeMoEError):
        B.run_build(plan, progress=lambda d, t, what: seen.append((d, t, what)))
    assert seen == [(0, 0, "configuring"), (1, 3, "Building C object a.o"), (3, 3, "Linking llama-cli")]


def _fake_installed_build(plan: B.BuildPlan) -> Path:
    out = Path(plan.out_dir)
    (out / "bin").mkdir(parents=True)
    (out / "lib").mkdir()
    (out / "lib" / "libllama.so").write_bytes(b"")
    (out / "build.json").write_text(
        json.dumps(
            {
                "key": plan.key,
                "target": plan.target,
                "arch": plan.arch,
                "kleidiai": plan.kleidiai,
                "source_id": plan.source_id,
                "tools": ["llama-quantize"],
                "seconds": 1.0,
                "notes": [],
                # proven earlier (a recorded smoke test is not run again); test_smoke.py runs real ones
                "smoke": {"passed": True, "version": SMOKE_VERSION, "cases": []},
            }
        )
    )
    return out


def test_cache_hit_is_instant_and_current_needs_a_loadable_binding(fake_tree, builds, monkeypatch):
    plan = B.plan_build(source=str(fake_tree), target="native", kleidiai=None)
    out = _fake_installed_build(plan)
    monkeypatch.setattr(B, "_run_logged", lambda *a, **k: pytest.fail("a cache hit must not compile"))

    monkeypatch.setattr(B, "check_binding", lambda lib: (_ for _ in ()).throw(EdgeMoEError("cannot load")))
    res = B.run_build(plan)
    assert res.cached and not res.current and not (builds / "native-current").exists()
    assert any("not made current" in n for n in res.notes)

    monkeypatch.setattr(
        B,
        "check_binding",
        lambda lib: {
            "version": llamacpp.LLAMA_CPP_PYTHON_VERSION,
            "library": f"{lib}/libllama.so",
            "system_info": "CPU : X = 1",
        },
    )
    res = B.run_build(plan)
    assert res.cached and res.current and res.system_info == "CPU : X = 1"
    assert (builds / "native-current").resolve() == out.resolve()
    assert llamacpp.native_build_dir() == out.resolve()
    # Earlier tests in the session may have pointed the binding elsewhere; this one is about the fake build.
    monkeypatch.delenv("LLAMA_CPP_LIB_PATH", raising=False)
    info = llamacpp.build_info()
    assert info.key == plan.key and info.system_info == "CPU : X = 1"


def test_sve_warning_only_for_wide_sve_native_builds(fake_tree, builds, cross_gcc):
    cross_gcc(13)
    cross = B.plan_build(source=str(fake_tree), target="aarch64", arch="armv9-a+sve2+i8mm+dotprod")
    assert B.sve_warning(cross, vector_bits=512) is None  # qemu's vector length is a run-time choice
    native = B.BuildPlan(**{**cross.__dict__, "target": "native"})
    warning = B.sve_warning(native, vector_bits=512)
    assert "512 bits" in warning and "--arch armv9-a+sve2+dotprod" in warning
    assert B.sve_warning(native, vector_bits=256) is None
    for arch in ("armv8.2-a+dotprod+i8mm", "armv8.2-a+sve+dotprod"):  # the broken path needs SVE and i8mm
        assert (
            B.sve_warning(B.BuildPlan(**{**cross.__dict__, "target": "native", "arch": arch}), vector_bits=512) is None
        )


def test_last_error_prefers_compiler_errors():
    log = "[5/9] Building x.o\nx.c:1:1: warning: foo\nx.c:9:2: error: expected ';'\nninja: build "
    "stopped: subcommand failed.\n"
    assert llamacpp.last_error(log) == "x.c:9:2: error: expected ';'"
    assert llamacpp.last_error("CMake Error at a.cmake:3 (message):\n  KleidiAI target was not created\n").endswith(
        "KleidiAI target was not created"
    )


@pytest.fixture
def fake_tool(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("EDGEMOE_LLAMA_BIN", str(bindir))

    def make(name: str, script: str) -> Path:
        path = bindir / name
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
        return path

    return make


def test_run_tool_returns_output_and_logs(fake_tool, tmp_path):
    fake_tool("llama-fake", "echo out $1; echo progress >&2\n")
    lines = []
    log = tmp_path / "fake.log"
    proc = llamacpp.run_tool("llama-fake", ["a"], log=log, on_line=lines.append)
    assert proc.returncode == 0 and proc.stdout == "out a\n" and proc.stderr == "progress\n"
    assert sorted(lines) == ["out a", "progress"] and "llama-fake a" in log.read_text()


def test_run_tool_failure_is_one_line_naming_tool_and_log(fake_tool):
    fake_tool(
        "llama-fake", "echo 'llama_model_load: error loading model: bad magic' >&2; echo 'main: failed' >&2; exit 1\n"
    )
    with pytest.raises(EdgeMoEError) as e:
        llamacpp.run_tool("llama-fake", [])
    assert e.value.message.startswith("llama-fake failed (exit 1): ")
    assert "error loading model: bad magic" in e.value.message and "\n" not in e.value.message
    log = Path(e.value.hint.split("full output: ")[1])
    assert log.is_file() and "bad magic" in log.read_text()


def test_missing_tool_says_to_build(monkeypatch, builds, tmp_path):
    monkeypatch.setenv("EDGEMOE_LLAMA_BIN", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EdgeMoEError, match="llama-nonexistent not found"):
        llamacpp.run_tool("llama-nonexistent", [])


BOARD_SCRIPTS = ("board-setup.sh", "run-ernie.sh", "bench-board.sh")


@pytest.mark.parametrize("script", BOARD_SCRIPTS)
def test_board_script_help_and_strict_mode(script):
    path = REPO / "scripts" / script
    assert "set -eu" in path.read_text() and os.access(path, os.X_OK)
    proc = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: scripts/" + script)
    bad = subprocess.run(["bash", str(path), "--no-such-option"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def test_board_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    scripts = [f"scripts/{s}" for s in (*BOARD_SCRIPTS, "lib.sh")]
    proc = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout


def test_arm64_workflow_runs_install_doctor_build_tests_and_bench():
    yaml = pytest.importorskip("yaml")
    wf = yaml.safe_load((REPO / ".github" / "workflows" / "arm64.yml").read_text())
    job = wf["jobs"]["arm64"]
    assert job["runs-on"] == "ubuntu-24.04-arm" and job["timeout-minutes"] <= 90
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    for needle in ("scripts/board-setup.sh", "edgemoe doctor", "edgemoe build", "make test", "scripts/bench-board.sh"):
        assert needle in runs
    assert any(step.get("uses", "").startswith("actions/upload-artifact") for step in job["steps"])


def test_detected_arch_drops_i8mm_on_wide_sve_only():
    assert B.avoid_wide_sve_i8mm("armv9-a+sve2+i8mm+bf16+dotprod", 256) == ("armv9-a+sve2+i8mm+bf16+dotprod", None)
    arch, note = B.avoid_wide_sve_i8mm("armv9-a+sve2+i8mm+bf16+dotprod", 512)
    assert arch == "armv9-a+sve2+bf16+dotprod" and "512 bits" in note
    assert B.avoid_wide_sve_i8mm("armv8.2-a+sve+dotprod", 512) == ("armv8.2-a+sve+dotprod", None)  # A64FX: no i8mm


def test_build_info_asks_the_loaded_library_when_the_binding_is_elsewhere(fake_tree, builds, monkeypatch):
    """With LLAMA_CPP_LIB_PATH naming another library, build_info reports that library's own system_info."""
    plan = B.plan_build(source=str(fake_tree), target="native", kleidiai=None)
    _fake_installed_build(plan)
    monkeypatch.setattr(
        B,
        "check_binding",
        lambda lib: {
            "version": llamacpp.LLAMA_CPP_PYTHON_VERSION,
            "library": f"{lib}/libllama.so",
            "system_info": "CPU : X = 1",
        },
    )
    B.run_build(plan)
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", "/elsewhere/lib")
    monkeypatch.setattr(
        llamacpp,
        "binding_info",
        lambda: llamacpp.BindingInfo(
            library="/elsewhere/lib/libllama.so",
            source="LLAMA_CPP_LIB_PATH",
            llama_cpp_python="0",
            system_info="CPU : Y = 1",
        ),
    )
    info = llamacpp.build_info()
    assert info.binding_library == "/elsewhere/lib" and info.system_info == "CPU : Y = 1"


def test_vendored_source_is_pinned_and_extracted_once_under_concurrency(builds):
    """Two first-time builds at once: one extracts (privately, then renames), the other waits and finds it; a
    sdist whose bytes differ from the pin is refused and deleted."""
    sdist = MACHINE_BUILDS / "src" / f"llama_cpp_python-{llamacpp.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.is_file():
        pytest.skip("no cached llama-cpp-python sdist (make setup downloads it)")
    src = builds / "src"
    src.mkdir(parents=True)
    shutil.copy2(sdist, src / sdist.name)
    code = "from edgemoe_cli.build import vendored_source; print(vendored_source()[0])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-800:] for o in outs]
    assert outs[0][0] == outs[1][0]
    import tarfile

    with tarfile.open(src / sdist.name) as tf:
        n_files = sum(1 for m in tf.getmembers() if m.isfile())
    tree = src / sdist.name.removesuffix(".tar.gz")
    assert sum(1 for p in tree.rglob("*") if p.is_file()) == n_files + 1  # + the stamp
    assert not [p for p in src.iterdir() if "extracting" in p.name]

    (src / sdist.name).write_bytes(b"not the pinned sdist")
    with pytest.raises(EdgeMoEError, match="edgemoe pins"):
        B.vendored_source()
    assert not (src / sdist.name).exists()
