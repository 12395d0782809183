"""Issue 13: hostile and malformed input, concurrent writers. Each test is one defect the review proved.

Untrusted files (checkpoints, tokenizers, configs, recipes, GGUFs, store manifests, chat templates) must end in a
result or in one line + exit 2 naming the file and what is wrong; outputs must never land on an input or be
interleaved by two writers. The seeded fuzzing over the same formats is in test_fuzz.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import fixture_dir

from edgemoe_cli import registry, store
from edgemoe_cli.errors import EdgeMoEError

EDGEMOE = Path(sys.executable).with_name("edgemoe")
CALIB = Path(__file__).resolve().parents[1] / "data" / "calib" / "calibration.txt"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
)


def edgemoe(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(EDGEMOE), *map(str, args)], capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
    )


def one_line_error(p: subprocess.CompletedProcess, *words: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    err = p.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def checkpoint_copy(tmp_path: Path, variant: str = "pt") -> Path:
    """A writable copy of a fixture checkpoint (tokenizer and config copied, weights hard-linked when possible)."""
    src, dest = fixture_dir(variant), tmp_path / f"tiny-ernie-{variant}"
    dest.mkdir()
    for p in src.iterdir():
        if p.is_file():
            shutil.copy(p, dest / p.name)
    return dest


def read_st(path: Path) -> tuple[dict, bytes]:
    """(header JSON, data section) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, header, data: bytes) -> None:
    head = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(len(head).to_bytes(8, "little") + head + data)


