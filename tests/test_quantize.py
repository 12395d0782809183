"""quantize (recipe -> exactly those types, verified), imatrix reading, eval sanity, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import SHARED_FIXTURES

from edgemoe_cli import quantize as quantize_mod
from edgemoe_cli.errors import EdgeMoEError
from edgemoe_cli.recipe import explain, load_recipe, read_tensors


def write_imatrix(path, model, seed=0):
    """A GGUF imatrix in llama-imatrix's layout (in_sum2 [n_mat, n_in], counts [n_mat, 1]) for `model`'s matrices."""
    import gguf

    rng = np.random.default_rng(seed)
    tensors, _ = read_tensors(model)
    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_string("general.type", "imatrix")
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 512)
    w.add_array("imatrix.datasets", ["synthetic"])
    for t in tensors:
        if not t.name.startswith("blk.") or len(t.shape) < 2 or "_norm" in t.name or "gate_inp" in t.name:
            continue
        n_mat = t.shape[2] if len(t.shape) > 2 else 1
        counts = rng.integers(0, 400, n_mat).astype(np.float32) if n_mat > 1 else np.array([1536.0], np.float32)
        if n_mat > 1:
            counts[0] = 0  # an expert no token reached
        sums = rng.random((n_mat, t.shape[0]), dtype=np.float32) * counts[:, None]
        w.add_tensor(t.name + ".in_sum2", sums)
        w.add_tensor(t.name + ".counts", counts.reshape(n_mat, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("recipe", ["edge-balanced", "arm-fast", "q4_0-uniform"])
def test_quantize_gives_exactly_the_recipes_types(tiny_gguf, tmp_path, recipe):
    model = tiny_gguf("thinking")
    out = tmp_path / f"{recipe}.gguf"
    res = quantize_mod.quantize(model, recipe, out=out, threads=2)
    want = {t.name: t.type for t in explain(load_recipe(recipe), model).tensors}
    got = {t.name: t.type for t in read_tensors(out)[0]}
    assert got == want
    assert out.is_file() and not out.with_name(out.name + ".part").exists()
    import json

    manifest = json.loads((tmp_path / f"{recipe}.gguf.manifest.json").read_text())
    assert manifest["recipe"] == recipe and manifest["bytes"] == out.stat().st_size and len(manifest["sha256"]) == 64
    assert res.bytes == out.stat().st_size
    # the predicted size is the real size to within the alignment padding
    assert abs(explain(load_recipe(recipe), model).total_bytes - res.bytes) < 64 * len(want)


def test_silent_fallback_fails_loudly(tiny_gguf, tmp_path, monkeypatch):
    """If llama.cpp wrote another type than asked (what a fallback looks like), quantize must refuse the output."""
    real = quantize_mod._run_llama_quantize

    def sneaky(model, part, ftype, overrides, imatrix, threads, progress):
        return real(
            model,
            part,
            ftype,
            [(p, "q8_0" if "ffn_down_exps" in p else t) for p, t in overrides],
            imatrix,
            threads,
            progress,
        )

    monkeypatch.setattr(quantize_mod, "_run_llama_quantize", sneaky)
    out = tmp_path / "x.gguf"
    with pytest.raises(
        EdgeMoEError, match=r"wrote blk\.\d\.ffn_down_exps\.weight as q8_0 but the recipe asked for q5_k"
    ):
        quantize_mod.quantize(tiny_gguf("thinking"), "edge-balanced", out=out, threads=2)
    assert not out.exists() and not (tmp_path / "x.gguf.part").exists()


def test_imatrix_read_importance_usage_and_use(tiny_gguf, tmp_path):
    from edgemoe_cli.imatrix import expert_usage, read_imatrix

    model = tiny_gguf("thinking")
    path = write_imatrix(tmp_path / "im.gguf", model)
    im = read_imatrix(path)
    e = im.entries["blk.2.ffn_down_exps.weight"]
    assert e.sums.shape == (16, 256) and e.counts.shape == (16,)
    imp = e.importance()
    assert np.allclose(imp[0], 1.0)  # no token: importance 1, as llama-quantize
    assert np.allclose(imp[1:], e.sums[1:] / e.counts[1:, None])
    usage = expert_usage(path)
    assert usage.shape == (4, 16) and np.isnan(usage[0]).all()
    assert np.allclose(usage[1:].sum(axis=1), 1.0) and (usage[1:, 0] == 0).all()
    out = tmp_path / "q.gguf"
    res = quantize_mod.quantize(model, "edge-small", out=out, imatrix=path, threads=2)
    assert res.imatrix == str(path)
    # an iq2 type needs an imatrix: refused without one, accepted with one
    rec = tmp_path / "low.toml"
    rec.write_text('default = "q4_k"\n[[rules]]\npattern = "_exps"\ntype = "iq2_xs"\n')
    with pytest.raises(EdgeMoEError, match="needs an importance matrix"):
        quantize_mod.quantize(model, rec, out=tmp_path / "low.gguf", threads=2)
    quantize_mod.quantize(model, rec, out=tmp_path / "low.gguf", imatrix=path, threads=2)


def test_imatrix_of_another_model_is_a_one_line_error(tiny_gguf, tmp_path):
    import gguf

    path = tmp_path / "wrong.gguf"
    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_string("general.type", "imatrix")
    w.add_tensor("blk.1.ffn_down_exps.weight.in_sum2", np.ones((8, 128), np.float32))
    w.add_tensor("blk.1.ffn_down_exps.weight.counts", np.ones((8, 1), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EdgeMoEError, match="has 1024 values for blk.1.ffn_down_exps.weight, the model needs 4096"):
        quantize_mod.quantize(tiny_gguf("thinking"), "edge-balanced", out=tmp_path / "o.gguf", imatrix=path)


def test_eval_model_against_itself_and_a_quantization(tiny_gguf, tmp_path):
    from edgemoe_cli.evaluate import evaluate

    model = tiny_gguf("thinking")
    text = str(SHARED_FIXTURES / "calib.txt")
    same = evaluate(model, model, text, ctx=256, max_chunks=2, threads=2)
    assert same.kld_mean < 1e-3 and same.top1_agreement == 1.0
    assert same.ppl == pytest.approx(same.base_ppl, rel=1e-3) and 1.0 < same.ppl < 8192
    q = tmp_path / "q.gguf"
    quantize_mod.quantize(model, "q4_0-uniform", out=q, threads=2)
    res = evaluate(q, model, text, ctx=256, max_chunks=2, threads=2)
    assert same.kld_mean < res.kld_mean < 1.0 and 0.5 < res.top1_agreement < 1.0
    assert res.kld_p99 >= res.kld_median and res.tokens_scored == same.tokens_scored == 2 * 127


def test_eval_scoring_from_an_earlier_position_keeps_the_second_half_and_its_cache_apart(tiny_gguf, tmp_path):
    """plan's calibration evals score from a short warm-up on (score_from); `edgemoe eval`'s default stays the second
    half. The rows of the second half are the same numbers either way, and the base's cached log-probs of one
    protocol are never served to the other (their row counts differ)."""
    from edgemoe_cli.evaluate import base_logprobs, evaluate

    model = tiny_gguf("thinking")
    text = str(SHARED_FIXTURES / "calib.txt")
    q = tmp_path / "q.gguf"
    quantize_mod.quantize(model, "q4_0-uniform", out=q, threads=2)
    half = evaluate(q, model, text, ctx=256, max_chunks=2, threads=2)
    early = evaluate(q, model, text, ctx=256, max_chunks=2, threads=2, score_from=32)
    assert half.tokens_scored == 2 * 127 and early.tokens_scored == 2 * (255 - 32)
    assert early.kld_mean > 0 and early.kld_mean != half.kld_mean
    half_cache, _ = base_logprobs(model, text, 256, 2, 2)
    early_cache, _ = base_logprobs(model, text, 256, 2, 2, score_from=32)
    assert half_cache != early_cache
    a = np.load(half_cache).reshape(2, 127, -1)
    b = np.load(early_cache).reshape(2, 255 - 32, -1)
    np.testing.assert_array_equal(a, b[:, 128 - 32 :])  # positions 128..254 of each chunk, in both
    with pytest.raises(EdgeMoEError, match="leaves nothing to score"):
        evaluate(q, model, text, ctx=256, max_chunks=2, threads=2, score_from=255)


def test_eval_asks_llama_cpp_for_the_scored_positions_logits_only(tiny_gguf, tmp_path):
    """evaluate decodes a chunk asking for the logits of the scored positions only (the head is then skipped for the
    others): they are bitwise the logits of the binding's own every-position evaluation, for a float and a
    quantized model, and a chunk after another starts from an empty cache."""
    from edgemoe_cli.evaluate import _chunk_logits, _chunks, _load

    model = tiny_gguf("pt")
    q = tmp_path / "q.gguf"
    quantize_mod.quantize(model, "q4_0-uniform", out=q, threads=2)
    text = SHARED_FIXTURES / "calib.txt"
    for path in (model, q):
        llm = _load(path, 256, 2, repack=False)
        try:
            chunks = _chunks(llm, text, 256, 2, spread=True)
            scored = [np.array(_chunk_logits(llm, c, 100)) for c in chunks]
            every = llama_cpp_every_position(path, chunks)
        finally:
            llm.close()
        for got, want in zip(scored, every):
            assert got.shape == (255 - 100, want.shape[1])
            np.testing.assert_array_equal(got, want[100:255])


def llama_cpp_every_position(path, chunks) -> list:
    """Every position's logits of each chunk, evaluated on its own as the binding does with logits_all (the same
    load as evaluate's: repacking off)."""
    from edgemoe_cli.evaluate import _load

    llm = _load(path, 256, 2, repack=False)
    llm._logits_all = True  # the binding's own every-position path (its scores hold n_batch = n_ctx rows)
    out = []
    try:
        for c in chunks:
            llm.reset()
            llm.eval(c)
            out.append(np.array(llm.scores[: len(c)], dtype=np.float32))
    finally:
        llm.close()
    return out


