"""`--board NAME` for plan and build: the board profiles (configs/boards/*.toml) decide RAM, target and flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgemoe_cli import board, plan
from edgemoe_cli.ernie21b import GIB
from edgemoe_cli.errors import EdgeMoEError


@pytest.mark.parametrize("name", board.list_boards())
def test_build_options_take_the_profiles_flags(name):
    profile = board.load_board(name)
    if profile.arch != "aarch64":
        with pytest.raises(EdgeMoEError, match="not an Arm board"):
            board.build_options(name, None)
        return
    target, arch, notes = board.build_options(name, None, host_machine="x86_64")
    assert target == "aarch64" and arch == profile.ggml_cpu_arm_arch and not notes
    assert board.build_options(name, None, host_machine="aarch64")[0] == "native"


def test_build_options_drop_i8mm_for_a_wide_sve_board(tmp_path):
    wide = tmp_path / "a64-512.toml"
    wide.write_text(
        'name = "wide"\narch = "aarch64"\nram_gib = 64\ncpus = 48\nsve_vector_bits = 512\n'
        'features = ["asimd", "asimddp", "i8mm", "sve"]\n'
        'ggml_cpu_arm_arch = "armv8.4-a+sve+i8mm+dotprod"\n'
    )
    _, arch, notes = board.build_options(str(wide), None, host_machine="x86_64")
    assert arch == "armv8.4-a+sve+dotprod" and "512 bits" in notes[0]
    with pytest.raises(EdgeMoEError, match="not both"):
        board.build_options(str(wide), "armv8-a")


def test_build_board_dry_run_cross_compiles_with_the_boards_flags():
    p = subprocess.run(
        [sys.executable, "-m", "edgemoe_cli.cli", "build", "--board", "radxa-orion-o6", "--dry-run", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    if p.returncode != 0 and "cross compiler" in p.stderr:
        pytest.skip("no aarch64 cross compiler here")
    assert p.returncode == 0, p.stderr
    dry = json.loads(p.stdout)
    expected = "native" if os.uname().machine in ("aarch64", "arm64") else "aarch64"
    assert dry["target"] == expected and dry["arch"] == board.load_board("radxa-orion-o6").ggml_cpu_arm_arch


def test_plan_budget_from_a_board_profile(tiny_gguf):
    ram, size, reserve, source = plan.budget_options(None, "raspberry-pi-5", None, "512MiB")
    assert ram == board.load_board("raspberry-pi-5").ram_bytes and size is None and reserve == 512 * 2**20
    budget, formula = plan.file_budget(tiny_gguf("pt", "f16"), ram, 4096, None, reserve, source)
    assert formula.startswith("board raspberry-pi-5's RAM") and 0 < budget < ram
    assert plan.budget_options(None, "this", None, None)[0] is None  # this machine: read when planning
    assert plan.budget_options("12GiB", None, None, None)[:3] == (12 * GIB, None, None)
    with pytest.raises(EdgeMoEError, match="exactly one"):
        plan.budget_options("12GiB", "raspberry-pi-5", None, None)
    with pytest.raises(EdgeMoEError, match="unknown board"):
        plan.budget_options(None, "no-such-board", None, None)
