"""The ERNIE-4.5 architectures convert knows: hyper-parameters and the checkpoint-to-GGUF tensor plan.

Everything here mirrors llama.cpp's own converter (conversion/ernie.py on top of conversion/base.py) so that our
GGUF is byte-for-byte the same as theirs: the same tensor names, order, shapes and types, the same keys.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import gguf

from ..errors import EdgeMoEError
from .safetensors import TensorRef

Q = gguf.GGMLQuantizationType

# HF architectures -> llama.cpp architecture
ARCHES = {
    "Ernie4_5_MoeForCausalLM": gguf.MODEL_ARCH.ERNIE4_5_MOE,
    "Ernie4_5_ForCausalLM": gguf.MODEL_ARCH.ERNIE4_5,
    "Ernie4_5ForCausalLM": gguf.MODEL_ARCH.ERNIE4_5,
}

OUTTYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# llama.cpp keeps these in f32 whatever the output type (base.py prepare_tensors)
_ALWAYS_F32 = (
    gguf.MODEL_TENSOR.FFN_GATE_INP,
    gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,
    gguf.MODEL_TENSOR.POS_EMBD,
    gguf.MODEL_TENSOR.TOKEN_TYPES,
)
# Multi-token-prediction heads: llama.cpp's ERNIE graph has no use for them
_MTP = re.compile(r"model\.(mtp_block|mtp_emb_norm|mtp_hidden_norm|mtp_linear_proj)\.\d+")
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one checkpoint tensor; a GGUF tensor's data is its pieces' rows in order."""

    ref: TensorRef
    start: int
    stop: int


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy (row-major) order; GGUF stores it reversed
    qtype: gguf.GGMLQuantizationType
    pieces: list[Piece] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * type_size if self.shape else type_size


# llama.cpp's converter reads config.json through transformers' AutoConfig, so a key missing from config.json takes
# the config class's default (transformers 4.57, the version llama.cpp pins). The defaults that reach the GGUF:
TRANSFORMERS_DEFAULTS = {
    "ernie4_5_moe": dict(
        vocab_size=103424,
        hidden_size=2560,
        intermediate_size=12288,
        num_hidden_layers=28,
        num_attention_heads=20,
        num_key_value_heads=4,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        moe_intermediate_size=1536,
        moe_k=6,
        moe_num_experts=64,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
        moe_layer_interval=1,
    ),
    "ernie4_5": dict(
        vocab_size=103424,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=18,
        num_attention_heads=16,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        head_dim=128,
    ),
}


# config.json keys that size or shape the model: whole numbers, at least the bound given
_INT_KEYS = {
    "num_hidden_layers": 1,
    "hidden_size": 1,
    "num_attention_heads": 1,
    "vocab_size": 1,
    "num_key_value_heads": 1,
    "intermediate_size": 1,
    "head_dim": 1,
    "max_position_embeddings": 1,
    "moe_num_experts": 1,
    "moe_k": 1,
    "moe_intermediate_size": 1,
    "moe_num_shared_experts": 0,
    "moe_layer_start_index": 0,
    "moe_layer_interval": 1,
    "prefix_dense_intermediate_size": 1,
    "dense_intermediate_size": 1,
    "n_ctx": 1,
    "n_positions": 1,
}
_FLOAT_KEYS = ("rms_norm_eps", "rope_theta")
_UINT32_MAX = 2**32 - 1
_FLOAT32_MAX = 3.4e38
_LAYER = re.compile(r"^(?:model|ernie)\.layers\.(\d+)\.")


