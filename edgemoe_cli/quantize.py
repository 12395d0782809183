"""Quantize a GGUF with a recipe, through llama.cpp's quantizer, and prove the output is what the recipe asked.

Path chosen: in-process, through llama-cpp-python's `llama_model_quantize` (the same libllama the rest of edgemoe
loads), not the `llama-quantize` tool. Why:
- it works as soon as the binding imports, without `edgemoe build` (the wheel ships libllama), and uses the
  board's build when there is one (llamacpp.import_binding);
- we hand llama.cpp one exact, anchored pattern per tensor (`^blk\\.3\\.ffn_down_exps\\.weight$`) with `pure` set,
  so none of llama.cpp's ftype heuristics (Q6_K for a tied embedding, Q4_1 for early ffn_down with an imatrix...)
  can change a type behind the recipe's back — recipe.resolve() is the single source of truth;
- the imatrix goes in as data we read and checked ourselves (imatrix.read_imatrix), so a shape mismatch is a
  one-line error before quantizing rather than an exception inside C++;
- progress comes from llama.cpp's own per-tensor log lines via llama_log_set, no subprocess output scraping.
The price: a crash inside llama.cpp takes the Python process with it (the tool would isolate it). After writing, the
output is read back with gguf's GGUFReader and every tensor's type is compared with the plan: a silent fallback
fails loudly.

`stock:FTYPE` (e.g. `stock:Q4_K_M`) instead runs llama.cpp's own mix for that ftype, for comparisons.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgeMoEError
from .progress import Progress
from .recipe import Recipe, TensorPlan, explain, ggml_type, load_recipe, read_tensors
from .store import atomic_output, home, refuse_input_as_output, sha256_file, write_manifest

# K-quant types have no file type of their own; their mixes' names (never Q2_K_S: it changes imatrix rules)
_LOG_HOOKS: list = []  # quantize's log callbacks, kept for the process's life (see _run_llama_quantize)

_FTYPE_OF_TYPE = {
    "q2_k": "q2_k",
    "q3_k": "q3_k_m",
    "q4_k": "q4_k_m",
    "q5_k": "q5_k_m",
    "iq3_s": "iq3_s",
    "mxfp4": "mxfp4_moe",
}


# rows of a tensor llama.cpp converts and quantizes at once (llama_model_quantize_params.max_buf_size): its default
# of 8 GiB holds a whole tensor, a 21B expert stack's float32 copy alone 1 GB of anonymous memory; quantization is
# per row with the row's expert's imatrix, so a slab of rows writes the same bytes (tests/test_quantize.py)
SLAB_BYTES = 64 * 2**20


@dataclass
class QuantizeResult:
    model: str
    recipe: str
    out: str
    imatrix: str | None
    bytes: int
    bpw: float
    types: dict[str, int]  # ggml type -> number of tensors in the output
    seconds: float
    manifest: str
    warnings: list[str] = field(default_factory=list)


def default_output(model: Path, recipe_name: str) -> Path:
    """<store>/gguf/<name>/<recipe>.gguf, where <name> is the model's store directory or its file stem."""
    from .recipe import NAME

    file_name = recipe_name.replace(":", "-")
    if not NAME.fullmatch(file_name):  # parse_recipe checks names; this guards recipes built in code too
        raise EdgeMoEError(f"recipe name {recipe_name!r} cannot name a file", "pass --out, or rename the recipe")
    store_gguf = home() / "gguf"
    try:
        name = model.resolve().relative_to(store_gguf.resolve()).parts[0]
    except ValueError:
        name = model.stem
    return store_gguf / name / f"{file_name}.gguf"


def _ftype(name: str) -> int:
    llama_cpp = _binding()
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}", None)
    if value is None:
        raise EdgeMoEError(f"unknown llama.cpp file type {name!r}", "e.g. stock:Q4_K_M, stock:Q4_0, stock:Q8_0")
    return value


def _binding():
    from .llamacpp import import_binding

    return import_binding()


