"""qerror: plan's error E(W,t) scored in process on a row sample. Its anchor is llama.cpp itself: the rows it
quantizes are byte for byte what llama-quantize writes, and every row gives plan.tensor_errors' numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edgemoe_cli import plan, qerror
from edgemoe_cli.errors import EdgeMoEError
from edgemoe_cli.imatrix import read_imatrix
from edgemoe_cli.recipe import quantizable, read_tensors

sys.path.insert(0, str(Path(__file__).parent))
from test_quantize import write_imatrix  # noqa: E402


@pytest.fixture(scope="module")
def whole(tiny_gguf, tmp_path_factory):
    """(model, imatrix path, {type: llama.cpp's whole-model quantization with plan's recipe for it})."""
    from edgemoe_cli.quantize import quantize

    work = tmp_path_factory.mktemp("qerror")
    model = tiny_gguf("thinking", "bf16")
    im = write_imatrix(work / "im.gguf", model)
    targets = [t for t in read_tensors(model)[0] if quantizable(t)]
    out = {}
    for ty in plan.DEFAULT_TYPES:
        fits = [t.name for t in targets if t.shape[0] % plan._block(ty) == 0]
        out[ty] = quantize(
            model, plan._uniform(ty, fits), out=work / f"{ty}.gguf", imatrix=im, threads=2, manifest=False
        ).out
    return model, im, out


def test_every_row_gives_tensor_errors_on_llama_cpps_output(whole):
    """Fraction 1: the same E as quantizing the whole model with llama.cpp and scoring its file, every type."""
    model, im, quantized = whole
    imx = read_imatrix(im)
    names = [t.name for t in read_tensors(model)[0] if quantizable(t)]
    ours = qerror.sampled_errors(model, imx, names, plan.DEFAULT_TYPES, fraction=1.0, threads=2)
    for ty, path in quantized.items():
        fits = [n for n in names if ty in ours[n]]
        assert fits, ty
        reference = plan.tensor_errors(model, path, imx, fits)
        for n in fits:
            assert ours[n][ty] == pytest.approx(reference[n], rel=1e-9), (n, ty)
    # a type is scored exactly where plan measured it before: where its block divides the rows
    assert {n for n in names if "iq4_xs" in ours[n]} == {
        n for n in names if next(t for t in read_tensors(model)[0] if t.name == n).shape[0] % 256 == 0
    }


def test_sampled_rows_are_llama_cpps_bytes(whole):
    """Quantization is per row (with the row's expert's importance): a sampled row's bytes are llama-quantize's."""
    import gguf

    model, im, quantized = whole
    imx = read_imatrix(im)
    src = {t.name: t for t in gguf.GGUFReader(model).tensors}
    for ty, path in quantized.items():
        for t in gguf.GGUFReader(path).tensors:
            if t.tensor_type.name.lower() != ty:
                continue
            s = src[t.name]
            n_per_row, n_rows = int(s.shape[0]), int(s.shape[1])
            n_strata = int(s.shape[2]) if len(s.shape) > 2 else 1
            kind = qerror._kind(ty, n_per_row)
            theirs = np.asarray(t.data).view(np.uint8).reshape(n_strata, n_rows, kind.row_bytes)
            importance = qerror._importance(t.name, imx.entries.get(t.name), n_strata, n_per_row)
            for stratum in {0, n_strata - 1}:
                rows, _ = qerror.sample_rows(t.name, stratum, n_rows, n_strata, 0.1, min_rows=8)
                ours = qerror.quantize_rows(
                    kind,
                    qerror._rows_f32(s, stratum, rows, n_per_row),
                    None if importance is None else importance[stratum],
                )
                assert np.array_equal(ours, theirs[stratum][rows]), (t.name, ty, stratum)


def test_sample_is_stratified_seeded_and_deterministic():
    rows, weights = qerror.sample_rows("blk.3.ffn_up_exps.weight", 5, 1536, 64, 1 / 16)
    again, _ = qerror.sample_rows("blk.3.ffn_up_exps.weight", 5, 1536, 64, 1 / 16)
    other, _ = qerror.sample_rows("blk.3.ffn_up_exps.weight", 6, 1536, 64, 1 / 16)
    reseeded, _ = qerror.sample_rows("blk.3.ffn_up_exps.weight", 5, 1536, 64, 1 / 16, seed=1)
    assert len(rows) == 96 and np.array_equal(rows, again)
    assert not np.array_equal(rows, other) and not np.array_equal(rows, reseeded)
    # one row from each of 96 equal runs of 16 rows; the weights stand for all 1536 rows
    assert np.array_equal(rows // 16, np.arange(96)) and weights.sum() == 1536
    # the per-tensor floor spreads over the experts; a 2-D tensor takes it whole; never more rows than there are
    assert len(qerror.sample_rows("x", 0, 1536, 64, 1 / 256, min_rows=512)[0]) == 8
    assert len(qerror.sample_rows("x", 0, 2560, 1, 1 / 256, min_rows=512)[0]) == 512
    assert np.array_equal(qerror.sample_rows("x", 0, 100, 1, 1 / 16, min_rows=512)[0], np.arange(100))


def test_sampled_errors_are_deterministic_and_close(whole):
    """The same sample (and estimate) every run; on the fixture within a few percent of every row's E."""
    model, im, _ = whole
    imx = read_imatrix(im)
    names = [t.name for t in read_tensors(model)[0] if quantizable(t)]
    types = ("q3_k", "q4_k", "q8_0")
    kw = dict(fraction=1 / 16, min_rows=64, threads=2)
    a = qerror.sampled_errors(model, imx, names, types, **kw)
    b = qerror.sampled_errors(model, imx, names, types, **kw)
    full = qerror.sampled_errors(model, imx, names, types, fraction=1.0)
    assert a == b
    sampled = [n for n in names if n.endswith("_exps.weight") or n == "token_embd.weight"]
    assert sampled and any(a[n]["q4_k"] != full[n]["q4_k"] for n in sampled)  # those were sampled, not whole
    for n in names:
        for ty in a[n]:
            assert a[n][ty] == pytest.approx(full[n][ty], rel=0.1), (n, ty)
            # the types are scored on the same rows: their order is kept
        assert a[n]["q3_k"] > a[n]["q4_k"] > a[n]["q8_0"]


