"""plan: the budget formula, the exact knapsack, choices that follow measured sensitivities, end to end."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

from edgemoe_cli import plan
from edgemoe_cli.errors import EdgeMoEError
from edgemoe_cli.recipe import TensorInfo, resolve
from edgemoe_cli.units import parse_size


def test_parse_size():
    assert parse_size("12GiB") == 12 * 1024**3
    assert parse_size("11.5 GB") == 11_500_000_000
    assert parse_size("800MiB") == 800 * 1024**2
    assert parse_size("123456") == 123456
    with pytest.raises(EdgeMoEError, match="cannot read the size"):
        parse_size("twelve")


def test_knapsack_is_exact_on_small_cases():
    rng = np.random.default_rng(1)
    for _ in range(20):
        options = {f"g{i}": {t: (int(rng.integers(10, 100)), float(rng.random())) for t in "abc"} for i in range(5)}
        budget = int(rng.integers(150, 400))
        feasible = [
            (sum(options[g][t][1] for g, t in zip(options, combo)), combo)
            for combo in itertools.product("abc", repeat=5)
            if sum(options[g][t][0] for g, t in zip(options, combo)) <= budget
        ]
        if not feasible:
            with pytest.raises(ValueError):
                plan.solve(options, budget, bins=budget)
            continue
        best = min(feasible)
        got = plan.solve(options, budget, bins=budget)  # unit = 1 byte: exact
        assert sum(options[g][got[g]][0] for g in options) <= budget
        assert sum(options[g][got[g]][1] for g in options) == pytest.approx(best[0])


def _fake(names_shapes, gains):
    tensors = [TensorInfo(n, s, "f32", int(np.prod(s))) for n, s in names_shapes]
    types = ["q2_k", "q4_k", "q8_0"]
    # error falls with bits the same way for every tensor; gains decide who deserves bits
    scale = {"q2_k": 1.0, "q4_k": 0.1, "q8_0": 0.001}
    errors = {t.name: {ty: scale[ty] * t.n_elements / 1e5 for ty in types} for t in tensors}
    m = plan.Measurements("m.gguf", "im.gguf", "t.txt", types, "q2_k", errors, gains, {}, {})
    return tensors, m


def test_plan_respects_the_budget_and_follows_sensitivities():
    shapes = [
        ("token_embd.weight", (256, 8192)),
        ("blk.1.attn_q.weight", (256, 256)),
        ("blk.1.ffn_up_exps.weight", (256, 256, 16)),
        ("blk.1.ffn_down_exps.weight", (256, 256, 16)),
        ("blk.1.attn_norm.weight", (256,)),
    ]
    tensors, m = _fake(shapes, {"token_embd": 1.0, "attn_q": 1.0, "ffn_up_exps": 0.01, "ffn_down_exps": 1.0})
    for budget in (3_000_000, 4_000_000, 5_000_000):
        p = plan.plan_from_measurements(m, tensors, 1000, budget)
        assert p.predicted_bytes <= budget
        types = {c.tensor: c.type for c in p.choices}
        # the same shape, 100x less sensitive: never more bits than its sensitive twin
        order = ["q2_k", "q4_k", "q8_0"]
        assert order.index(types["blk.1.ffn_up_exps.weight"]) <= order.index(types["blk.1.ffn_down_exps.weight"])
        # the written recipe reproduces the plan exactly
        recipe = load_recipe_text(p.recipe_toml)
        plans, problems = resolve(recipe, tensors)
        assert {x.name: x.type for x in plans if x.rule != "not quantized"} == types
        assert not [x for x in problems if x.severity == "error"]
    with pytest.raises(EdgeMoEError, match="below the smallest mix"):
        plan.plan_from_measurements(m, tensors, 1000, 100_000)
    # more budget never predicts more loss
    kl = [plan.plan_from_measurements(m, tensors, 1000, b).predicted_kld for b in (2_500_000, 3_500_000, 6_000_000)]
    assert kl[0] >= kl[1] >= kl[2]


def load_recipe_text(text):
    import tomllib

    from edgemoe_cli.recipe import parse_recipe

    return parse_recipe(tomllib.loads(text), "plan.toml")


def test_file_budget_formula(tiny_gguf):
    from edgemoe_cli.board import RUNTIME_RESERVE_BYTES, kv_cache_bytes

    model = tiny_gguf("thinking")
    budget, formula = plan.file_budget(model, ram=2 * 1024**3, ctx=4096)
    # the fixture: 4 layers, 2 KV heads, head size 256/4 = 64
    assert budget == 2 * 1024**3 - kv_cache_bytes(4096, n_layers=4, n_kv_heads=2, head_dim=64) - RUNTIME_RESERVE_BYTES
    assert "KV cache for 4096 tokens" in formula and "runtime reserve" in formula
    assert plan.file_budget(model, max_size=5_000_000)[0] == 5_000_000


def test_plan_cli_bad_input_is_one_line(tiny_gguf):
    model = str(tiny_gguf("thinking"))
    for args, needle in (
        (["plan", model], "give exactly one of --budget, --board or --max-size"),
        (["plan", model, "--budget", "lots"], "cannot read the size 'lots'"),
        (["plan", "/nope.gguf", "--max-size", "5MB", "--imatrix", "/nope.im"], "does not exist"),
        (["plan", model, "--max-size", "5MB", "--error-sample", "0"], "--error-sample 0 is not in (0, 1]"),
    ):
        out = subprocess.run([sys.executable, "-m", "edgemoe_cli.cli"] + args, capture_output=True, text=True)
        assert out.returncode == 2 and needle in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_plan_end_to_end_on_the_fixture(tiny_gguf, tmp_path):
    """Measured gains, a plan under budget, applied; its measured KLD beats uniform Q4_0 at no larger size."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_quantize import write_imatrix

    from edgemoe_cli.evaluate import evaluate
    from edgemoe_cli.quantize import quantize

    model = tiny_gguf("thinking")
    text = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "calib" / "calibration.txt"
    im = write_imatrix(tmp_path / "im.gguf", model)
    q4 = quantize(model, "q4_0-uniform", out=tmp_path / "q4.gguf", imatrix=im, threads=2)
    res = plan.plan(model, im, text, max_size=q4.bytes, out=tmp_path / "p.toml", threads=2, max_chunks=2)
    assert res.predicted_bytes <= q4.bytes
    assert res.gains["token_embd"] > 0 and set(res.calibration_kld) >= {"attn_q", "ffn_down_exps", "token_embd"}
    p = quantize(model, tmp_path / "p.toml", out=tmp_path / "p.gguf", imatrix=im, threads=2)
    assert p.bytes <= q4.bytes + 4096
    e_p = evaluate(tmp_path / "p.gguf", model, text, ctx=256, max_chunks=4, threads=2)
    e_q = evaluate(tmp_path / "q4.gguf", model, text, ctx=256, max_chunks=4, threads=2)
    assert e_p.kld_mean < e_q.kld_mean


