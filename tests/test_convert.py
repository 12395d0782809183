"""convert: the fixtures' GGUF reproduces transformers' logits; streaming, shards, the dense arch and every error."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import fixture_dir

from edgemoe_cli import cli
from edgemoe_cli.convert import convert, writer
from edgemoe_cli.convert.safetensors import TensorReader, checkpoint_tensors
from edgemoe_cli.convert.vocab import read_sentencepiece

Q = gguf.GGMLQuantizationType
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


# ---- helpers shared with test_convert_reference.py ----


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file from {name: (dtype, stored bits)}, written with numpy only (bf16 as uint16 bits)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, bits) in tensors.items():
        raw = np.ascontiguousarray(bits).tobytes()
        header[name] = {"dtype": dtype, "shape": list(bits.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for raw in blobs:
            f.write(raw)


def bf16_bits(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.05) -> np.ndarray:
    values = (rng.standard_normal(shape) * scale).astype(np.float32)
    return (values.view(np.uint32) >> 16).astype(np.uint16)


def make_dense_checkpoint(dest: Path, seed: int = 0) -> Path:
    """A tiny random Ernie4_5_ForCausalLM (dense ERNIE-4.5, like ERNIE-4.5-0.3B) in HF layout, fixture tokenizer."""
    dest.mkdir(parents=True, exist_ok=True)
    hidden, n_head, n_kv, head_dim, ff, layers, vocab = 128, 4, 2, 32, 256, 2, 8192
    config = {
        "architectures": ["Ernie4_5_ForCausalLM"],
        "model_type": "ernie4_5",
        "hidden_size": hidden,
        "intermediate_size": ff,
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
        "use_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(fixture_dir("pt") / name, dest / name)
    rng = np.random.default_rng(seed)
    tensors = {
        "model.embed_tokens.weight": ("BF16", bf16_bits(rng, (vocab, hidden))),
        "model.norm.weight": ("BF16", bf16_bits(rng, (hidden,), 0.1) | 0x3F80),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update(
            {
                p + "input_layernorm.weight": ("BF16", np.full(hidden, 0x3F80, np.uint16)),
                p + "post_attention_layernorm.weight": ("BF16", np.full(hidden, 0x3F80, np.uint16)),
                p + "self_attn.q_proj.weight": ("BF16", bf16_bits(rng, (n_head * head_dim, hidden))),
                p + "self_attn.k_proj.weight": ("BF16", bf16_bits(rng, (n_kv * head_dim, hidden))),
                p + "self_attn.v_proj.weight": ("BF16", bf16_bits(rng, (n_kv * head_dim, hidden))),
                p + "self_attn.o_proj.weight": ("BF16", bf16_bits(rng, (hidden, n_head * head_dim))),
                p + "mlp.gate_proj.weight": ("BF16", bf16_bits(rng, (ff, hidden))),
                p + "mlp.up_proj.weight": ("BF16", bf16_bits(rng, (ff, hidden))),
                p + "mlp.down_proj.weight": ("BF16", bf16_bits(rng, (hidden, ff))),
            }
        )
    write_safetensors(dest / "model.safetensors", tensors)
    return dest


def copy_fixture(variant: str, dest: Path) -> Path:
    """A writable copy of a fixture (same directory name, so general.* naming is unchanged)."""
    shutil.copytree(fixture_dir(variant), dest / f"tiny-ernie-{variant}", ignore=shutil.ignore_patterns("reference"))
    return dest / f"tiny-ernie-{variant}"


def shard_checkpoint(src: Path, n_shards: int) -> None:
    """Split src/model.safetensors into HF-style shards plus model.safetensors.index.json, in place."""
    reader = TensorReader()
    refs = checkpoint_tensors(src)
    tensors = {r.name: (r.dtype, np.array(reader.rows(r))) for r in refs}
    reader.close()
    (src / "model.safetensors").unlink()
    names = list(tensors)
    weight_map = {}
    for k in range(n_shards):
        shard = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = names[k::n_shards]  # interleaved, so a layer's experts span shards
        write_safetensors(src / shard, {n: tensors[n] for n in part})
        weight_map.update(dict.fromkeys(part, shard))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ---- logits against transformers ----


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_agreement(model_path: Path, variant: str) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || ours)) over every position of the fixture's reference sequences."""
    from edgemoe_cli.llamacpp import import_binding

    llama_cpp = import_binding()
    ref = np.load(fixture_dir(variant) / "reference" / "logits.npz")
    seqs = sorted(k for k in ref.files if k.startswith("seq"))
    n_ctx = max(len(ref[s]) for s in seqs)
    llm = llama_cpp.Llama(str(model_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, seed=0)
    agree, kl = [], []
    try:
        for s in seqs:
            tokens = ref[s].tolist()
            lp_ref = ref["lp" + s[3:]].astype(np.float64)
            llm.reset()
            llm.eval(tokens)
            lp = _log_softmax(np.array(llm.scores[: len(tokens)], dtype=np.float64))
            agree.append(lp.argmax(-1) == lp_ref.argmax(-1))
            kl.append((np.exp(lp_ref) * (lp_ref - lp)).sum(-1))
    finally:
        llm.close()
    return float(np.concatenate(agree).mean()), float(np.concatenate(kl).mean())


@pytest.mark.parametrize("variant", ["pt", "thinking"])
def test_f32_reproduces_transformers_logits(tiny_gguf, variant):
    top1, kl = reference_agreement(tiny_gguf(variant, "f32"), variant)
    assert top1 >= 0.99, top1
    assert kl < 1e-3, kl


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_lower_precision_outtypes_load_and_agree_loosely(tiny_gguf, outtype):
    top1, kl = reference_agreement(tiny_gguf("pt", outtype), "pt")
    assert top1 >= 0.97, top1
    assert kl < 1e-2, kl


# ---- structure of the file ----


def test_layout_types_and_metadata(tiny_gguf):
    r = gguf.GGUFReader(tiny_gguf("pt", "q8_0"))
    tensors = {t.name: t for t in r.tensors}
    cfg = json.loads((fixture_dir("pt") / "config.json").read_text())
    n_exp, hidden, moe_ff = cfg["moe_num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    assert tensors["blk.1.ffn_gate_exps.weight"].shape.tolist() == [hidden, moe_ff, n_exp]
    assert tensors["blk.1.ffn_down_exps.weight"].shape.tolist() == [moe_ff, hidden, n_exp]
    assert tensors["blk.1.ffn_gate_exps.weight"].tensor_type == Q.Q8_0
    # router, score-correction bias and norms stay f32; shared experts are quantized like the rest
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == Q.F32
    assert tensors["blk.1.exp_probs_b.bias"].tensor_type == Q.F32
    assert tensors["blk.1.attn_norm.weight"].tensor_type == Q.F32
    assert tensors["blk.1.ffn_up_shexp.weight"].tensor_type == Q.Q8_0
    assert "blk.0.ffn_gate_exps.weight" not in tensors and "blk.0.ffn_gate.weight" in tensors
    assert not any("mtp" in name for name in tensors)

    def value(key):
        return r.fields[key].contents()

    assert value("general.architecture") == "ernie4_5-moe"
    assert value("ernie4_5-moe.expert_count") == n_exp
    assert value("ernie4_5-moe.expert_used_count") == cfg["moe_k"]
    assert value("ernie4_5-moe.leading_dense_block_count") == cfg["moe_layer_start_index"]
    assert value("ernie4_5-moe.expert_feed_forward_length") == moe_ff
    assert (
        value("ernie4_5-moe.expert_shared_feed_forward_length")
        == cfg["intermediate_size"] // cfg["num_key_value_heads"]
    )
    assert value("ernie4_5-moe.rope.freq_base") == cfg["rope_theta"]
    assert value("tokenizer.chat_template").startswith("{%- if not add_generation_prompt")
    assert value("tokenizer.ggml.eos_token_id") == 2
    tokens = value("tokenizer.ggml.tokens")
    types = value("tokenizer.ggml.token_type")
    assert tokens[5] == "<think>" and types[5] == 4  # added, not special: user-defined
    assert tokens[7] == "<|im_start|>" and types[7] == 3  # special: control


def test_vocab_reader_matches_piece_count_and_bytes():
    pieces = read_sentencepiece(fixture_dir("pt") / "tokenizer.model")
    assert len(pieces) == 8192
    kinds = {kind for _, _, kind in pieces}
    assert 6 in kinds  # byte-fallback pieces <0x00>..<0xFF>
    assert pieces[pieces.index(next(p for p in pieces if p[0] == b"<0x41>"))][2] == 6


def test_block_size_does_not_change_the_bytes(tmp_path, tiny_gguf, monkeypatch):
    # tiny blocks force every tensor, and each expert of a stack, through many separate row blocks
    monkeypatch.setattr(writer, "BLOCK_BYTES", 1000)
    for outtype in ("f32", "q8_0"):
        out = convert(fixture_dir("pt"), tmp_path / f"small-blocks-{outtype}.gguf", outtype)
        assert Path(out.out).read_bytes() == tiny_gguf("pt", outtype).read_bytes()


def test_sharded_checkpoint_gives_the_same_file(tmp_path, tiny_gguf):
    src = copy_fixture("thinking", tmp_path)
    shard_checkpoint(src, 3)
    sharded = gguf.GGUFReader(convert(src, tmp_path / "sharded.gguf", "bf16").out)
    single = gguf.GGUFReader(tiny_gguf("thinking", "bf16"))
    # tensors come shard by shard (as in llama.cpp's converter), so only the order may differ
    assert {t.name: t.data.tobytes() for t in sharded.tensors} == {t.name: t.data.tobytes() for t in single.tensors}
    assert {k: f.contents() for k, f in sharded.fields.items()} == {k: f.contents() for k, f in single.fields.items()}


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0])
def test_bf16_encoding_matches_gguf_quants(qtype):
    rng = np.random.default_rng(1)
    bits = bf16_bits(rng, (8, 64), 3.0)
    bits[0, :4] = [0x7FC0, 0x7F81, 0xFF81, 0x7F80]  # quiet NaN, signalling NaNs, +inf
    bits[1, :2] = [0x0001, 0x8000]  # subnormal, -0
    f32 = (bits.astype(np.uint32) << 16).view(np.float32)
    with np.errstate(invalid="ignore"):
        expected = gguf.quants.quantize(f32, qtype)
        assert writer.encode(bits, "BF16", qtype).tobytes() == expected.tobytes()


