"""GGML_CPU_ARM_ARCH rules: which -march string names exactly the extensions a CPU has, and what wide SVE forbids.

Pure functions over feature lists and core part numbers (no /proc, no files): doctor (board.py) feeds them what it
reads from this machine or a board profile, and `edgemoe build` (build.py) the same.
"""

from __future__ import annotations

# MIDR implementer/part -> (core name, Arm architecture level it implements).
# Part numbers: Linux arch/arm64/include/asm/cputype.h (ARM_CPU_PART_*) and the cores' TRMs (MIDR_EL1 tables).
CORES: dict[tuple[int, int], tuple[str, str]] = {
    (0x41, 0xD03): ("Cortex-A53", "armv8-a"),
    (0x41, 0xD05): ("Cortex-A55", "armv8.2-a"),
    (0x41, 0xD07): ("Cortex-A57", "armv8-a"),
    (0x41, 0xD08): ("Cortex-A72", "armv8-a"),
    (0x41, 0xD09): ("Cortex-A73", "armv8-a"),
    (0x41, 0xD0A): ("Cortex-A75", "armv8.2-a"),
    (0x41, 0xD0B): ("Cortex-A76", "armv8.2-a"),
    (0x41, 0xD0C): ("Neoverse N1", "armv8.2-a"),
    (0x41, 0xD0D): ("Cortex-A77", "armv8.2-a"),
    (0x41, 0xD40): ("Neoverse V1", "armv8.4-a"),
    (0x41, 0xD41): ("Cortex-A78", "armv8.2-a"),
    (0x41, 0xD44): ("Cortex-X1", "armv8.2-a"),
    (0x41, 0xD46): ("Cortex-A510", "armv9-a"),
    (0x41, 0xD47): ("Cortex-A710", "armv9-a"),
    (0x41, 0xD48): ("Cortex-X2", "armv9-a"),
    (0x41, 0xD49): ("Neoverse N2", "armv9-a"),
    (0x41, 0xD4A): ("Neoverse E1", "armv8.2-a"),
    (0x41, 0xD4B): ("Cortex-A78C", "armv8.2-a"),
    (0x41, 0xD4C): ("Cortex-X1C", "armv8.2-a"),
    (0x41, 0xD4D): ("Cortex-A715", "armv9-a"),
    (0x41, 0xD4E): ("Cortex-X3", "armv9-a"),
    (0x41, 0xD4F): ("Neoverse V2", "armv9-a"),
    (0x41, 0xD80): ("Cortex-A520", "armv9.2-a"),
    (0x41, 0xD81): ("Cortex-A720", "armv9.2-a"),
    (0x41, 0xD82): ("Cortex-X4", "armv9.2-a"),
    (0x41, 0xD84): ("Neoverse V3", "armv9.2-a"),
    (0x41, 0xD85): ("Cortex-X925", "armv9.2-a"),
    (0x41, 0xD87): ("Cortex-A725", "armv9.2-a"),
    (0x41, 0xD89): ("Cortex-A720AE", "armv9.2-a"),
    (0x41, 0xD8B): ("C1-Pro", "armv9.2-a"),
    (0x41, 0xD8C): ("C1-Ultra", "armv9.2-a"),
    (0x41, 0xD8E): ("Neoverse N3", "armv9.2-a"),
    (0x41, 0xD90): ("C1-Premium", "armv9.2-a"),
}

# Architecture levels in order; the base of GGML_CPU_ARM_ARCH never goes above what every core implements.
_LEVELS = ["armv8-a", "armv8.1-a", "armv8.2-a", "armv8.3-a", "armv8.4-a", "armv8.5-a", "armv8.6-a", "armv9-a"]