def imatrix_array(imatrix_path: str | Path, plans: list[TensorPlan]):
    """The importance vectors llama.cpp expects (per expert in_sum2/counts), as a NULL-terminated ctypes array.

    Checks each quantized tensor's vector length (row length x experts) here, so a mismatched imatrix is a
    one-line error instead of an abort inside llama.cpp.
    """
    import numpy as np

    from .imatrix import read_imatrix

    llama_cpp = _binding()
    im = read_imatrix(imatrix_path)
    keep = []  # the float arrays must outlive the quantize call
    items = []
    for p in plans:
        entry = im.entries.get(p.name)
        if entry is None or p.rule == "not quantized":
            continue
        want = p.shape[0] * (p.shape[2] if len(p.shape) > 2 else 1)
        vec = np.ascontiguousarray(entry.importance().reshape(-1), dtype=np.float32)
        if vec.size != want:
            raise EdgeMoEError(
                f"imatrix {imatrix_path} has {vec.size} values for {p.name}, the model needs {want}",
                "compute the imatrix on this model (`edgemoe imatrix`)",
            )
        keep.append(vec)
        items.append((p.name.encode(), vec))
    arr = (llama_cpp.llama_model_imatrix_data * (len(items) + 1))()
    for i, (name, vec) in enumerate(items):
        arr[i].name = name
        arr[i].data = vec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = vec.size
    arr[len(items)].name = None
    return arr, keep, len(items)