def convert_error(src: Path, tmp_path: Path) -> str:
    from edgemoe_cli.convert import convert

    with pytest.raises(EdgeMoEError) as e:
        convert(src, tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()
    return str(e.value)


# ---- atomic outputs (item 2) ----


def test_two_writers_of_one_output_never_share_a_temp_file(tmp_path):
    out = tmp_path / "out.bin"
    with store.atomic_output(out) as a, store.atomic_output(out) as b:
        assert a != b and a.parent == b.parent == tmp_path
        with open(a, "wb") as fa, open(b, "wb") as fb:
            for _ in range(64):  # interleaved, as two processes would
                fa.write(b"A" * 4096)
                fb.write(b"B" * 4096)
    assert out.read_bytes() == b"A" * 4096 * 64  # the last rename wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_symlink_planted_at_out_part_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "model.gguf"
    (tmp_path / "model.gguf.part").symlink_to(victim)
    p = edgemoe("convert", fixture_dir("pt"), "--out", out, "--outtype", "f32")
    assert p.returncode == 0, p.stderr
    assert victim.read_bytes() == b"precious"
    assert out.is_file() and not out.is_symlink() and gguf.GGUFReader(out).tensors
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_concurrent_converts_to_one_output_leave_one_of_the_two_whole(tmp_path):
    single = {}
    for v in ("pt", "thinking"):
        single[v] = tmp_path / f"{v}.gguf"
        assert edgemoe("convert", fixture_dir(v), "--out", single[v], "--outtype", "f16").returncode == 0
    wanted = {store.sha256_file(p) for p in single.values()}
    out = tmp_path / "both.gguf"
    for _ in range(3):
        procs = [
            subprocess.Popen(
                [str(EDGEMOE), "convert", str(fixture_dir(v)), "--out", str(out), "--outtype", "f16"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for v in ("pt", "thinking")
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
        assert store.sha256_file(out) in wanted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.gguf", "pt.gguf", "thinking.gguf"]


# ---- an output that is an input (item 4) ----


def test_convert_refuses_to_write_over_its_own_shard(tmp_path):
    src = checkpoint_copy(tmp_path)
    shard = src / "model.safetensors"
    before = store.sha256_file(shard)
    one_line_error(edgemoe("convert", src, "--out", shard), "is an input", "model.safetensors")
    one_line_error(edgemoe("convert", src, "--out", src / "tokenizer.model"), "is an input")
    assert store.sha256_file(shard) == before


def test_imatrix_and_plan_refuse_their_input_as_output(tiny_gguf, tmp_path):
    model = tmp_path / "m.gguf"
    shutil.copy(tiny_gguf("pt", "f16"), model)
    before = store.sha256_file(model)
    one_line_error(edgemoe("imatrix", model, "--out", model), "is an input")
    one_line_error(edgemoe("imatrix", model, "--text", CALIB, "--out", CALIB), "is an input")
    via_link = tmp_path / "link.gguf"
    via_link.symlink_to(model)
    one_line_error(
        edgemoe("plan", model, "--max-size", "5MB", "--imatrix", tmp_path / "none.imatrix", "--out", via_link),
        "is an input",
    )
    assert store.sha256_file(model) == before


# ---- tokenizer.model (item 5) ----


def test_a_runaway_varint_in_tokenizer_model_is_refused_at_once(tmp_path):
    from edgemoe_cli.convert.vocab import read_sentencepiece

    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x0a" + b"\xff" * 800_000)  # field 1, then a "length" that never ends
    with pytest.raises(EdgeMoEError, match="varint longer than 10 bytes"):
        read_sentencepiece(bad)


@pytest.mark.parametrize(
    "payload, needle",
    [
        (b"\x0a\x7f" + b"\x0a\x01a", "runs past the end"),  # a piece claiming 127 bytes with 3 left
        (b"\x0b", "wire type 3"),
        (b"\x0a\x05\x12\x02ab", "runs past the end"),  # the nested piece string claims too much
        (b"", "holds no pieces"),
    ],
)
def test_malformed_tokenizer_model_is_one_error(tmp_path, payload, needle):
    from edgemoe_cli.convert.vocab import read_sentencepiece

    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(payload)
    with pytest.raises(EdgeMoEError, match=needle):
        read_sentencepiece(bad)


# ---- safetensors headers (item 5 and the traceback list) ----


def _mutate_first(header: dict, **fields) -> dict:
    name = next(k for k in header if k != "__metadata__")
    header[name] = {**header[name], **fields}
    return header


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda h: _mutate_first(h, data_offsets=["0", "8"]), "data_offsets"),
        (lambda h: _mutate_first(h, data_offsets=[0.0, 8.5]), "data_offsets"),
        (lambda h: _mutate_first(h, data_offsets=[8, 0]), "data_offsets"),
        (lambda h: _mutate_first(h, dtype=["BF16"]), "dtype"),
        (lambda h: _mutate_first(h, shape=[-2, -128]), "shape"),
        (lambda h: _mutate_first(h, shape="256"), "shape"),
        (lambda h: {"__metadata__": {"format": "pt"}}, "holds no tensors"),
        (lambda h: {}, "holds no tensors"),
        (lambda h: [1, 2], "not a JSON object"),
    ],
)
def test_malformed_safetensors_headers_are_one_error(tmp_path, mutate, needle):
    src = checkpoint_copy(tmp_path)
    header, data = read_st(src / "model.safetensors")
    write_st(src / "model.safetensors", mutate(header), data)
    err = convert_error(src, tmp_path)
    assert "model.safetensors" in err and needle in err, err


def test_overlapping_tensors_are_refused(tmp_path):
    src = checkpoint_copy(tmp_path)
    header, data = read_st(src / "model.safetensors")
    a, b = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    if header[a] != {**header[b], "data_offsets": header[a]["data_offsets"]}:
        header[b] = dict(header[a])  # same dtype, shape and bytes: one tensor's data read twice
    else:
        header[b]["data_offsets"] = header[a]["data_offsets"]
    write_st(src / "model.safetensors", header, data)
    assert "overlap" in convert_error(src, tmp_path)


def test_a_header_length_past_the_format_cap_is_not_read(tmp_path):
    src = checkpoint_copy(tmp_path)
    big = src / "model.safetensors"
    with open(big, "wb") as f:  # sparse: 150 MB claimed and present, nothing allocated on disk or in memory
        f.write((150_000_000).to_bytes(8, "little"))
        f.truncate(150_000_100)
    err = convert_error(src, tmp_path)
    assert "150,000,000 bytes" in err and "100,000,000" in err


def test_shards_listing_one_tensor_twice_or_a_bad_shard_name_are_refused(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_convert import shard_checkpoint

    src = checkpoint_copy(tmp_path)
    shard_checkpoint(src, 2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    # the same tensor in both shards: copy one entry of shard 1 into shard 2's header
    h1, _ = read_st(src / shards[0])
    h2, d2 = read_st(src / shards[1])
    name = next(k for k in h1 if k != "__metadata__")
    end = max(v["data_offsets"][1] for k, v in h2.items() if k != "__metadata__")
    h2[name] = {**h1[name], "data_offsets": [end, end + h1[name]["data_offsets"][1] - h1[name]["data_offsets"][0]]}
    write_st(src / shards[1], h2, d2 + bytes(h2[name]["data_offsets"][1] - end))
    assert "in two shards" in convert_error(src, tmp_path)

    for value in (7, "../model.safetensors", "/etc/passwd"):
        index["weight_map"][name] = value
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        assert "not a .safetensors file name" in convert_error(src, tmp_path)


def test_one_dimensional_expert_tensors_are_refused(tmp_path):
    src = checkpoint_copy(tmp_path)
    header, data = read_st(src / "model.safetensors")
    name = next(k for k in header if ".mlp.experts.0.up_proj" in k)
    rows, cols = header[name]["shape"]
    header[name]["shape"] = [rows * cols]
    write_st(src / "model.safetensors", header, data)
    assert "not [rows, columns]" in convert_error(src, tmp_path)


# ---- config.json (item 5 and the traceback list) ----


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"num_hidden_layers": 100000}, "num_hidden_layers is 100000 but"),
        ({"vocab_size": 100_000_000}, "vocab_size is 100000000 but"),
        ({"vocab_size": -5}, "vocab_size is -5, outside 1"),
        ({"text_config": [1]}, "text_config is not an object"),
        ({"architectures": 5}, "architectures is 5"),
        ({"rope_scaling": "yarn"}, "rope_scaling"),
        ({"moe_num_experts": "16"}, "moe_num_experts is '16'"),
        ({"moe_k": "4"}, "moe_k is '4'"),
        ({"moe_k": 17}, "moe_k is 17"),
        ({"moe_num_experts": 64}, "moe_num_experts is 64 but"),
        ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
        ({"hidden_size": True}, "hidden_size is True"),
    ],
)
def test_config_numbers_are_checked_before_anything_is_allocated(tmp_path, change, needle):
    src = checkpoint_copy(tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **change}))
    err = convert_error(src, tmp_path)
    assert "config.json" in err and needle in err, err