def test_dense_ernie_converts_and_runs(tmp_path):
    src = make_dense_checkpoint(tmp_path / "tiny-ernie-dense")
    result = convert(src, tmp_path / "dense.gguf", "f16")
    assert result.arch == "ernie4_5" and result.hf_arch == "Ernie4_5_ForCausalLM"
    r = gguf.GGUFReader(result.out)
    names = {t.name: t for t in r.tensors}
    assert names["blk.1.attn_k.weight"].shape.tolist() == [128, 64]
    assert names["blk.1.ffn_up.weight"].tensor_type == Q.F16
    assert r.fields["ernie4_5.attention.key_length"].contents() == 32
    from edgemoe_cli.llamacpp import import_binding

    llm = import_binding().Llama(result.out, n_ctx=64, logits_all=True, verbose=False)
    llm.eval([1, 100, 200, 300])
    assert np.isfinite(np.array(llm.scores[:4])).all()
    llm.close()


def test_fused_qkv_and_up_gate_are_split(tmp_path):
    # some ERNIE-4.5 dense exports fuse q/k/v and gate/up; llama.cpp splits them into separate tensors
    src = make_dense_checkpoint(tmp_path / "plain")
    fused = make_dense_checkpoint(tmp_path / "fused")
    reader = TensorReader()
    tensors = {r.name: (r.dtype, np.array(reader.rows(r))) for r in checkpoint_tensors(src)}
    reader.close()
    for i in range(2):
        p = f"model.layers.{i}."
        q, k, v = (tensors.pop(p + f"self_attn.{x}_proj.weight")[1] for x in "qkv")
        gate, up = (tensors.pop(p + f"mlp.{x}_proj.weight")[1] for x in ("gate", "up"))
        tensors[p + "self_attn.qkv_proj.weight"] = ("BF16", np.concatenate([q, k, v]))
        tensors[p + "mlp.up_gate_proj.weight"] = ("BF16", np.concatenate([gate, up]))
    write_safetensors(fused / "model.safetensors", tensors)
    a = gguf.GGUFReader(convert(src, tmp_path / "plain.gguf", "f32").out)
    b = gguf.GGUFReader(convert(fused, tmp_path / "fused.gguf", "f32").out)
    data_a = {t.name: t.data.tobytes() for t in a.tensors}
    data_b = {t.name: t.data.tobytes() for t in b.tensors}
    assert data_a == data_b