def test_quantizing_in_slabs_of_rows_writes_the_same_bytes(tiny_gguf, tmp_path, monkeypatch):
    """quantize bounds llama.cpp's buffers to SLAB_BYTES of rows (not a whole tensor's float32 copy); slabs that
    end mid-expert give the file a whole-tensor pass writes (each row quantized with its expert's imatrix)."""
    model = tiny_gguf("thinking")
    im = write_imatrix(tmp_path / "im.gguf", model)
    files = {}
    for slab in (0, 50_000):  # 0: llama.cpp's default (8 GiB: every tensor in one pass)
        monkeypatch.setattr(quantize_mod, "SLAB_BYTES", slab)
        files[slab] = tmp_path / f"slab{slab}.gguf"
        quantize_mod.quantize(model, "edge-balanced", out=files[slab], imatrix=im, threads=2, manifest=False)
    assert files[0].read_bytes() == files[50_000].read_bytes()


# a fresh process: its anonymous memory before and after _load, and the flag llama.cpp was given
_ANON_GROWTH = r"""
import sys
from pathlib import Path
from edgemoe_cli import evaluate, memwatch
from edgemoe_cli.llamacpp import import_binding
import_binding()
before = memwatch.process_rss()[0]
llm = evaluate._load(Path(sys.argv[1]), 16, 1, repack=sys.argv[2] == "1")
print(memwatch.process_rss()[0] - before, int(llm.model_params.use_extra_bufts))
"""


