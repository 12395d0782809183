"""`edgemoe doctor`: what this machine can do (stage: board.py)."""

from __future__ import annotations

from .common import console, ctx_option, emit_json, json_option


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def doctor(
    ctx: int = ctx_option(4096, "Context length the memory-fit check assumes (f16 KV cache)."),
    as_json: bool = json_option("the report"),
) -> None:
    """What this machine can do for ERNIE-4.5-21B-A3B, and how to build llama.cpp for it.

    Reports the OS, CPU model, core types (big/little where the kernel's cpu_capacity tells), the ISA features ggml
    uses (aarch64: asimddp, i8mm, bf16, sve, sve2, sme; x86: the AVX family), the SVE vector length, RAM total and
    available, free disk where models are stored, and llama.cpp's own system_info from the library the Python
    binding loads (or why it could not be loaded).

    Recommends the GGML_CPU_ARM_ARCH string `edgemoe build` uses and says whether the model fits at Q4_0, Q4_K_M and
    Q8_0 in this machine's RAM: need = weights + KV cache + 1 GiB runtime reserve, where the f16 KV cache is 2 x 28
    layers x 4 KV heads x 128 x 2 bytes x ctx.

    Example: edgemoe doctor --ctx 32768 --json
    """
    from .. import board

    rep = board.doctor(ctx)
    if as_json:
        emit_json(rep)
        return
    from rich.table import Table

    t = Table(title="edgemoe doctor", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("OS", f"{rep.os} ({rep.arch})")
    t.add_row("CPU", f"{rep.cpu_model} — {rep.n_cpus} CPUs")
    for g in rep.cores:
        cap = f", capacity {g.capacity}" if g.capacity is not None else ""
        t.add_row("  cores", f"{g.count}x {g.name} ({g.kind}{cap}) cpus {','.join(map(str, g.cpus))}")
    t.add_row("ISA", " ".join(rep.features) or "-")
    t.add_row("SVE vector", f"{rep.sve_vector_bits} bits" if rep.sve_vector_bits else "-")
    t.add_row("RAM", f"{_gib(rep.ram_total_bytes)} total, {_gib(rep.ram_available_bytes)} available")
    t.add_row("disk", f"{_gib(rep.disk_free_bytes)} free at {rep.store}")
    if rep.binding is not None:
        t.add_row("llama.cpp", rep.binding.system_info)
        t.add_row("  library", f"{rep.binding.library} ({rep.binding.source})")
    else:
        t.add_row("llama.cpp", f"[red]binding not loaded:[/] {rep.llama_error}")
    t.add_row("native build", rep.native_build or "none (run `edgemoe build`)")
    if rep.build_smoke:
        t.add_row("  smoke test", rep.build_smoke.get("summary", ""))
    if rep.ggml_cpu_arm_arch:
        t.add_row("GGML_CPU_ARM_ARCH", rep.ggml_cpu_arm_arch)
    console.print(t)
    f = Table(title=f"ERNIE-4.5-21B-A3B at ctx {rep.ctx} in {_gib(rep.ram_total_bytes)}", title_justify="left")
    for col in ("type", "weights", "KV cache", "reserve", "need", "fits"):
        f.add_column(col, justify="right" if col != "type" else "left")
    for m in rep.fits:
        verdict = f"[green]yes[/] (+{_gib(m.headroom_bytes)})" if m.fits else f"[red]no[/] ({_gib(m.headroom_bytes)})"
        f.add_row(m.ftype, _gib(m.weights_bytes), _gib(m.kv_bytes), _gib(m.reserve_bytes), _gib(m.need_bytes), verdict)
    console.print(f)
    for r in rep.recommendations:
        console.print(f"• {r}", highlight=False)
