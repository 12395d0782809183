"""Recipes: parsing, first-match-wins resolution, validation before quantizing, the `recipe` commands."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from edgemoe_cli.cli import app
from edgemoe_cli.errors import EdgeMoEError
from edgemoe_cli.recipe import (
    Recipe,
    Rule,
    TensorInfo,
    builtin_names,
    explain,
    load_recipe,
    parse_recipe,
    resolve,
    tensor_bytes,
)


def _t(name, shape, type_="f32"):
    n = 1
    for s in shape:
        n *= s
    return TensorInfo(name, tuple(shape), type_, n)


TENSORS = [
    _t("token_embd.weight", (256, 8192)),
    _t("blk.1.attn_q.weight", (256, 256)),
    _t("blk.1.attn_norm.weight", (256,)),
    _t("blk.1.ffn_gate_inp.weight", (256, 16)),
    _t("blk.1.ffn_down_exps.weight", (256, 256, 16)),
    _t("blk.1.ffn_up_exps.weight", (256, 256, 16)),
    _t("blk.1.ffn_down_shexp.weight", (512, 256)),
]


def test_builtins_load_and_cover_the_issue():
    names = builtin_names()
    for required in ("q4_0-uniform", "edge-balanced", "edge-small", "arm-fast"):
        assert required in names
    for n in names:
        r = load_recipe(n)
        assert r.description and r.default
    arm = load_recipe("arm-fast")
    used = {arm.default, arm.token_embedding, arm.output} | {r.type for r in arm.rules}
    assert used <= {"q4_0", "iq4_nl", "q8_0"}


def test_first_matching_rule_wins_and_embedding_default_takes_precedence():
    recipe = Recipe(
        "t",
        default="q8_0",
        token_embedding="q6_k",
        rules=[Rule(r"ffn_down", "q5_k"), Rule(r"_exps\.", "q4_k"), Rule(r"token_embd", "q2_k")],
    )
    plans, problems = resolve(recipe, TENSORS)
    by = {p.name: p for p in plans}
    assert by["blk.1.ffn_down_exps.weight"].type == "q5_k" and by["blk.1.ffn_down_exps.weight"].rule.startswith(
        "rule 1"
    )
    assert by["blk.1.ffn_up_exps.weight"].type == "q4_k"
    assert by["blk.1.ffn_down_shexp.weight"].type == "q5_k"
    assert by["blk.1.attn_q.weight"].type == "q8_0" and by["blk.1.attn_q.weight"].rule == "default"
    assert by["token_embd.weight"].type == "q6_k" and "tied" in by["token_embd.weight"].rule
    # llama.cpp never quantizes norms and the router
    assert by["blk.1.attn_norm.weight"].rule == "not quantized" and by["blk.1.attn_norm.weight"].type == "f32"
    assert by["blk.1.ffn_gate_inp.weight"].rule == "not quantized"
    # rule 3 only matches a tensor the token_embedding default decides: reported as dead
    assert any(p.severity == "warning" and "rule 3" in p.message for p in problems)
    assert by["blk.1.ffn_down_exps.weight"].bytes == tensor_bytes(256 * 256 * 16, "q5_k") == 720896


def test_validation_reports_what_llama_cpp_would_change_or_refuse():
    odd = TENSORS + [_t("blk.2.attn_q.weight", (320, 256)), _t("blk.2.attn_k.weight", (256, 64), "q8_0")]
    recipe = Recipe("t", default="q4_k", rules=[Rule("nothing-matches-this", "q8_0"), Rule("ffn_up_exps", "iq2_xs")])
    _, problems = resolve(recipe, odd, have_imatrix=False)
    text = "\n".join(f"{p.severity}: {p.message}" for p in problems)
    assert "error: blk.2.attn_q.weight: rows of 320 are not a multiple of 256" in text
    assert "error: blk.1.ffn_up_exps.weight: iq2_xs needs an importance matrix" in text
    assert "error: blk.2.attn_k.weight is already q8_0" in text
    assert "warning: rule 1 ('nothing-matches-this' -> q8_0) matches no tensor" in text
    # a 32-block type is fine on those rows
    _, ok = resolve(Recipe("t", default="q4_0"), odd[:-1])
    assert not [p for p in ok if p.severity == "error"]


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"default": "q4_z"}, "unknown quantization type 'q4_z'"),
        ({"rules": [{"pattern": "blk.(", "type": "q4_0"}]}, "not a valid regex"),
        ({"rules": [{"pattern": "x"}]}, "must have exactly `pattern` and `type`"),
        ({"rulez": []}, "unknown key(s) rulez"),
        ({"token_embedding": "q9_k"}, "unknown quantization type"),
    ],
)
def test_parse_errors_are_one_line(data, needle):
    with pytest.raises(EdgeMoEError) as e:
        parse_recipe(data, "bad.toml")
    assert needle in e.value.message and "\n" not in e.value.message


def test_toml_round_trip(tmp_path):
    r = load_recipe("edge-balanced")
    path = tmp_path / "copy.toml"
    path.write_text(r.to_toml())
    back = load_recipe(path)
    assert (back.name, back.default, back.token_embedding, back.rules) == (
        r.name,
        r.default,
        r.token_embedding,
        r.rules,
    )


def test_explain_on_the_fixture_predicts_sizes(tiny_gguf):
    model = tiny_gguf("thinking")
    ex = explain(load_recipe("edge-balanced"), model)
    assert not ex.errors
    groups = {g.group: g for g in ex.groups}
    assert groups["experts"].tensors == 9 and groups["embeddings"].tensors == 1
    assert groups["experts"].bpw == pytest.approx((4.5 * 2 + 5.5) / 3)
    assert ex.total_bytes == sum(t.bytes for t in ex.tensors) + ex.overhead_bytes


def test_cli_recipe_show_and_errors(tiny_gguf, tmp_path):
    runner = CliRunner()
    model = tiny_gguf("thinking")
    res = runner.invoke(app, ["recipe", "show", "edge-small", "--model", str(model), "--json"])
    assert res.exit_code == 0, res.output
    assert '"recipe": "edge-small"' in res.output
    res = runner.invoke(app, ["recipe", "list"])
    assert res.exit_code == 0 and "arm-fast" in res.output
    bad = tmp_path / "bad.toml"
    bad.write_text('default = "q4_0"\n[[rules]]\npattern = "("\ntype = "q2_k"\n')
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "edgemoe_cli.cli", "recipe", "show", str(bad), "--model", str(model)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "not a valid regex" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run(
        [sys.executable, "-m", "edgemoe_cli.cli", "recipe", "show", "no-such-recipe"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "no recipe named 'no-such-recipe'" in out.stderr
