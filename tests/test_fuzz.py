"""Seeded random mutations of every untrusted input format, each run through the real CLI in a bounded process.

Formats: safetensors headers, config.json, tokenizer.model (convert), recipe TOML (recipe show) and GGUF headers
(recipe show, prune, plan). Every run must end in success or in exit 2 with one line on stderr — never a traceback,
never past TIME_LIMIT seconds, never past MEMORY_LIMIT bytes of address space (RLIMIT_AS: an allocation sized by
the input fails with MemoryError, which would show as a traceback). The seed is fixed, so a failure is repeatable;
EDGEMOE_FUZZ_SEED and EDGEMOE_FUZZ_CASES explore further.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_dir

from edgemoe_cli.store import configs_dir

EDGEMOE = Path(sys.executable).with_name("edgemoe")
SEED = int(os.environ.get("EDGEMOE_FUZZ_SEED", "13"))
CASES = int(os.environ.get("EDGEMOE_FUZZ_CASES", "12"))
TIME_LIMIT = 45  # seconds per run; the fixture converts in about one
MEMORY_LIMIT = 2 << 30  # address space per run; the commands need about 1.2 GiB on the fixture
WORKERS = 2

# values that break assumptions about types and ranges, for JSON and TOML fields alike
WEIRD = [
    None,
    True,
    -1,
    0,
    2**31,
    2**63,
    2**64 + 5,
    -(2**40),
    1.5,
    float("nan"),
    "",
    "x",
    "../../etc/passwd",
    "(.|.)*Z",
    "(a+)+$",
    "[",
    "\\",
    "'",
    [],
    [1],
    [-1, 5],
    [0, 2**62],
    ["a", "b"],
    {},
    {"content": 5},
    "q4_k",
]


def run_bounded(args: list, cwd: Path) -> subprocess.CompletedProcess:
    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    try:
        return subprocess.run(
            [str(EDGEMOE), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=TIME_LIMIT,
            preexec_fn=limits,
            cwd=cwd,
            env={**os.environ, "COLUMNS": "120"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung past {TIME_LIMIT} s: edgemoe {' '.join(map(str, args))}")


def check_outcome(p: subprocess.CompletedProcess, case: str) -> str:
    """'ok' or 'refused'; anything else fails the test with the case that caused it."""
    err = p.stderr.strip()
    if p.returncode == 0:
        return "ok"
    assert p.returncode == 2, f"{case}: exit {p.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err and "\n" not in err and err.startswith("error:"), f"{case}:\n{err[-3000:]}"
    return "refused"


def run_all(cases: list[tuple[str, list, Path]]) -> dict[str, int]:
    with ThreadPoolExecutor(WORKERS) as pool:
        procs = list(pool.map(lambda c: run_bounded(c[1], c[2]), cases))
    outcomes = {"ok": 0, "refused": 0}
    for (case, _, _), p in zip(cases, procs):
        outcomes[check_outcome(p, case)] += 1
    return outcomes


def mutate_value(rng: np.random.Generator, value):
    """A random change of a JSON-like value, recursing into containers."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = list(value)[rng.integers(len(value))]
        out = dict(value)
        if rng.random() < 0.2:
            del out[key]
        else:
            out[key] = mutate_value(rng, value[key])
        return out
    if isinstance(value, list) and value and rng.random() < 0.7:
        out = list(value)
        i = int(rng.integers(len(out)))
        out[i] = mutate_value(rng, out[i])
        return out
    return WEIRD[rng.integers(len(WEIRD))]


def flip_bytes(rng: np.random.Generator, data: bytes, start: int = 0, end: int | None = None, n: int = 8) -> bytes:
    end = len(data) if end is None else end
    out = bytearray(data)
    for at in rng.integers(start, max(end, start + 1), n):
        if at < len(out):
            out[at] = int(rng.integers(256))
    return bytes(out)


def checkpoint(tmp_path: Path, i: int) -> Path:
    """A checkpoint directory of links to the fixture's files; a mutated file replaces its link."""
    src, dest = fixture_dir("pt"), tmp_path / f"case{i}" / "tiny-ernie-pt"
    dest.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file():
            os.link(p, dest / p.name) if os.stat(p).st_dev == os.stat(dest).st_dev else shutil.copy(p, dest / p.name)
    return dest


def replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def convert_case(src: Path) -> list:
    return ["convert", src, "--out", src.parent / "out.gguf", "--outtype", "f16"]