# ---- errors: one line naming the file, exit code 2, nothing under the output name ----


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["edgemoe", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code, capsys.readouterr().err


def _break_config_missing(src: Path) -> str:
    (src / "config.json").unlink()
    return "config.json"


def _break_config_malformed(src: Path) -> str:
    (src / "config.json").write_text('{"architectures": ["Ernie4_5_MoeForCausalLM"],')
    return "config.json"


def _break_unknown_arch(src: Path) -> str:
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    return "LlamaForCausalLM"


def _break_missing_shard(src: Path) -> str:
    shard_checkpoint(src, 2)
    (src / "model-00002-of-00002.safetensors").unlink()
    return "model-00002-of-00002.safetensors"


def _break_truncated(src: Path) -> str:
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])
    return "model.safetensors"


def _break_truncated_header(src: Path) -> str:
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return "model.safetensors"


def _break_missing_tokenizer(src: Path) -> str:
    (src / "tokenizer.model").unlink()
    return "tokenizer.model"


@pytest.mark.parametrize(
    "breakage",
    [
        _break_config_missing,
        _break_config_malformed,
        _break_unknown_arch,
        _break_missing_shard,
        _break_truncated,
        _break_truncated_header,
        _break_missing_tokenizer,
    ],
    ids=lambda f: f.__name__[len("_break_") :],
)
def test_broken_checkpoints_are_one_line_errors(tmp_path, monkeypatch, capsys, breakage):
    src = copy_fixture("pt", tmp_path)
    names = breakage(src)
    out = tmp_path / "out" / "model.gguf"
    code, err = run_cli(monkeypatch, capsys, "convert", str(src), "--out", str(out))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(" ".join(lines)) and "Traceback" not in err
    assert "error:" in lines[0] and names in " ".join(lines)
    assert not out.exists() and not out.with_name(out.name + ".part").exists()