# ---- tokenizer_config.json and added_tokens.json ----


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("tokenizer_config.json", [1, 2], "not an object"),
        ("tokenizer_config.json", {"added_tokens_decoder": {"5": {"special": True}}}, "no string `content`"),
        ("tokenizer_config.json", {"added_tokens_decoder": {"-3": {"content": "<x>"}}}, "not a token id"),
        ("tokenizer_config.json", {"added_tokens_decoder": [1]}, "added_tokens_decoder is not an object"),
        ("tokenizer_config.json", {"add_prefix_space": "yes"}, "add_prefix_space"),
        ("added_tokens.json", ["<x>"], "not an object"),
        ("added_tokens.json", {"<x>": "5"}, "has id '5'"),
        ("added_tokens.json", {"<x>": -1}, "has id -1"),  # would overwrite the vocabulary's last token
    ],
)
def test_malformed_tokenizer_json_is_one_error(tmp_path, name, content, needle):
    src = checkpoint_copy(tmp_path)
    (src / name).write_text(json.dumps(content))
    err = convert_error(src, tmp_path)
    assert name in err and needle in err, err


# ---- recipes (items 6 and the low list) ----


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a b", ""])
def test_recipe_names_cannot_leave_the_store(tiny_gguf, tmp_path, name):
    recipe = write_recipe(tmp_path / "r.toml", f'name = "{name}"\ndefault = "q8_0"\n')
    one_line_error(edgemoe("quantize", tiny_gguf("pt", "f16"), "--recipe", recipe), "name", "letters, digits")
    assert not (store.home() / "gguf").exists()


@pytest.mark.parametrize(
    "rule, needle",
    [
        ("pattern = 5\ntype = 'q8_0'", "pattern is 5"),
        ("pattern = 'x'\ntype = ['q8_0']", "type is ['q8_0']"),
        ("pattern = 'x'\ntype = 8", "type is 8"),
    ],
)
def test_recipe_rule_values_must_be_strings(tiny_gguf, tmp_path, rule, needle):
    recipe = write_recipe(tmp_path / "r.toml", f"name = 'r'\n[[rules]]\n{rule}\n")
    one_line_error(edgemoe("recipe", "show", recipe, "--model", tiny_gguf("pt", "f16")), needle)


