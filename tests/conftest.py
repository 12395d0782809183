"""Shared test fixtures. The tiny trained ERNIE checkpoints live in ../shared/fixtures beside the repo on the
project's machines, and a byte-identical copy ships in data/fixtures, which a user's clone tests with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# llama.cpp builds are cached once per machine, in the user's real store, whatever store a test uses.
if "EDGEMOE_BUILDS" not in os.environ:
    from edgemoe_cli.store import builds_dir

    os.environ["EDGEMOE_BUILDS"] = str(builds_dir())

REPO = Path(__file__).resolve().parents[1]
SHARED_SOURCE = REPO.parent / "shared" / "fixtures"  # the project's originals (CI has them beside the clone)
SHIPPED_FIXTURES = REPO / "data" / "fixtures"  # the copies in the repo (tests/test_run.py checks they match)
SHARED_FIXTURES = Path(
    os.environ.get("EDGEMOE_SHARED_FIXTURES") or (SHARED_SOURCE if SHARED_SOURCE.is_dir() else SHIPPED_FIXTURES)
)
VARIANTS = ("pt", "thinking")


def fixture_dir(variant: str) -> Path:
    path = SHARED_FIXTURES / f"tiny-ernie-{variant}"
    if not path.is_dir():
        pytest.skip(f"fixture {path} not present (data/fixtures ships it; EDGEMOE_SHARED_FIXTURES points elsewhere)")
    return path


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path_factory, monkeypatch):
    """Every test gets its own EDGEMOE_HOME unless it already set one, so tests never touch ~/.cache/edgemoe.

    Builds of llama.cpp are the exception: they are cached per machine (see llamacpp.py), never per test.
    """
    if "EDGEMOE_TEST_KEEP_HOME" not in os.environ:
        monkeypatch.setenv("EDGEMOE_HOME", str(tmp_path_factory.mktemp("edgemoe-home")))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """Factory: tiny_gguf(variant, outtype="f32") -> Path of that fixture converted to GGUF, once per session."""
    from edgemoe_cli.convert import convert

    cache: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("tiny-gguf")

    def make(variant: str, outtype: str = "f32") -> Path:
        key = (variant, outtype)
        if key not in cache:
            out = root / f"tiny-ernie-{variant}-{outtype}.gguf"
            convert(fixture_dir(variant), out, outtype)
            cache[key] = out
        return cache[key]

    return make


def streaming_cap(path, share: float, ctx: int):
    """(--memory, the whole model's stream.MemoryPlan): a cap under which `path` streams its experts with a cache of
    about `share` of the model's expert bytes (run, compare and serve tests of --memory)."""
    from edgemoe_cli import stream

    whole = stream.plan_memory(path, 2**40, ctx)
    # slack for the interpreter growing between planning here and planning inside the run
    cap = stream.minimum_memory(path, ctx) + int(share * whole.expert_bytes) + 2 * 2**20
    return cap, whole
