"""convert against llama.cpp's own convert_hf_to_gguf.py: the same tensors, bytes and keys (slow: installs torch).

The reference converter needs torch + transformers + sentencepiece. They go into their own virtualenv in the user's
cache (~/.cache/edgemoe/refconvert-venv, made on first use and reused), never into the project's environment. The
converter's source comes from the pinned llama-cpp-python sdist (its vendor/llama.cpp), downloaded once into the
same cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import gguf
import pytest
from conftest import fixture_dir
from test_convert import copy_fixture, make_dense_checkpoint, shard_checkpoint

from edgemoe_cli.convert import convert
from edgemoe_cli.llamacpp import LLAMA_CPP_PYTHON_VERSION

pytestmark = pytest.mark.slow

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgemoe"
VENV = CACHE / "refconvert-venv"
# llama.cpp's requirements-convert_hf_to_gguf.txt, except torch: its torch==2.11.0 (from PyTorch's index) is replaced
# by the CPU wheel these machines carry locally; any other torch spec pulls gigabytes of CUDA.
REQUIREMENTS = [
    "torch==2.13.0",
    "transformers==4.57.6",
    "sentencepiece>=0.1.98,<0.3.0",
    "numpy~=2.2.6",
    "protobuf>=4.21.0,<5.0.0",
    "pyyaml>=5.1",
    "requests>=2.25",
    "tqdm>=4.27",
]
# Keys whose values may legitimately differ between the two converters, with the reason. None do today.
KNOWN_KEY_DIFFERENCES: dict[str, str] = {}


def _run(cmd: list[str], what: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot {what}: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")


@pytest.fixture(scope="session")
def reference_python() -> Path:
    python = VENV / "bin" / "python"
    ready = VENV / ".edgemoe-requirements"
    if not (python.exists() and ready.is_file() and ready.read_text() == "\n".join(REQUIREMENTS)):
        _run([sys.executable, "-m", "venv", "--clear", str(VENV)], "create the reference venv")
        _run([str(python), "-m", "pip", "install", "-q", *REQUIREMENTS], "install torch/transformers for the reference")
        ready.write_text("\n".join(REQUIREMENTS))
    return python


@pytest.fixture(scope="session")
def reference_script() -> Path:
    root = CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}-src"
    script = root / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        downloads = CACHE / "sdists"
        downloads.mkdir(parents=True, exist_ok=True)
        sdist = downloads / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
        if not sdist.is_file():
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                    "-d",
                    str(downloads),
                ],
                "download the sdist",
            )
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name[len(prefix) :] if m.name.startswith(prefix) else None
                if rel and rel.startswith(wanted) and (m.isfile() or m.isdir()):
                    m.name = "llama.cpp/" + rel
                    members.append(m)
            tar.extractall(root, members=members, filter="data")
    return script


def reference_convert(python: Path, script: Path, src: Path, out: Path, outtype: str) -> Path:
    res = subprocess.run(
        [str(python), str(script), str(src), "--outfile", str(out), "--outtype", outtype],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def assert_same_gguf(ours: Path, theirs: Path) -> None:
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ta = [(t.name, t.tensor_type, t.shape.tolist()) for t in a.tensors]
    tb = [(t.name, t.tensor_type, t.shape.tolist()) for t in b.tensors]
    assert ta == tb  # names, types, shapes, and the order
    for x, y in zip(a.tensors, b.tensors):
        assert x.data.tobytes() == y.data.tobytes(), x.name
    keys_a = [k for k in a.fields if k not in KNOWN_KEY_DIFFERENCES]
    keys_b = [k for k in b.fields if k not in KNOWN_KEY_DIFFERENCES]
    assert keys_a == keys_b
    for k in keys_a:
        fa, fb = a.fields[k], b.fields[k]
        assert (fa.types, fa.contents()) == (fb.types, fb.contents()), k
    if not KNOWN_KEY_DIFFERENCES:
        assert ours.read_bytes() == theirs.read_bytes()  # nothing else (alignment, padding) differs either


@pytest.mark.parametrize(
    "variant,outtype",
    [
        ("pt", "f32"),
        ("pt", "f16"),
        ("pt", "bf16"),
        ("pt", "q8_0"),
        ("thinking", "f32"),
        ("thinking", "q8_0"),
    ],
)
def test_moe_fixture_matches_llama_cpp(tmp_path, reference_python, reference_script, variant, outtype):
    src = fixture_dir(variant)
    theirs = reference_convert(reference_python, reference_script, src, tmp_path / "theirs.gguf", outtype)
    ours = Path(convert(src, tmp_path / "ours.gguf", outtype).out)
    assert_same_gguf(ours, theirs)


def test_sharded_checkpoint_matches_llama_cpp(tmp_path, reference_python, reference_script):
    src = copy_fixture("thinking", tmp_path)
    shard_checkpoint(src, 3)
    theirs = reference_convert(reference_python, reference_script, src, tmp_path / "theirs.gguf", "bf16")
    ours = Path(convert(src, tmp_path / "ours.gguf", "bf16").out)
    assert_same_gguf(ours, theirs)


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_dense_ernie_matches_llama_cpp(tmp_path, reference_python, reference_script, outtype):
    src = make_dense_checkpoint(tmp_path / "tiny-ernie-dense")
    theirs = reference_convert(reference_python, reference_script, src, tmp_path / "theirs.gguf", outtype)
    ours = Path(convert(src, tmp_path / "ours.gguf", outtype).out)
    assert_same_gguf(ours, theirs)


def test_dense_config_defaults_match_llama_cpp(tmp_path, reference_python, reference_script):
    # llama.cpp's converter sees config.json through transformers: an absent key takes the class default
    # (max_position_embeddings 131072), a null head_dim becomes hidden_size // num_attention_heads
    src = make_dense_checkpoint(tmp_path / "tiny-ernie-dense-defaults")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["max_position_embeddings"]
    cfg["head_dim"] = None
    (src / "config.json").write_text(json.dumps(cfg))
    theirs = reference_convert(reference_python, reference_script, src, tmp_path / "theirs.gguf", "f32")
    ours = Path(convert(src, tmp_path / "ours.gguf", "f32").out)
    assert_same_gguf(ours, theirs)