def test_a_quantized_source_is_refused(whole):
    import gguf

    model, im, quantized = whole
    t = next(x for x in gguf.GGUFReader(quantized["q4_k"]).tensors if x.tensor_type.name == "Q4_K")
    with pytest.raises(EdgeMoEError, match="not f32/f16/bf16"):
        qerror.tensor_sample_errors(t, ["q4_k"], read_imatrix(im))


def test_a_sampled_plan_gives_a_valid_recipe(whole, tmp_path):
    """plan on the fixture with the default sample: its measurements say so, the recipe quantizes under budget."""
    from edgemoe_cli.quantize import quantize

    model, im, quantized = whole
    text = Path(__file__).resolve().parents[1] / "data" / "calib" / "calibration.txt"
    budget = Path(quantized["q4_k"]).stat().st_size
    res = plan.plan(model, im, text, max_size=budget, out=tmp_path / "p.toml", threads=2, max_chunks=1)
    m = plan.measure(model, im, text, max_chunks=1, threads=2)  # from the cache plan just filled
    assert m.error_sample == qerror.DEFAULT_FRACTION and m.seconds["errors"] > 0
    assert {n for n in m.errors} == {t.name for t in read_tensors(model)[0] if quantizable(t)}
    assert res.predicted_bytes <= budget
    p = quantize(model, tmp_path / "p.toml", out=tmp_path / "p.gguf", imatrix=im, threads=2, manifest=False)
    assert p.bytes <= budget + 4096
    assert {c.type for c in res.choices} <= set(plan.DEFAULT_TYPES)