def _run_llama_quantize(
    model: Path,
    part: Path,
    ftype: int,
    overrides: list[tuple[str, str]] | None,
    imatrix,
    threads: int,
    progress: Progress | None,
) -> list[str]:
    """Call llama_model_quantize; return its warning lines. Raises EdgeMoEError with llama.cpp's last error."""
    llama_cpp = _binding()
    import llama_cpp._logger as binding_logger

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = False
    params.max_buf_size = SLAB_BYTES
    params.quantize_output_tensor = True
    keep = []
    if overrides is not None:
        params.pure = True
        tt = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, t) in enumerate(overrides):
            b = pattern.encode()
            keep.append(b)
            tt[i].pattern = b
            tt[i].type = int(ggml_type(t))
        tt[len(overrides)].pattern = None
        params.tt_overrides = tt
    if imatrix is not None:
        params.imatrix = imatrix

    lines: list[str] = []
    pending = [""]
    listening = [True]

    @llama_cpp.llama_log_callback
    def on_log(level, text, user_data):
        if not listening[0]:  # a late call from another thread after this quantization ended
            return
        # llama.cpp logs in pieces (level 5 = continue): assemble lines, then look at whole lines only
        pending[0] += text.decode("utf-8", "replace")
        while "\n" in pending[0]:
            line, pending[0] = pending[0].split("\n", 1)
            lines.append(line)
            if progress and (m := re.match(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)", line)):
                progress("quantize", int(m.group(1)), int(m.group(2)), m.group(3))

    # never freed: llama.cpp's log hook is global, and a thread loading a model meanwhile may have read it and still
    # call it after it is put back (llamacpp.load_vocab's muting hook crashed so); one small closure per call
    _LOG_HOOKS.append(on_log)
    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(model).encode(), str(part).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(binding_logger.llama_log_callback, ctypes.c_void_p(0))
        listening[0] = False
    if rc != 0:
        errs = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
        raise EdgeMoEError(
            f"llama.cpp could not quantize {model}: {(errs or lines or ['no message'])[-1].strip()}",
            "check the recipe with `edgemoe recipe show`",
        )
    return [ln.strip() for ln in lines if "warning" in ln.lower() or "falling back" in ln]


def quantize(
    model: str | Path,
    recipe: str | Path | Recipe,
    out: str | Path | None = None,
    imatrix: str | Path | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    manifest: bool = True,
) -> QuantizeResult:
    """Quantize `model` (an f32/f16/bf16 GGUF) to `out` as `recipe` says; verify every tensor's type afterwards."""
    model = Path(model)
    t0 = time.perf_counter()
    threads = threads or os.cpu_count() or 1
    if imatrix is not None and not Path(imatrix).is_file():
        raise EdgeMoEError(f"imatrix {imatrix} does not exist", "compute one with `edgemoe imatrix MODEL.gguf`")
    stock = isinstance(recipe, (str, Path)) and str(recipe).startswith("stock:")
    if stock:
        ftype_name = str(recipe).split(":", 1)[1]
        recipe_name = f"stock:{ftype_name.upper()}"
        ftype = _ftype(ftype_name)
        tensors, _ = read_tensors(model)
        from .recipe import resolve

        # every tensor as-is, only to pass names and shapes to imatrix_array
        plans, _ = resolve(Recipe("stock", default="f32"), tensors)
        overrides = None
        expected = None
    else:
        rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        recipe_name = rec.name
        ex = explain(rec, model, have_imatrix=imatrix is not None)
        if ex.errors:
            more = f" (and {len(ex.errors) - 1} more)" if len(ex.errors) > 1 else ""
            raise EdgeMoEError(
                f"recipe {rec.name} cannot be applied to {model}: {ex.errors[0].message}{more}",
                f"see `edgemoe recipe show {rec.source or rec.name} --model {model}`",
            )
        plans = ex.tensors
        overrides = [("^" + re.escape(p.name) + "$", p.type) for p in plans if p.rule != "not quantized"]
        expected = {p.name: p.type for p in plans}
        counts = Counter(p.type for p in plans if p.rule != "not quantized" and p.type not in ("f32", "f16", "bf16"))
        # pure + patterns only apply when the file type's default type is a quantized one; name the file after
        # its most common type (general.file_type is what llama.cpp prints as the model's type)
        main = counts.most_common(1)[0][0] if counts else "q8_0"
        ftype = _ftype(
            _FTYPE_OF_TYPE.get(main, main if hasattr(_binding(), f"LLAMA_FTYPE_MOSTLY_{main.upper()}") else "q8_0")
        )
    out = Path(out) if out else default_output(model, recipe_name)
    refuse_input_as_output(out, [model, imatrix])
    im_arr = None
    if imatrix is not None:
        im_arr, _keep_alive, _n = imatrix_array(imatrix, plans)
    with atomic_output(out) as part:
        warnings = _run_llama_quantize(model, part, ftype, overrides, im_arr, threads, progress)
        written, overhead = read_tensors(part)
        types = {t.name: t.type for t in written}
        if expected is not None:
            wrong = [(n, expected[n], types.get(n)) for n in expected if types.get(n) != expected[n]]
            if wrong:
                n, want, got = wrong[0]
                raise EdgeMoEError(
                    f"llama.cpp wrote {n} as {got} but the recipe asked for {want} ({len(wrong)} tensor(s) differ)",
                    "report this: the recipe checks missed a case",
                )
    size = out.stat().st_size
    n_params = sum(t.n_elements for t in written)
    result = QuantizeResult(
        model=str(model),
        recipe=recipe_name,
        out=str(out),
        imatrix=str(imatrix) if imatrix else None,
        bytes=size,
        bpw=round(8.0 * (size - overhead) / max(n_params, 1), 3),
        types=dict(Counter(types.values())),
        seconds=round(time.perf_counter() - t0, 2),
        manifest="",
        warnings=warnings,
    )
    if manifest:
        from .llamacpp import LLAMA_CPP_PYTHON_VERSION

        result.manifest = str(
            write_manifest(
                out,
                kind="gguf",
                source=str(model.resolve()),
                source_bytes=model.stat().st_size,
                recipe=recipe_name,
                recipe_toml=None if stock else rec.to_toml(),
                imatrix=result.imatrix,
                imatrix_sha256=sha256_file(imatrix) if imatrix else None,
                sha256=sha256_file(out),
                bytes=size,
                tensor_types=types,
                llama_cpp_python=LLAMA_CPP_PYTHON_VERSION,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
        )
    return result