def arm_arch_flags(features, parts: list[tuple[int, int]] | None = None) -> str:
    """The GGML_CPU_ARM_ARCH string (llama.cpp passes it as `-march=<string>`) naming only extensions present.

    Base: armv9-a when SVE2 is present (armv9.2-a with SME, as llama.cpp's own SME variant does); otherwise the
    lowest architecture level of the known cores (Neoverse V1 -> armv8.4-a), capped so the base never implies an
    extension the kernel does not report (GCC's armv8.6-a implies i8mm+bf16, armv8.4-a dotprod, armv9-a sve2).
    Tags: +sve2 is spelled out although armv9-a implies it in GCC and Clang, so the string reads as the list of
    SIMD extensions ggml will use; +fp16 only without SVE (SVE implies it). Both compilers accept the redundancy.
    """
    f = set(features)
    dot, i8mm, bf16 = "asimddp" in f, "i8mm" in f, "bf16" in f
    sve, sve2, sme = "sve" in f, "sve2" in f, "sme" in f
    fp16 = "fphp" in f and "asimdhp" in f
    if sve2:
        base = "armv9.2-a" if sme else "armv9-a"
    else:
        levels = [CORES[p][1] for p in (parts or []) if p in CORES]
        if levels and len(levels) == len(parts or []):
            base = min(levels, key=lambda lv: _LEVELS.index(lv) if lv in _LEVELS else len(_LEVELS))
        else:
            base = "armv8.2-a" if (dot or fp16 or sve or i8mm or bf16) else "armv8-a"
        if base not in _LEVELS or base.startswith("armv9"):
            base = "armv8.6-a"  # an Armv9 core whose kernel hides SVE2: stay below armv9-a's implied sve2
        idx = _LEVELS.index(base)
        if idx >= _LEVELS.index("armv8.6-a") and not (i8mm and bf16):
            idx = _LEVELS.index("armv8.5-a")
        if idx >= _LEVELS.index("armv8.4-a") and not dot:
            idx = _LEVELS.index("armv8.3-a")
        if (dot or fp16 or sve or i8mm or bf16) and idx < _LEVELS.index("armv8.2-a"):
            idx = _LEVELS.index("armv8.2-a")
        base = _LEVELS[idx]
    tags = []
    if sve2:
        tags.append("sve2")
    elif sve:
        tags.append("sve")
    tags += [t for t, ok in (("i8mm", i8mm), ("bf16", bf16), ("dotprod", dot)) if ok]
    if fp16 and not sve:
        tags.append("fp16")
    if sme:
        tags.append("sme")
    return base + "".join("+" + t for t in tags)


# ---- 512-bit SVE ----

SVE512_WARNING = (
    "this CPU runs SVE at {bits} bits: llama.cpp's SVE+i8mm q4_K/q6_K dot products (the 2-row path used for "
    "prompts and batches) are written for 256-bit vectors and give wrong results wider (README 'Armv9 notes'); "
    "rebuild with --arch {arch_no_i8mm} (SVE kept, those kernels fall back to the correct 1-row path) or use "
    "Q4_0/Q8_0 models"
)


def wide_sve_warning(arch: str, vector_bits: int | None) -> str | None:
    """The warning for code built with `arch` (a GGML_CPU_ARM_ARCH) running with `vector_bits`-bit SVE, or None.

    Pure, for doctor and build alike.
    """
    parts = arch.split("+")
    if not {"sve", "sve2"} & set(parts) or "i8mm" not in parts or not vector_bits or vector_bits <= 256:
        return None
    return SVE512_WARNING.format(bits=vector_bits, arch_no_i8mm="+".join(p for p in parts if p != "i8mm"))


def without_wide_sve_i8mm(arch: str, vector_bits: int | None) -> tuple[str, str | None]:
    """`arch` minus i8mm when SVE vectors are wider than 256 bits (see SVE512_WARNING), and a note saying so."""
    if wide_sve_warning(arch, vector_bits) is None:
        return arch, None
    safe = "+".join(p for p in arch.split("+") if p != "i8mm")
    return safe, (
        f"SVE is {vector_bits} bits here: building {safe} without i8mm, because ggml's SVE+i8mm "
        "q4_K/q6_K kernels assume at most 256 bits (README 'Armv9 notes')"
    )