def test_tensors_every_token_uses_keep_at_least_the_floor():
    shapes = [
        ("token_embd.weight", (256, 8192)),
        ("blk.1.attn_q.weight", (256, 256)),
        ("blk.1.ffn_up_exps.weight", (256, 256, 16)),
    ]
    # attn_q made insensitive: without the floor the cheapest type wins, with it never below q4_k
    tensors, m = _fake(shapes, {"token_embd": 1.0, "attn_q": 1e-9, "ffn_up_exps": 1e-9})
    # token_embd q4_k + experts q2_k + attn_q q2_k = 1,545,216 bytes; attn_q at q4_k adds 15,360
    free = {
        c.tensor: c.type for c in plan.plan_from_measurements(m, tensors, 0, 1_550_000, min_every_token=None).choices
    }
    floored = {c.tensor: c.type for c in plan.plan_from_measurements(m, tensors, 0, 1_600_000).choices}
    assert free["blk.1.attn_q.weight"] == "q2_k" and floored["blk.1.attn_q.weight"] in ("q4_k", "q8_0")
    assert floored["blk.1.ffn_up_exps.weight"] == "q2_k"  # routed experts are not floored


@pytest.mark.parametrize("reference", ["source", "q8_0"])
def test_assembled_calibration_model_is_what_llama_cpp_writes(tiny_gguf, tmp_path, reference):
    """A calibration model assembled from whole-model quantizations (one role from the Q3_K file, the rest from the
    reference) has, tensor for tensor, the types and bytes llama.cpp writes when it quantizes that mix itself."""
    import gguf

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_quantize import write_imatrix

    from edgemoe_cli.quantize import quantize
    from edgemoe_cli.recipe import quantizable, read_tensors

    model = tiny_gguf("thinking")
    im = write_imatrix(tmp_path / "im.gguf", model)
    targets = [t for t in read_tensors(model)[0] if quantizable(t)]
    members = [t.name for t in targets if plan.role(t.name) == "ffn_down_exps"] + ["blk.0.attn_q.weight"]
    whole = {}
    for ty in ("q3_k", "q8_0"):
        fits = [t.name for t in targets if t.shape[0] % plan._block(ty) == 0]
        whole[ty] = quantize(
            model, plan._uniform(ty, fits), out=tmp_path / f"{ty}.gguf", imatrix=im, manifest=False
        ).out
    base = model if reference == "source" else whole["q8_0"]
    keep = targets if reference == "source" else None
    direct = quantize(
        model, plan._uniform("q3_k", members, keep), out=tmp_path / "direct.gguf", imatrix=im, manifest=False
    ).out
    n = plan.assemble(base, {m: whole["q3_k"] for m in members}, tmp_path / "assembled.gguf")

    a, d = gguf.GGUFReader(tmp_path / "assembled.gguf"), gguf.GGUFReader(direct)
    # the same tensors (llama.cpp may order them differently; names are what it loads by)
    by_name = {t.name: t for t in d.tensors}
    assert sorted(t.name for t in a.tensors) == sorted(by_name)
    for x in a.tensors:
        y = by_name[x.name]
        assert x.tensor_type == y.tensor_type, x.name
        # shapes agree but for trailing 1s (llama.cpp writes n_dims without them: [16, 1] -> [16])
        assert (
            np.trim_zeros(np.asarray(x.shape) - 1, "b").tolist() == np.trim_zeros(np.asarray(y.shape) - 1, "b").tolist()
        )
        assert np.array_equal(np.asarray(x.data).view(np.uint8).ravel(), np.asarray(y.data).view(np.uint8).ravel())
    assert n == sum(int(t.n_bytes) for t in d.tensors)
    assert a.get_field("general.file_type").contents() == d.get_field("general.file_type").contents()
    assert {t.name for t in a.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q3_K} == set(members)