def test_a_backtracking_pattern_is_stopped(tiny_gguf, tmp_path):
    from edgemoe_cli.recipe import MATCH_SECONDS

    recipe = write_recipe(tmp_path / "r.toml", "name = 'r'\n[[rules]]\npattern = '(.|.)*Z'\ntype = 'q8_0'\n")
    p = edgemoe("recipe", "show", recipe, "--model", tiny_gguf("pt", "f16"), timeout=MATCH_SECONDS + 60)
    one_line_error(p, "rule 1", "(.|.)*Z", "backtracks")


def test_recipe_toml_round_trips_any_pattern(tmp_path):
    from edgemoe_cli.recipe import Recipe, Rule, load_recipe

    rules = [
        Rule("it's", "q8_0"),
        Rule(r"^blk\.\d+\.ffn_(up|gate)_exps", "q4_k"),
        Rule(r'"quoted"\d', "q6_k"),
        Rule("tab\there", "q4_0"),
    ]
    recipe = Recipe("round-trip", 'says "hi"\nover two lines', "q4_0", "q6_k", None, rules)
    path = tmp_path / "r.toml"
    path.write_text(recipe.to_toml())
    back = load_recipe(path)
    assert (back.name, back.description, back.rules) == (recipe.name, recipe.description, recipe.rules)


# ---- plan (items 4, 8 and the traceback list) ----