def check_config(config: dict, config_path) -> None:
    """config.json's structure and numbers, before anything is derived from them: the file may come from anywhere.

    `config` is the merged view read_config makes (text_config already checked to be an object)."""

    def bad(what: str) -> EdgeMoEError:
        return EdgeMoEError(f"{config_path}: {what}", "download config.json again, or fix it")

    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise bad(f"architectures is {archs!r}, not a list of names")
    for key, least in _INT_KEYS.items():
        value = config.get(key)
        if value is None:
            continue
        if type(value) is not int:  # bool is an int subclass, and 4.0 is not a count
            raise bad(f"{key} is {value!r}, not a whole number")
        if not least <= value <= _UINT32_MAX:  # GGUF stores them as uint32
            raise bad(f"{key} is {value}, outside {least}..{_UINT32_MAX}")
    for key in _FLOAT_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if type(value) not in (int, float) or not 0 < value <= _FLOAT32_MAX:  # also nan and inf; GGUF: float32
            raise bad(f"{key} is {value!r}, not a positive number")
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise bad(f"{key} is {rope!r}, not an object")
        for name in ("rope_type", "type"):
            if rope.get(name) is not None and not isinstance(rope[name], str):
                raise bad(f"{key}.{name} is {rope[name]!r}, not a name")
        theta = rope.get("rope_theta")
        if theta is not None and (type(theta) not in (int, float) or not 0 < theta <= _FLOAT32_MAX):
            raise bad(f"{key}.rope_theta is {theta!r}, not a positive number")


def check_against_tensors(arch: gguf.MODEL_ARCH, hp: dict, refs: list[TensorRef], config_path) -> None:
    """The counts config.json gives (layers, vocabulary, experts) must be those of the tensors present: they size
    tables and loops later, so a wrong one would allocate or iterate for a model that is not there."""

    def bad(what: str) -> EdgeMoEError:
        return EdgeMoEError(
            f"{config_path}: {what}", "the config does not belong to these safetensors; download the checkpoint again"
        )

    layers = {int(m[1]) for r in refs if (m := _LAYER.match(r.name))}
    n_layers = hp["num_hidden_layers"]
    if layers != set(range(n_layers)):
        have = f"layers 0-{max(layers)} ({len(layers)} present)" if layers else "no layers"
        raise bad(f"num_hidden_layers is {n_layers} but the checkpoint's tensors hold {have}")
    by_name = {r.name.replace("ernie.", "model."): r for r in refs}
    embed = by_name.get("model.embed_tokens.weight")
    if embed is not None:
        if len(embed.shape) != 2:
            raise bad(f"model.embed_tokens.weight has shape {list(embed.shape)}, not [vocab, hidden]")
        if embed.shape[0] != hp["vocab_size"]:
            raise bad(f"vocab_size is {hp['vocab_size']} but model.embed_tokens.weight has {embed.shape[0]} rows")
        if embed.shape[1] != hp["hidden_size"]:
            raise bad(
                f"hidden_size is {hp['hidden_size']} but model.embed_tokens.weight rows are {embed.shape[1]} wide"
            )
    elif hp["vocab_size"] > 1 << 22:
        raise bad(f"vocab_size is {hp['vocab_size']}, and no embedding tensor says otherwise")
    if arch == gguf.MODEL_ARCH.ERNIE4_5_MOE:
        experts = {int(m[2]) for r in refs if (m := _EXPERT.match(r.name.replace("ernie.", "model.")))}
        if experts and experts != set(range(hp["moe_num_experts"])):
            raise bad(
                f"moe_num_experts is {hp['moe_num_experts']} but the checkpoint holds experts "
                f"0-{max(experts)} ({len(experts)} distinct)"
            )
        if hp["moe_k"] > hp["moe_num_experts"]:
            raise bad(f"moe_k is {hp['moe_k']}, more than the {hp['moe_num_experts']} experts")
    if hp["hidden_size"] % hp["num_attention_heads"] and hp.get("head_dim") is None:
        raise bad(
            f"hidden_size {hp['hidden_size']} is not a multiple of num_attention_heads {hp['num_attention_heads']}"
        )


def hparams(config: dict) -> dict:
    """config.json as transformers' config class would see it: class defaults filled in."""
    hp = {**TRANSFORMERS_DEFAULTS.get(config.get("model_type"), {}), **config}
    if config.get("model_type") == "ernie4_5":
        if hp.get("head_dim") is None:
            hp["head_dim"] = hp["hidden_size"] // hp["num_attention_heads"]
        if hp.get("num_key_value_heads") is None:
            hp["num_key_value_heads"] = hp["num_attention_heads"]
    return hp