def test_assemble_refuses_a_file_of_another_model(tiny_gguf, tmp_path):
    import gguf

    other = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(other, "ernie4_5-moe")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EdgeMoEError, match="has no tensor blk.0.attn_q.weight of shape"):
        plan.assemble(tiny_gguf("thinking"), {"blk.0.attn_q.weight": other}, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_layer_stride_measures_the_dense_the_first_routed_every_kth_and_the_last():
    layers = list(range(28))  # ERNIE-4.5-21B-A3B: layer 0 dense, 1-27 routed
    assert plan.measured_layers(layers, 1, 1) == layers
    assert plan.measured_layers(layers, 4, 1) == [0, 1, 5, 9, 13, 17, 21, 25, 27]
    assert plan.measured_layers(layers, 3, 1) == [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 27]
    assert plan.measured_layers(layers, 100, 1) == [0, 1, 27]
    assert plan.measured_layers([0, 1, 2, 3], 2, 1) == [0, 1, 3]  # the fixtures: only layer 2 is left out
    assert plan.measured_layers([0, 1, 2, 3, 4], 2, None) == [0, 2, 4]  # no routed layer: from the first


def _separable(gain: dict[str, float], factor: dict[int, float], rng) -> tuple[dict, dict, dict]:
    """Errors of a role x layer model with random sizes, and the KLDs it implies when one role or one layer is
    lowered: what plan measures, without noise."""
    err = {f"blk.{b}.{r}.weight": float(rng.uniform(0.5, 2.0)) for r in gain for b in factor}
    err["token_embd.weight"] = 3.0
    gain = {**gain, "token_embd": 0.01}
    role_kld = {
        r: sum(gain[r] * factor.get(int(plan.layer(n) or -1), 1.0) * e for n, e in err.items() if plan.role(n) == r)
        for r in gain
    }
    layer_kld = {
        str(b): sum(gain[plan.role(n)] * factor[b] * e for n, e in err.items() if plan.layer(n) == str(b))
        for b in factor
    }
    return err, role_kld, layer_kld


def test_fit_recovers_a_separable_model_from_a_layer_subset():
    """Depth factors falling geometrically (as they do on the fixtures) are recovered exactly from every 4th layer:
    the interpolated layers' factors, and the gains fitted with them, are the true ones."""
    rng = np.random.default_rng(3)
    true_gain = {"attn_q": 0.2, "ffn_down_exps": 0.05, "ffn_up_exps": 0.01}
    true_factor = {b: 0.8**b for b in range(12)}
    err, role_kld, layer_kld = _separable(true_gain, true_factor, rng)
    measured = plan.measured_layers(list(true_factor), 4, 1)
    g, f, _ = plan.fit_role_layer(err, role_kld, {str(b): layer_kld[str(b)] for b in measured}, iterations=200)
    assert set(f) == {str(b) for b in true_factor}  # every layer gets a factor, measured or not
    for n, e in err.items():  # gain x factor is identifiable (their split is not): compare predictions
        b = plan.layer(n)
        truth = ({**true_gain, "token_embd": 0.01})[plan.role(n)] * (true_factor[int(b)] if b else 1.0) * e
        assert g[plan.role(n)] * f.get(b, 1.0) * e == pytest.approx(truth, rel=1e-3), n
    # the interpolation itself: geometric between the nearest measured layers, constant beyond them
    got = plan.interpolate_factors({1: 0.08, 5: 0.005, 7: 0.0}, [0, 1, 2, 3, 5, 6, 7, 9])
    assert got[0] == 0.08 and got[9] == 0.0
    assert got[3] == pytest.approx((0.08 * 0.005) ** 0.5)
    assert got[2] == pytest.approx(0.08 * (0.005 / 0.08) ** 0.25)
    assert got[6] == pytest.approx(0.0025)  # a zero neighbour: linear


def test_fit_with_role_runs_on_the_measured_layers_only():
    """Routed experts are lowered in their role runs only in the measured layers (role_members): the fit recovers
    the same predictions as from role runs over every layer, where summing the role's every tensor would not."""
    rng = np.random.default_rng(6)
    gain = {"attn_q": 0.2, "ffn_gate_exps": 0.02, "ffn_down_exps": 0.05}
    factor = {b: 0.8**b for b in range(12)}
    err, role_kld, layer_kld = _separable(gain, factor, rng)
    measured = plan.measured_layers(list(factor), 4, 1)
    members = {
        r: {n for n in err if plan.role(n) == r and int(plan.layer(n)) in measured} for r in gain if "_exps" in r
    }
    for r, names in members.items():  # what those runs measure: the role's KLD over the measured layers only
        role_kld[r] = sum(gain[r] * factor[int(plan.layer(n))] * err[n] for n in names)
    layers = {str(b): layer_kld[str(b)] for b in measured}
    g, f, _ = plan.fit_role_layer(err, role_kld, layers, iterations=200, role_members=members)
    for n, e in err.items():
        b = plan.layer(n)
        truth = ({**gain, "token_embd": 0.01})[plan.role(n)] * (factor[int(b)] if b else 1.0) * e
        assert g[plan.role(n)] * f.get(b, 1.0) * e == pytest.approx(truth, rel=1e-3), n
    g_all, _, _ = plan.fit_role_layer(err, role_kld, layers, iterations=200)
    assert g_all["ffn_down_exps"] < 0.8 * g["ffn_down_exps"]  # without the members: the gain understated


def test_probe_lowers_routed_experts_only_in_the_measured_layers(tiny_gguf, tmp_path):
    """With a layer stride the calibration type quantizes every lowerable tensor but the routed experts of the
    layers not measured, the expert role runs lower those of the measured layers, and what llama.cpp makes of the
    probed tensors alone is byte for byte its whole-model quantization's."""
    import gguf

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_quantize import write_imatrix

    from edgemoe_cli.qerror import DEFAULT_FRACTION
    from edgemoe_cli.quantize import quantize
    from edgemoe_cli.recipe import read_tensors

    model = tiny_gguf("thinking")
    im = write_imatrix(tmp_path / "im.gguf", model)
    tensors, _ = read_tensors(model)
    text = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "calib" / "calibration.txt"
    args = (model, tensors, im, text, plan.DEFAULT_TYPES, "q3_k", 512, 1, "source", DEFAULT_FRACTION, 2)
    steps = {s.name: s for s in plan.measure_steps(*args, floor=False)}
    probe = steps["quantize q3_k"].members
    assert not any(plan.layer(n) == "2" and "_exps" in n for n in probe)  # stride 2 on 4 layers skips layer 2
    assert any(plan.layer(n) == "2" for n in probe) and any(plan.layer(n) == "3" and "_exps" in n for n in probe)
    assert {plan.layer(n) for n in steps["role ffn_up_exps"].members} == {"1", "3"}
    assert len({plan.layer(n) for n in steps["role attn_q"].members}) == 4
    whole = quantize(model, plan._uniform("q3_k", probe), out=tmp_path / "whole.gguf", imatrix=im, manifest=False).out
    plan.copy_tensors(model, probe, tmp_path / "probe.gguf")
    alone = quantize(tmp_path / "probe.gguf", plan._uniform("q3_k", probe), out=tmp_path / "alone.gguf", imatrix=im)
    w = {t.name: t for t in gguf.GGUFReader(whole).tensors}
    a = {t.name: t for t in gguf.GGUFReader(alone.out).tensors}
    assert sorted(a) == sorted(probe)
    for n in probe:
        assert (
            a[n].tensor_type == w[n].tensor_type and np.asarray(a[n].data).tobytes() == np.asarray(w[n].data).tobytes()
        )
    # the calibration model: every matrix sharded, the unprobed ones only in the reference's version
    cm = plan.CalibrationModel(model, alone.out, tmp_path)
    assert set(cm.sharded) == {t.name for t in tensors if plan.quantizable(t)}
    assert cm.holds["low"] == set(probe)


def test_stride_one_fit_is_the_full_fit():
    rng = np.random.default_rng(4)
    err, role_kld, layer_kld = _separable({"attn_v": 0.3, "ffn_gate_exps": 0.02}, {0: 1.0, 1: 0.5, 2: 0.3}, rng)
    g, f, _ = plan.fit_role_layer(err, role_kld, layer_kld, iterations=200)
    for b, k in layer_kld.items():
        assert sum(g[plan.role(n)] * f[b] * e for n, e in err.items() if plan.layer(n) == b) == pytest.approx(k)


def test_last_layers_experts_get_their_own_factor():
    """When the last layer's routed experts cost more than that layer's one factor says (as on the fixtures), the
    run that lowers only them gives them a factor of their own: the fit then predicts them as measured, where one
    factor per layer underestimated them; the other layers' predictions stay close."""
    rng = np.random.default_rng(5)
    gain = {"attn_q": 0.2, "ffn_gate_exps": 0.02, "ffn_down_exps": 0.05}
    factor = {b: 0.8**b for b in range(6)}
    err, role_kld, layer_kld = _separable(gain, factor, rng)
    last = [n for n in err if plan.layer(n) == "5" and "_exps" in n]
    for n in last:  # the truth: those experts cost twice what the separable model says
        extra = gain[plan.role(n)] * factor[5] * err[n]
        role_kld[plan.role(n)] += extra
        layer_kld["5"] += extra
    expert_kld = {"5": sum(2 * gain[plan.role(n)] * factor[5] * err[n] for n in last)}
    assert plan.expert_factor_layers(list(factor), [1, 2, 3, 4, 5]) == [5]
    assert plan.expert_factor_layers(list(factor), [1, 2, 3]) == []  # a dense last layer: no such run

    def predicted(g, f, fe, names):
        return sum(g[plan.role(n)] * plan.depth_factor(n, f, fe) * err[n] for n in names)

    g, f, fe = plan.fit_role_layer(err, role_kld, layer_kld, expert_kld, iterations=200)
    assert set(fe) == {"5"}
    assert predicted(g, f, fe, last) == pytest.approx(expert_kld["5"])
    g1, f1, fe1 = plan.fit_role_layer(err, role_kld, layer_kld, iterations=200)
    assert fe1 == {} and predicted(g1, f1, fe1, last) < 0.8 * expert_kld["5"]
    for b in range(5):  # the other layers' predictions within 10% of their measured KLD
        names = [n for n in err if plan.layer(n) == str(b)]
        assert predicted(g, f, fe, names) == pytest.approx(layer_kld[str(b)], rel=0.1)


def test_measurement_cache_key_follows_the_calibration_knobs(tmp_path):
    files = [tmp_path / n for n in ("m.gguf", "im.gguf", "t.txt")]
    for p in files:
        p.write_text(p.name)

    def key(chunks, stride):
        return plan._cache_path(*files, plan.DEFAULT_TYPES, "q3_k", chunks, "source", layer_stride=stride)

    keys = {key(c, s) for c in (2, 4, 16) for s in (1, 4)}
    assert len(keys) == 6
    assert key(4, 4) == key(4, 4)

    # the positions a calibration chunk scores: the second half keeps the key it had before there was a choice
    def scored(score_from):
        return plan._cache_path(*files, plan.DEFAULT_TYPES, "q3_k", 4, "source", layer_stride=4, score_from=score_from)

    assert scored(256) == scored(None) == key(4, 4)
    assert len({scored(256), scored(64), scored(32)}) == 3


def test_cli_defaults_are_plans():
    from edgemoe_cli.cli import plan as cli_plan

    assert (cli_plan.DEFAULT_CHUNKS, cli_plan.DEFAULT_LAYER_STRIDE) == (plan.DEFAULT_CHUNKS, plan.DEFAULT_LAYER_STRIDE)


def test_layer_stride_below_one_is_refused(tmp_path, tiny_gguf):
    text = tmp_path / "t.txt"
    text.write_text("text")
    with pytest.raises(EdgeMoEError, match="layer stride 0 is below 1"):
        plan.measure(tiny_gguf("thinking"), text, text, layer_stride=0)


@pytest.mark.slow
def test_plan_with_a_layer_stride_on_the_fixture(tiny_gguf, tmp_path):
    """A strided measurement evaluates fewer layers, still gives every layer a factor, and its plan is a valid
    recipe within the budget that llama.cpp applies as written."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_quantize import write_imatrix

    from edgemoe_cli.quantize import quantize
    from edgemoe_cli.recipe import load_recipe, read_tensors

    model = tiny_gguf("thinking")
    text = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "calib" / "calibration.txt"
    im = write_imatrix(tmp_path / "im.gguf", model)
    m = plan.measure(model, im, text, max_chunks=1, threads=2, workdir=tmp_path, layer_stride=2)
    assert set(m.layer_kld) == {"0", "1", "3"} and set(m.layer_factors) == {"0", "1", "2", "3"}
    # roles, 3 layers, the last layer's routed experts, the two activation runs (the floor is opt-in)
    assert m.layer_stride == 2 and m.work["runs"] == len(m.gains) + 4 + len(plan.ACTIVATION_RUNS)
    assert set(m.activation_kld) == set(plan.ACTIVATION_RUNS) and m.activation_excess >= 0
    assert set(m.expert_kld) == set(m.expert_factors) == {"3"}
    lo, hi = m.layer_factors["1"], m.layer_factors["3"]
    assert min(lo, hi) <= m.layer_factors["2"] <= max(lo, hi)
    assert set(m.kld_stderr) >= {"layer:3", "experts:3", "role:attn_q"} and not m.floor_measured
    budget = 9_000_000
    res = plan.plan(model, im, text, max_size=budget, out=tmp_path / "p.toml", threads=2, max_chunks=1, layer_stride=2)
    assert res.predicted_bytes <= budget
    q = quantize(model, load_recipe(tmp_path / "p.toml"), out=tmp_path / "p.gguf", imatrix=im, threads=2)
    written = {t.name: t.type for t in read_tensors(tmp_path / "p.gguf")[0]}
    assert all(written[c.tensor] == c.type for c in res.choices)
    assert q.bytes <= budget + 4096


def test_calibration_model_from_shards_is_the_assembled_model(tiny_gguf, tmp_path):
    """Run after run, the split calibration model has every tensor's type and bytes and the file_type of the model
    `assemble` writes for the same mix (which the test above checks against llama.cpp's own), writes only its first
    shard per run, and llama.cpp evaluates it exactly as the assembled file."""
    import gguf

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_quantize import write_imatrix

    from edgemoe_cli.evaluate import evaluate
    from edgemoe_cli.quantize import quantize
    from edgemoe_cli.recipe import quantizable, read_tensors

    model = tiny_gguf("thinking")
    im = write_imatrix(tmp_path / "im.gguf", model)
    targets = [t for t in read_tensors(model)[0] if quantizable(t)]
    fits = [t.name for t in targets if t.shape[0] % plan._block("q3_k") == 0]
    low = quantize(model, plan._uniform("q3_k", fits), out=tmp_path / "q3.gguf", imatrix=im, manifest=False).out
    cm = plan.CalibrationModel(model, low, tmp_path)
    runs = [
        [n for n in fits if plan.role(n) == "ffn_down_exps"],
        [n for n in fits if plan.layer(n) == "1"],
        fits,
        ["token_embd.weight"],
        [],
    ]
    text = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "calib" / "calibration.txt"
    small = sum(t.n_bytes for t in gguf.GGUFReader(model).tensors if t.name not in cm.sharded)
    for i, members in enumerate(runs):
        assert cm.set(members) == small  # the first shard's tensors: norms and routers, never a lowered one
        plan.assemble(model, {n: low for n in members}, tmp_path / "assembled.gguf")
        a = gguf.GGUFReader(tmp_path / "assembled.gguf")
        shards = [gguf.GGUFReader(cm.shard(k)) for k in range(cm.n)]
        got = {t.name: t for r in shards for t in r.tensors}
        assert sorted(got) == sorted(t.name for t in a.tensors)
        for y in a.tensors:
            x = got[y.name]
            assert x.tensor_type == y.tensor_type and list(x.shape) == list(y.shape), y.name
            assert np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)), y.name
        assert shards[0].get_field("general.file_type").contents() == a.get_field("general.file_type").contents()
        if i in (0, 2):
            e_c = evaluate(cm.path, model, text, ctx=256, max_chunks=1, threads=2)
            e_a = evaluate(tmp_path / "assembled.gguf", model, text, ctx=256, max_chunks=1, threads=2)
            assert e_c.kld_mean == e_a.kld_mean and e_c.kld_mean > 0


def test_activation_run_from_shards_is_the_whole_model_quantization(tiny_gguf, tmp_path):
    """An activation run quantizes only the tensors every token uses (copied out of the source) and points their
    shards at that: every tensor's type and bytes are those of llama.cpp's whole-model quantization with the rest
    kept in the source type, which plan ran before; and its KLD is that model's."""
    import gguf

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_quantize import write_imatrix

    from edgemoe_cli.evaluate import evaluate
    from edgemoe_cli.quantize import quantize
    from edgemoe_cli.recipe import quantizable, read_tensors

    model = tiny_gguf("pt")
    im = write_imatrix(tmp_path / "im.gguf", model)
    tensors = read_tensors(model)[0]
    targets = [t for t in tensors if quantizable(t)]
    fits = [t.name for t in targets if t.shape[0] % plan._block("q3_k") == 0]
    every = [t.name for t in targets if "_exps" not in t.name and t.shape[0] % 256 == 0]
    assert every and len(every) < len(fits)
    low = quantize(model, plan._uniform("q3_k", fits), out=tmp_path / "q3.gguf", imatrix=im, manifest=False).out
    cm = plan.CalibrationModel(model, low, tmp_path)
    alone = tmp_path / "alone.gguf"
    copied = plan.copy_tensors(model, every, alone)
    assert sorted(t.name for t in gguf.GGUFReader(alone).tensors) == sorted(every)
    assert copied == sum(t.n_bytes for t in gguf.GGUFReader(model).tensors if t.name in every)
    part = quantize(alone, plan._uniform("q6_k", every), out=tmp_path / "part.gguf", imatrix=im, manifest=False).out
    assert cm.add_version("act", part) > 0
    cm.set(every, "act")
    keep = [t for t in tensors if t.name not in every]
    whole = tmp_path / "whole.gguf"
    quantize(model, plan._uniform("q6_k", every, keep), out=whole, imatrix=im, manifest=False)
    w = gguf.GGUFReader(whole)
    got = {t.name: t for k in range(cm.n) for t in gguf.GGUFReader(cm.shard(k)).tensors}
    assert sorted(got) == sorted(t.name for t in w.tensors)
    for y in w.tensors:  # bytes compared flat: llama.cpp writes a [n, 1] bias back as [n]
        x = got[y.name]
        assert x.tensor_type == y.tensor_type, y.name
        assert np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes(), y.name
    text = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "calib" / "calibration.txt"
    e_c = evaluate(cm.path, model, text, ctx=256, max_chunks=1, threads=2)
    e_w = evaluate(whole, model, text, ctx=256, max_chunks=1, threads=2)
    assert e_c.kld_mean == e_w.kld_mean and e_c.kld_mean > 0
    # a version holds only what its file had: a run cannot point a routed expert at it
    with pytest.raises(plan.EdgeMoEError):
        cm.set([n for n in fits if "_exps" in n][:1], "act")


def test_calibration_chunks_are_spread_over_the_text(tiny_gguf):
    """plan's evals take their chunks evenly over the calibration text (written genre after genre), not its start."""
    from edgemoe_cli.evaluate import _chunks, _load

    text = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "calib" / "calibration.txt"
    llm = _load(tiny_gguf("thinking"), 256, 2)
    every = _chunks(llm, text, 256, None)
    first = _chunks(llm, text, 256, 3)
    spread = _chunks(llm, text, 256, 3, spread=True)
    assert first == every[:3]
    middle = int(round((len(every) - 1) / 2))  # numpy rounds half to even, as the spacing does
    assert len(every) > 3 and spread == [every[0], every[middle], every[-1]]
    assert _chunks(llm, text, 256, len(every) + 5, spread=True) == every


def test_activation_excess_prices_the_step_from_q8_0_to_a_k_quant_only():
    """The Q8_K activations' excess is added to every k-quant of a tensor alike (no choice among them moves) and to
    no Q8_0-activation type; its size scales with the tensor's predicted Q8_0 KLD."""
    errors = {"blk.0.attn_q.weight": {"q8_0": 1.0, "q6_k": 4.0, "q4_k": 20.0, "q4_0": 30.0}}
    kw = dict(types=["q8_0", "q6_k", "q4_k", "q4_0"], calibration_type="q4_k", errors=errors)
    base = plan.Measurements("m", "i", "t", gains={"attn_q": 0.5}, calibration_kld={}, layer_factors={"0": 2.0}, **kw)
    excess = plan.Measurements(
        "m", "i", "t", gains={"attn_q": 0.5}, calibration_kld={}, layer_factors={"0": 2.0}, activation_excess=3.0, **kw
    )
    n = "blk.0.attn_q.weight"
    assert base.predicted(n, "q6_k") == base.weight_predicted(n, "q6_k") == 4.0
    for t in ("q8_0", "q4_0"):
        assert excess.predicted(n, t) == base.predicted(n, t)
    for t in ("q6_k", "q4_k"):
        assert excess.predicted(n, t) == base.predicted(n, t) + 3.0 * 1.0  # 3 x gain x factor x E(W, q8_0)
    # the Q8_0 -> Q6_K step costs the excess more, Q6_K -> Q4_K the same as before
    assert excess.predicted(n, "q6_k") - excess.predicted(n, "q8_0") == 6.0
    assert excess.predicted(n, "q4_k") - excess.predicted(n, "q6_k") == base.predicted(n, "q4_k") - 4.0


def test_activation_runs_against_a_q8_0_reference(tiny_gguf, tmp_path):
    """Against a Q8_0 reference the Q8_0 activation run would be the reference itself: only the Q6_K one runs, on
    the kept Q8_0 quantization (which it needs until then), and its excess is measured over a zero Q8_0 level."""
    from test_quantize import write_imatrix

    model = tiny_gguf("pt")
    text = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "calib" / "calibration.txt"
    im = write_imatrix(tmp_path / "im.gguf", model)
    m = plan.measure(model, im, text, max_chunks=1, threads=2, workdir=tmp_path, reference="q8_0", use_cache=False)
    assert set(m.activation_kld) == {"q6_k"} and m.activation_kld["q6_k"] > 0
    assert m.activation_excess >= 0 and "activation:q6_k" in m.kld_stderr