def test_unwritable_output_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    target = locked / "model.gguf"
    try:
        if sys.platform != "win32" and __import__("os").access(locked, __import__("os").W_OK):
            # root ignores directory permissions; a path under a regular file is unwritable for everyone
            (tmp_path / "file").write_text("")
            target = tmp_path / "file" / "model.gguf"
        code, err = run_cli(monkeypatch, capsys, "convert", str(fixture_dir("pt")), "--out", str(target))
    finally:
        locked.chmod(0o700)
    assert code == 2 and "Traceback" not in err
    assert str(target) in err.replace("\n", "")
    assert not target.exists()


def test_cli_convert_json(tmp_path, monkeypatch, capsys):
    out = tmp_path / "pt.gguf"
    monkeypatch.setattr(
        sys, "argv", ["edgemoe", "convert", str(fixture_dir("pt")), "--out", str(out), "--outtype", "bf16", "--json"]
    )
    cli.main()
    result = json.loads(capsys.readouterr().out)
    assert result["out"] == str(out) and result["outtype"] == "bf16" and result["n_tensors"] == 53
    assert result["n_bytes"] == out.stat().st_size


@pytest.mark.parametrize("nan_bits", [0x7F81, 0x7FFF, 0xFF81, 0xFFC0])
def test_bf16_passthrough_quiets_every_nan(nan_bits):
    bits = np.array([[0x3F80, nan_bits, 0xBF80, 0x7F80]], dtype=np.uint16)
    f32 = (bits.astype(np.uint32) << 16).view(np.float32)
    with np.errstate(invalid="ignore"):
        assert writer.encode(bits, "BF16", Q.BF16).tobytes() == gguf.quants.quantize(f32, Q.BF16).tobytes()


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16])
def test_every_bf16_value_encodes_like_gguf_quants(qtype):
    # all 65536 bf16 bit patterns: normals, subnormals, zeros, infinities, NaNs, and f16 overflow/underflow
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    f32 = (bits.astype(np.uint32) << 16).view(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = gguf.quants.quantize(f32, qtype)
        assert writer.encode(bits, "BF16", qtype).tobytes() == expected.tobytes()
