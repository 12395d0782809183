"""ERNIE-4.5-21B-A3B in numbers: its shape, its bytes at each stock quantization, its KV cache, and whether it fits.

The one place for this arithmetic: doctor's fit table (board.py), plan's file budget and the README's numbers use it.
Pure: no file is read here (RAM comes from the caller).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class ErnieShape:
    """ERNIE-4.5-21B-A3B's architecture numbers (its Hugging Face config.json)."""

    vocab: int = 103424
    hidden: int = 2560
    n_layers: int = 28
    dense_ffn: int = 12288  # layer 0
    n_experts: int = 64
    expert_ffn: int = 1536
    shared_ffn: int = 3072  # 2 shared experts x 1536
    n_head: int = 20
    n_kv_heads: int = 4
    head_dim: int = 128


ERNIE_21B = ErnieShape()


def ernie_tensors(s: ErnieShape = ERNIE_21B) -> list[tuple[str, int, int]]:
    """(GGUF tensor name, elements, row length) of every tensor, embeddings tied (no output.weight)."""
    h = s.hidden
    out = [("token_embd.weight", s.vocab * h, h), ("output_norm.weight", h, h)]
    for i in range(s.n_layers):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", h, h),
            (p + "ffn_norm.weight", h, h),
            (p + "attn_q.weight", h * s.n_head * s.head_dim, h),
            (p + "attn_k.weight", h * s.n_kv_heads * s.head_dim, h),
            (p + "attn_v.weight", h * s.n_kv_heads * s.head_dim, h),
            (p + "attn_output.weight", s.n_head * s.head_dim * h, s.n_head * s.head_dim),
        ]
        if i == 0:
            out += [(p + f"ffn_{n}.weight", h * s.dense_ffn, h) for n in ("gate", "up")]
            out += [(p + "ffn_down.weight", s.dense_ffn * h, s.dense_ffn)]
        else:
            e = s.n_experts
            out += [(p + "ffn_gate_inp.weight", e * h, h), (p + "exp_probs_b.bias", e, e)]
            out += [(p + f"ffn_{n}_exps.weight", e * h * s.expert_ffn, h) for n in ("gate", "up")]
            out += [(p + "ffn_down_exps.weight", e * s.expert_ffn * h, s.expert_ffn)]
            out += [(p + f"ffn_{n}_shexp.weight", h * s.shared_ffn, h) for n in ("gate", "up")]
            out += [(p + "ffn_down_shexp.weight", s.shared_ffn * h, s.shared_ffn)]
    return out


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # llama.cpp src/llama-quant.cpp: the first and last eighth of layers, and every third in between
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def stock_tensor_type(name: str, ftype: str, n_layers: int) -> str:
    """The type llama-quantize gives `name` for a stock ftype (Q4_0, Q4_K_M, Q8_0) on ERNIE-4.5 (64 experts,
    tied embeddings), following src/llama-quant.cpp without an imatrix:
    - 1-D tensors, norms and the router (ffn_gate_inp) are not quantized (F32);
    - the tied token embedding takes the output tensor's rule: Q6_K unless the ftype's type is Q8_0;
    - Q4_K_M: attn_v and every ffn_down* (dense, experts, shared) get Q6_K in the layers _use_more_bits picks
      (for 28 layers: 0-2, 5, 8, 11, 14, 17, 20, 23-27), everything else Q4_K.
    """
    if name.endswith(("_norm.weight", ".bias")) or "ffn_gate_inp" in name:
        return "F32"
    base = {"Q4_0": "Q4_0", "Q8_0": "Q8_0", "Q4_K_M": "Q4_K"}[ftype]
    if name == "token_embd.weight":
        return base if base == "Q8_0" else "Q6_K"
    if ftype == "Q4_K_M" and ("attn_v" in name or "ffn_down" in name):
        layer = int(name.split(".")[1])
        return "Q6_K" if _use_more_bits(layer, n_layers) else "Q4_K"
    return base


def tensor_bytes(n_elements: int, qtype: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return n_elements // block * size


def model_bytes(ftype: str, shape: ErnieShape = ERNIE_21B) -> int:
    """Bytes of ERNIE-4.5-21B-A3B's tensors quantized to a stock ftype (what llama.cpp loads; GGUF header and
    vocabulary add a few MiB on disk)."""
    return sum(tensor_bytes(n, stock_tensor_type(name, ftype, shape.n_layers)) for name, n, _ in ernie_tensors(shape))


def n_params(shape: ErnieShape = ERNIE_21B) -> int:
    return sum(n for _, n, _ in ernie_tensors(shape))


def kv_cache_bytes(
    ctx: int, n_layers: int = 28, n_kv_heads: int = 4, head_dim: int = 128, bytes_per_elem: float = 2
) -> int:
    """KV cache of llama.cpp for `ctx` tokens: K and V per layer, each n_kv_heads x head_dim per token.

    bytes = 2 * n_layers * n_kv_heads * head_dim * bytes_per_elem * ctx
    (ERNIE-4.5-21B-A3B, f16 cache: 57,344 bytes a token; 4096 tokens = 224 MiB; 131072 = 7 GiB).
    """
    return int(2 * n_layers * n_kv_heads * head_dim * bytes_per_elem * ctx)


# llama.cpp's CPU compute buffers (a few hundred MiB at the default ubatch 512), the process itself and the OS'
# minimum working set. A budget, not a measurement: plan uses the same number so doctor and plan agree.
RUNTIME_RESERVE_BYTES = 1 * GIB

STOCK_FTYPES = ("Q4_0", "Q4_K_M", "Q8_0")


@dataclass
class ModelFit:
    ftype: str
    weights_bytes: int
    kv_bytes: int
    reserve_bytes: int
    need_bytes: int  # weights + kv + reserve
    ram_bytes: int
    fits: bool
    headroom_bytes: int  # ram - need (negative: short by that much)


def fit(
    ftype: str, ctx: int, ram_bytes: int, shape: ErnieShape = ERNIE_21B, reserve_bytes: int = RUNTIME_RESERVE_BYTES
) -> ModelFit:
    """Whether ERNIE-4.5-21B-A3B at `ftype` with a `ctx`-token f16 KV cache fits in `ram_bytes`:
    need = model_bytes(ftype) + kv_cache_bytes(ctx) + reserve_bytes <= ram_bytes."""
    w = model_bytes(ftype, shape)
    kv = kv_cache_bytes(ctx, shape.n_layers, shape.n_kv_heads, shape.head_dim)
    need = w + kv + reserve_bytes
    return ModelFit(ftype, w, kv, reserve_bytes, need, ram_bytes, need <= ram_bytes, ram_bytes - need)


# ---- boards we know (configs/boards/*.toml) ----


def file_budget_bytes(
    ram: int, ctx: int, n_layers: int, n_kv_heads: int, head_dim: int, reserve: int | None = None
) -> tuple[int, int, int]:
    """(bytes a GGUF may occupy, KV cache bytes, reserve bytes) in `ram` with room for `ctx` tokens of f16 KV cache
    and the runtime reserve: the same arithmetic as `fit`, solved for the weights."""
    kv = kv_cache_bytes(ctx, n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim)
    reserve = RUNTIME_RESERVE_BYTES if reserve is None else reserve
    return ram - kv - reserve, kv, reserve