def damaged_ggufs(tiny: Path, tmp_path: Path) -> list[Path]:
    """GGUFs damaged as downloads and disks damage them: truncated, overwritten, keys missing."""
    raw = tiny.read_bytes()
    rng = np.random.default_rng(13)
    cases = {
        "header-only.gguf": raw[:24],
        "truncated-in-keys.gguf": raw[:3000],
        "truncated-in-data.gguf": raw[: len(raw) // 2],
        "garbage-after-magic.gguf": raw[:4] + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "huge-counts.gguf": raw[:8] + (2**63 - 1).to_bytes(8, "little") * 2 + raw[24:4096],
    }
    flipped = bytearray(raw[:200_000])
    for at in rng.integers(24, len(flipped), 64):
        flipped[at] ^= 0xFF
    cases["bytes-flipped.gguf"] = bytes(flipped)
    paths = []
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    w = gguf.GGUFWriter(tmp_path / "no-keys.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return paths + [tmp_path / "no-keys.gguf"]


def test_plan_on_a_damaged_gguf_is_one_line(tiny_gguf, tmp_path):
    for model in damaged_ggufs(tiny_gguf("pt", "f16"), tmp_path):
        # with --budget the file's keys are read (KV cache size); with --max-size a readable file goes on to
        # the next check (the absent imatrix), a damaged one is refused first
        err = one_line_error(edgemoe("plan", model, "--budget", "2GiB", "--imatrix", tmp_path / "absent.imatrix"))
        assert model.name in err, err
        one_line_error(edgemoe("plan", model, "--max-size", "5MB", "--imatrix", tmp_path / "absent.imatrix"))


def test_eval_cache_is_keyed_by_content_not_path(tiny_gguf, tmp_path):
    from edgemoe_cli.evaluate import evaluate

    model = tiny_gguf("pt", "f16")
    copies = []
    for i in range(2):  # two temp files with the same bytes, as each plan --reference q8_0 run makes
        copies.append(tmp_path / f"ref{i}.gguf")
        shutil.copy(model, copies[-1])
        os.utime(copies[-1], ns=(i * 10**9, i * 10**9))
    results = [evaluate(model, base, CALIB, ctx=64, max_chunks=1, threads=2) for base in copies]
    assert results[0].kld_mean == results[1].kld_mean
    assert len(list((store.home() / "cache" / "eval").glob("*.top1.npy"))) == 1


@pytest.mark.slow
def test_concurrent_plans_of_one_model_do_not_share_work_files(tiny_gguf, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_quantize import write_imatrix

    from edgemoe_cli import plan

    model = tiny_gguf("thinking")
    im = write_imatrix(tmp_path / "im.gguf", model)
    work = tmp_path / "work"
    # the old shared names: a concurrent run's half-written files, which a run must never read or delete
    work.mkdir()
    planted = {t: work / f"{model.stem}.{t}.gguf" for t in ("q4_0", "q8_0", "calibration", "candidate")}
    for p in planted.values():
        p.write_bytes(b"another run's file")
    results, errors = [], []

    def one():
        try:
            results.append(
                plan.measure(
                    model,
                    im,
                    CALIB,
                    types=("q4_0", "q8_0"),
                    calibration_type="q4_0",
                    ctx=128,
                    max_chunks=1,
                    threads=1,
                    workdir=work,
                    use_cache=False,
                )
            )
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results[0].errors == results[1].errors and results[0].calibration_kld == results[1].calibration_kld
    assert all(p.read_bytes() == b"another run's file" for p in planted.values())
    assert sorted(work.iterdir()) == sorted(planted.values())  # each run removed its own directory


# ---- compare ----


def test_compare_out_json_would_overwrite_its_twin(tmp_path):
    one_line_error(edgemoe("compare", "-p", "hi", "--out", tmp_path / "report.json"), "JSON twin", "report.md")
    assert not any(tmp_path.iterdir())


def test_compare_rejects_a_non_numeric_number_check_before_running(tiny_gguf, tmp_path):
    prompts = tmp_path / "p.toml"
    prompts.write_text('[[prompt]]\ntext = "What is 2 + 2?"\nexpected = "four"\ncheck = "number"\n')
    p = edgemoe(
        "compare", "--pt", tiny_gguf("pt", "f16"), "--thinking", tiny_gguf("thinking", "f16"), "--prompts", prompts
    )
    one_line_error(p, "p.toml", "'four' is not a number")


# ---- sizes and shares ----


@pytest.mark.parametrize("text", ["9" * 400, "9" * 400 + ".5T", "2000000T"])
def test_huge_sizes_are_refused_not_overflowed(text):
    from edgemoe_cli.units import parse_size

    with pytest.raises(EdgeMoEError, match="larger than any disk"):
        parse_size(text)


@pytest.mark.parametrize("keep", ["inf%", "nan%", "-inf%", "150%", "1e999%"])
def test_prune_keep_share_out_of_range_is_one_line(tiny_gguf, tmp_path, keep):
    one_line_error(
        edgemoe("prune", tiny_gguf("pt", "f16"), "--keep", keep, "--out", tmp_path / "o.gguf"), "share of 0-100%"
    )


def test_prune_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_gguf, tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unprivileged user and mount namespaces for a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        f'mount -t tmpfs -o size=2m tmpfs "{disk}" || exit 99; '
        f'"{EDGEMOE}" prune "{tiny_gguf("pt", "f16")}" --keep 8 --out "{disk}/o.gguf"; rc=$?; '
        f'ls -A "{disk}" >&2; exit $rc'
    )
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if p.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    err = one_line_error(p, "cannot write", "o.gguf")  # and `ls -A` printed nothing: no temp file left
    assert "No space left" in err or "only part of a write" in err, err


# ---- the store's manifests ----


@pytest.mark.parametrize("content", ["[]", "{", '{"kind": "pull"}', '{"kind": "pull", "name": 3}', "\u00ff\u00fe"])
def test_damaged_store_manifests_are_listed_and_named(content):
    name = "ernie-4.5-21b-a3b-pt"
    entry = registry.store_entry(name)
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text(content)
    p = edgemoe("list", "--json")
    assert p.returncode == 0, p.stderr
    assert [i["state"] for i in json.loads(p.stdout)] == ["damaged manifest"]
    with pytest.raises(EdgeMoEError, match="manifest.json is damaged"):
        registry.resolve(name)
    one_line_error(edgemoe("convert", name, "--out", "x.gguf"), "damaged", "pull")


# ---- chat templates ----


@pytest.mark.parametrize(
    "template, needle",
    [
        ("{{ 1/0 }}", "ZeroDivisionError"),
        ("{{ 'a' * 10**10 }}", "10,000,000,000"),
        ("{{ messages[0].nope.deeper }}", "render"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran longer"),
        ("{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "render"),
    ],
)
def test_chat_templates_that_fail_or_run_away_are_one_error(template, needle):
    from edgemoe_cli.chat import build_messages, render_prompt

    with pytest.raises(EdgeMoEError, match="chat template") as e:
        render_prompt(template, build_messages("hi"))
    assert needle in str(e.value)