def model_arch(config: dict, config_path) -> tuple[str, gguf.MODEL_ARCH]:
    archs = config.get("architectures") or []
    for name in archs:
        if name in ARCHES:
            return name, ARCHES[name]
    raise EdgeMoEError(
        f"{config_path}: architecture {archs[0] if archs else '(none)'} is not supported",
        f"convert handles {', '.join(sorted(ARCHES))}",
    )


def _find(hp: dict, *keys: str):
    return next((hp[k] for k in keys if k in hp), None)


def add_hparams(writer: gguf.GGUFWriter, arch: gguf.MODEL_ARCH, hp: dict, ftype: gguf.LlamaFileType) -> None:
    """The hyper-parameter keys, in llama.cpp's order (TextModel.set_gguf_parameters + Ernie4_5MoeModel's)."""
    writer.add_block_count(hp["num_hidden_layers"])
    if (n_ctx := _find(hp, "max_position_embeddings", "n_ctx", "n_positions")) is not None:
        writer.add_context_length(n_ctx)
    writer.add_embedding_length(hp["hidden_size"])
    if (
        n_ff := _find(hp, "prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size")
    ) is not None:
        writer.add_feed_forward_length(n_ff)
    writer.add_head_count(hp["num_attention_heads"])
    if (n_kv := hp.get("num_key_value_heads")) is not None:
        writer.add_head_count_kv(n_kv)
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise EdgeMoEError(
            f"rope scaling {rope} is not supported by convert", "convert an unscaled ERNIE-4.5 checkpoint"
        )
    if (theta := rope.get("rope_theta", hp.get("rope_theta"))) is not None:
        writer.add_rope_freq_base(theta)
    if (eps := hp.get("rms_norm_eps")) is not None:
        writer.add_layer_norm_rms_eps(eps)
    if (head_dim := hp.get("head_dim")) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(ftype)
    if arch != gguf.MODEL_ARCH.ERNIE4_5_MOE:
        return
    writer.add_expert_count(hp["moe_num_experts"])
    writer.add_expert_used_count(hp["moe_k"])
    writer.add_interleave_moe_layer_step(hp["moe_layer_interval"])
    writer.add_leading_dense_block_count(hp["moe_layer_start_index"])
    if (moe_ff := hp.get("moe_intermediate_size")) is not None:
        writer.add_expert_feed_forward_length(moe_ff)
    if (n_shared := hp.get("moe_num_shared_experts")) is not None:
        writer.add_expert_shared_count(n_shared)
        if n_shared > 0 and hp.get("intermediate_size") is not None and hp.get("num_key_value_heads"):
            # llama.cpp's converter writes intermediate_size // num_key_value_heads here (3072 on the real model,
            # which equals 2 shared experts x 1536 only by coincidence of 12288 // 4). Kept identical on purpose:
            # llama.cpp reads the shared width from the tensors' shapes, so the key is informational.
            writer.add_expert_shared_feed_forward_length(hp["intermediate_size"] // hp["num_key_value_heads"])


def _qtype(
    name: str, n_dims: int, tmap_types: dict, out: gguf.GGMLQuantizationType, row_len: int
) -> gguf.GGMLQuantizationType:
    if (
        n_dims <= 1
        or name.endswith("_norm.weight")
        or not name.endswith(".weight")
        or tmap_types.get(name) in _ALWAYS_F32
    ):
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[out]
    # llama.cpp falls back to f16 for rows that do not split into whole quant blocks
    return out if row_len % block == 0 else Q.F16


def plan_tensors(arch: gguf.MODEL_ARCH, hp: dict, refs: list[TensorRef], outtype: str) -> list[PlannedTensor]:
    """The GGUF tensors, in llama.cpp's order, each with its output type and the checkpoint rows it is made of."""
    n_layers = hp["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    out_q = OUTTYPES[outtype][0]
    n_experts = hp.get("moe_num_experts", 0) if arch == gguf.MODEL_ARCH.ERNIE4_5_MOE else 0
    pending: dict[int, dict[tuple[int, str], TensorRef]] = {}
    plan: list[PlannedTensor] = []

    def emit(hf_name: str, shape: tuple[int, ...], pieces: list[Piece]) -> None:
        mapped = tmap.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise EdgeMoEError(f"checkpoint tensor {hf_name} has no llama.cpp name", "is this an ERNIE-4.5 checkpoint?")
        kind, name = mapped
        qtype = _qtype(name, len(shape), {name: kind}, out_q, shape[-1] if shape else 1)
        plan.append(PlannedTensor(name, shape, qtype, pieces))

    def whole(ref: TensorRef) -> list[Piece]:
        return [Piece(ref, 0, ref.n_rows)]

    for ref in refs:
        name = ref.name.replace("ernie.", "model.")
        if arch == gguf.MODEL_ARCH.ERNIE4_5_MOE and _MTP.match(name):
            continue
        if name.endswith(_SKIP_SUFFIXES):
            continue
        if name.endswith("e_score_correction_bias"):
            name = name.replace("e_score_correction_bias", "e_score_correction.bias")

        if n_experts and (m := _EXPERT.match(name)):
            bid, xid, proj = int(m[1]), int(m[2]), m[3]
            layer = pending.setdefault(bid, {})
            layer[(xid, proj)] = ref
            # like llama.cpp, a layer's stacked tensors are emitted once its last expert has been seen
            if len(layer) >= n_experts * 3:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    experts = [layer.pop((x, proj)) for x in range(n_experts)]
                    if len(experts[0].shape) != 2:
                        raise EdgeMoEError(
                            f"{experts[0].file}: expert tensor {experts[0].name} has shape "
                            f"{list(experts[0].shape)}, not [rows, columns]",
                            "the checkpoint is inconsistent; download it again",
                        )
                    rows, cols = experts[0].shape
                    if any(e.shape != (rows, cols) for e in experts):
                        raise EdgeMoEError(
                            f"layer {bid}: experts' {proj} shapes differ", "the checkpoint is inconsistent"
                        )
                    emit(
                        f"model.layers.{bid}.mlp.experts.{proj}.weight",
                        (n_experts, rows, cols),
                        [p for e in experts for p in whole(e)],
                    )
                del pending[bid]
            continue

        if arch == gguf.MODEL_ARCH.ERNIE4_5 and "qkv_proj" in name:
            # fused q/k/v rows: [q heads | k heads | v heads]
            n_head, n_kv = hp["num_attention_heads"], hp["num_key_value_heads"]
            head_dim = hp.get("head_dim") or hp["hidden_size"] // n_head
            bounds = [0, n_head * head_dim, (n_head + n_kv) * head_dim, (n_head + 2 * n_kv) * head_dim]
            if len(ref.shape) != 2 or ref.shape[0] != bounds[-1]:
                raise EdgeMoEError(
                    f"{ref.file}: {ref.name} has shape {list(ref.shape)}, config.json's heads need "
                    f"[{bounds[-1]}, hidden]",
                    "the checkpoint is inconsistent; download it again",
                )
            for part, a, b in zip(("q_proj", "k_proj", "v_proj"), bounds, bounds[1:]):
                emit(name.replace("qkv_proj", part), (b - a, *ref.shape[1:]), [Piece(ref, a, b)])
            continue
        if arch == gguf.MODEL_ARCH.ERNIE4_5 and "up_gate_proj" in name:
            if len(ref.shape) != 2 or ref.shape[0] % 2:
                raise EdgeMoEError(
                    f"{ref.file}: {ref.name} has shape {list(ref.shape)}, not [2 x rows, hidden]",
                    "the checkpoint is inconsistent; download it again",
                )
            half = ref.shape[0] // 2  # the first half is the gate, despite the name
            emit(name.replace("up_gate_proj", "gate_proj"), (half, *ref.shape[1:]), [Piece(ref, 0, half)])
            emit(name.replace("up_gate_proj", "up_proj"), (half, *ref.shape[1:]), [Piece(ref, half, ref.shape[0])])
            continue

        emit(name, ref.shape, whole(ref))

    if left := [k for layer in pending.values() for k in layer]:
        raise EdgeMoEError(
            f"{len(left)} expert tensors have incomplete layers (e.g. expert {left[0]})",
            "the checkpoint is missing experts; download it again",
        )
    return plan