def test_fuzz_safetensors_headers(tmp_path):
    rng = np.random.default_rng(SEED)
    raw = (fixture_dir("pt") / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    cases = []
    for i in range(CASES):
        src = checkpoint(tmp_path, i)
        kind = i % 3
        if kind == 0:  # the JSON, a field or an entry at a time
            h = header
            for _ in range(int(rng.integers(1, 4))):
                h = mutate_value(rng, h)
            head = json.dumps(h).encode()
            blob = len(head).to_bytes(8, "little") + head + data
        elif kind == 1:  # bytes of the header flipped
            blob = flip_bytes(rng, raw, 8, 8 + n, n=int(rng.integers(1, 16)))
        else:  # the length field: tiny, past the end, at the end, enormous
            length = [0, 1, n - 1, n + 1, len(raw), len(raw) - 8, 2**63, 2**64 - 1][i % 8]
            blob = length.to_bytes(8, "little") + raw[8:]
        replace(src / "model.safetensors", blob)
        cases.append((f"safetensors case {i}", convert_case(src), src.parent))
    assert run_all(cases)["refused"] > 0


def test_fuzz_config_json(tmp_path):
    rng = np.random.default_rng(SEED + 1)
    config = json.loads((fixture_dir("pt") / "config.json").read_text())
    cases = []
    for i in range(CASES):
        src = checkpoint(tmp_path, i)
        if i % 4 == 3:
            text = flip_bytes(rng, json.dumps(config).encode(), n=4)
        else:
            c = config
            for _ in range(int(rng.integers(1, 4))):
                c = mutate_value(rng, c)
            text = json.dumps(c).encode()
        replace(src / "config.json", text)
        cases.append((f"config.json case {i}", convert_case(src), src.parent))
    run_all(cases)


def test_fuzz_tokenizer_model(tmp_path):
    rng = np.random.default_rng(SEED + 2)
    raw = (fixture_dir("pt") / "tokenizer.model").read_bytes()
    cases = []
    for i in range(CASES):
        src = checkpoint(tmp_path, i)
        kind = i % 4
        if kind == 0:
            blob = flip_bytes(rng, raw, n=int(rng.integers(1, 64)))
        elif kind == 1:
            blob = raw[: int(rng.integers(len(raw)))]
        elif kind == 2:  # a run of continuation bytes: the varint that never ends
            at = int(rng.integers(len(raw)))
            blob = raw[:at] + b"\xff" * int(rng.integers(16, 200_000)) + raw[at:]
        else:
            blob = rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
        replace(src / "tokenizer.model", blob)
        cases.append((f"tokenizer.model case {i}", convert_case(src), src.parent))
    assert run_all(cases)["refused"] > 0


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if value == value else "nan"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is JSON's string syntax for these
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    return '""'


def test_fuzz_recipe_toml(tmp_path, tiny_gguf):
    from edgemoe_cli.tomlfile import load_toml

    rng = np.random.default_rng(SEED + 3)
    model = tiny_gguf("pt", "f16")
    text = (configs_dir() / "recipes" / "edge-balanced.toml").read_text()
    recipe = load_toml(text, "edge-balanced")
    cases = []
    for i in range(CASES):
        if i % 3 == 2:
            body = flip_bytes(rng, text.encode(), n=int(rng.integers(1, 12)))
        else:
            r = recipe
            for _ in range(int(rng.integers(1, 4))):
                r = mutate_value(rng, r)
            if not isinstance(r, dict):  # a TOML document is a table: the whole recipe became one value
                r = {"name": r}
            lines = [f"{k} = {_toml_value(v)}" for k, v in r.items() if k != "rules" and v is not None]
            rules = r.get("rules", [])
            if isinstance(rules, list):
                for rule in rules:
                    lines.append("[[rules]]")
                    lines += [
                        f"{k} = {_toml_value(v)}"
                        for k, v in (rule.items() if isinstance(rule, dict) else [])
                        if v is not None
                    ]
            elif rules is not None:
                lines.insert(0, f"rules = {_toml_value(rules)}")
            body = "\n".join(lines).encode()
        path = tmp_path / f"recipe{i}.toml"
        path.write_bytes(body)
        cases.append((f"recipe case {i}: {body[:2000]!r}", ["recipe", "show", path, "--model", model], tmp_path))
    run_all(cases)


def test_fuzz_gguf_headers(tmp_path, tiny_gguf):
    import gguf

    rng = np.random.default_rng(SEED + 4)
    model = tiny_gguf("pt", "f16")
    raw = model.read_bytes()
    header_end = gguf.GGUFReader(model).data_offset
    cases = []
    for i in range(CASES):
        kind = i % 4
        if kind == 0:
            blob = flip_bytes(rng, raw, 4, header_end, n=int(rng.integers(1, 32)))
        elif kind == 1:  # a count or length field somewhere in the header made enormous
            at = int(rng.integers(4, header_end - 8))
            huge = [2**31, 2**40, 2**63 - 1, 2**64 - 1][rng.integers(4)]
            blob = raw[:at] + huge.to_bytes(8, "little") + raw[at + 8 :]
        elif kind == 2:
            blob = raw[: int(rng.integers(4, header_end + 4096))]
        else:
            blob = raw[:4] + flip_bytes(rng, raw[4:24], n=4) + raw[24:]
        path = tmp_path / f"case{i}.gguf"
        path.write_bytes(blob)
        commands = (
            ["recipe", "show", "q4_0-uniform", "--model", path],
            ["prune", path, "--keep", "8", "--out", tmp_path / f"case{i}.keep8.gguf"],
            ["plan", path, "--budget", "2GiB", "--imatrix", tmp_path / "absent.imatrix"],
        )
        args = commands[(i // 4) % 3]  # every kind of damage reaches every command over 12 cases
        cases.append((f"gguf case {i} ({args[0]})", args, tmp_path))
    assert run_all(cases)["refused"] > 0