def test_plans_eval_path_keeps_weights_in_the_mapped_file(tiny_gguf, tmp_path):
    """plan evaluates without repacking: a Q4_0 model's weights stay pages of the file, where the repacked load
    (`edgemoe eval`'s) copies every Q4_0 tensor into anonymous memory, which must then fit in RAM whole."""
    from pathlib import Path

    from edgemoe_cli.recipe import tensor_bytes

    q4 = tmp_path / "q4_0.gguf"
    quantize_mod.quantize(tiny_gguf("thinking"), "stock:Q4_0", out=q4, threads=2, manifest=False)
    q4_bytes = sum(tensor_bytes(t.n_elements, t.type) for t in read_tensors(q4)[0] if t.type == "q4_0")
    growth = {}
    for repack in (True, False):
        out = subprocess.run(
            [sys.executable, "-c", _ANON_GROWTH, str(q4), str(int(repack))],
            cwd=Path(__file__).resolve().parents[1],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        growth[repack] = int(out[0])
        assert bool(int(out[1])) == repack  # what llama.cpp was asked for
    if growth[True] - growth[False] < q4_bytes / 10:
        pytest.skip("this CPU has no repacked Q4_0 kernels: both loads keep the weights in the mapped file")
    assert growth[True] - growth[False] >= 0.9 * q4_bytes


@pytest.mark.parametrize(
    "args, needle",
    [
        (["quantize", "/nope.gguf", "--recipe", "edge-balanced"], "model /nope.gguf does not exist"),
        (["quantize", "{model}", "--recipe", "nope"], "no recipe named 'nope'"),
        (["quantize", "{model}", "--recipe", "stock:Q9_X"], "unknown llama.cpp file type"),
        (["eval", "{model}", "--base", "{model}", "--text", "/nope.txt"], "text /nope.txt does not exist"),
        (["imatrix", "{model}", "--text", "/nope.txt"], "does not exist"),
    ],
)
def test_bad_input_is_one_red_line_exit_2(tiny_gguf, args, needle):
    model = str(tiny_gguf("thinking"))
    out = subprocess.run(
        [sys.executable, "-m", "edgemoe_cli.cli"] + [a.replace("{model}", model) for a in args],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_llama_imatrix_on_the_fixture(tiny_gguf, tmp_path):
    from edgemoe_cli.imatrix import compute_imatrix, expert_usage, read_imatrix
    from edgemoe_cli.llamacpp import find_tool

    try:
        find_tool("llama-imatrix")
    except EdgeMoEError:
        pytest.skip("llama-imatrix not built: run `edgemoe build` first")
    model = tiny_gguf("thinking")
    res = compute_imatrix(model, None, tmp_path / "im.gguf", ctx=256, threads=2)
    im = read_imatrix(res.out)
    assert res.chunks >= 1 and "blk.1.ffn_down_exps.weight" in im.entries
    usage = expert_usage(res.out)
    assert usage.shape == (4, 16) and np.allclose(usage[1:].sum(axis=1), 1.0)
    quantize_mod.quantize(model, "edge-small", out=tmp_path / "q.gguf", imatrix=res.out, threads=2)
