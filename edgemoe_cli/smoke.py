"""Prove a llama.cpp build before edgemoe trusts it (`edgemoe build` runs this before it activates a build).

The shipped tiny Thinking fixture is converted to F16 by our converter, quantized by the build's own
llama-quantize to every weight family the project uses, and each file is run in a child process, so a crash (the
AMX kernels of this llama.cpp on some x86 hosts, a CPU feature the kernel does not enable, a miscompiled kernel)
is a verdict about one type, never the end of edgemoe. Two checks per type:

- tools: `llama-completion` greedy on the fixture's chat prompt (under qemu for a cross build); its first words must
  be those of the F16 run. Measured here: every type agrees on at least 5 words, most on all 24 tokens; a broken
  kernel is wrong from the first token.
- binding (native builds): llama-cpp-python loads the build's libllama exactly as `edgemoe run` does and scores the
  F16 run's greedy continuation teacher-forced; mean KL(F16 || type) and top-1 agreement over those positions
  must stay within the bounds below.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

# llama-quantize ftypes: one per weight family the project's recipes and plans use (F16 is the reference).
SMOKE_FTYPES = ("F16", "Q8_0", "Q4_0", "Q4_K_M", "Q6_K", "IQ4_NL")
QUESTION = "What is 51 - 29?"  # the fixture answers it step by step ("Ones: 11 - 9 = 2, borrow 1. ...")
N_TOKENS = 24
# Words of the tools' greedy text that must equal F16's. Measured on this x86 build: 5 (Q4_0) to all 24 tokens; the
# previous Armv9-under-qemu runs agreed with x86 on 6-11 words. 3 leaves room for a different CPU's rounding.
MIN_SAME_WORDS = 3
# Teacher-forced on F16's 24 greedy tokens (each build records them: `edgemoe build --json` -> smoke.cases):
# mean KL Q8_0 5.8e-6, Q6_K 7.7e-5, IQ4_NL 6.5e-4, Q4_0 3.9e-3, Q4_K_M 5.5e-3, top-1 agreement 1.0 for all.
# A wrong kernel gives KL of order 1 and near-random top-1. The bounds sit ~10x above the worst good type.
MAX_MEAN_KL = 0.05
MIN_TOP1 = 0.75
FIXTURE = "tiny-ernie-thinking"
SMOKE_VERSION = 1  # bump when what the smoke test checks changes: recorded results of older versions are re-run


@dataclass
class SmokeCase:
    ftype: str
    path: str  # tools | binding
    ok: bool
    detail: str  # what was seen: the words agreed, the KL, or how it failed
    crashed: bool = False
    text: str = ""
    mean_kl: Optional[float] = None
    top1: Optional[float] = None


@dataclass
class SmokeResult:
    passed: bool
    version: int = SMOKE_VERSION
    skipped: str = ""  # why no test ran (no fixture, no qemu for a cross build); passed is True then
    runner: str = "native"
    seconds: float = 0.0
    cases: list[SmokeCase] = field(default_factory=list)
    system_info: str = ""
    log: str = ""

    @property
    def failing(self) -> list[SmokeCase]:
        return [c for c in self.cases if not c.ok]

    def summary(self) -> str:
        if self.skipped:
            return f"skipped ({self.skipped})"
        if self.passed:
            return f"passed: {', '.join(SMOKE_FTYPES)} via {' and '.join(sorted({c.path for c in self.cases}))}"
        return "failed: " + "; ".join(f"{c.ftype} ({c.path}) {c.detail}" for c in self.failing)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SmokeResult":
        cases = [SmokeCase(**c) for c in d.get("cases", [])]
        known = {k: d[k] for k in ("passed", "version", "skipped", "runner", "seconds", "system_info", "log") if k in d}
        return cls(cases=cases, **known)


def fixture_dir() -> Optional[Path]:
    """The checkpoint the smoke test runs: data/fixtures in a clone, the wheel's copy in an installed edgemoe."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "data" / "fixtures" / FIXTURE, here / "data" / "fixtures" / FIXTURE):
        if (cand / "model.safetensors").is_file():
            return cand
    return None


def chat_prompt_text(gguf: Path) -> str:
    """The fixture's question rendered with the GGUF's own chat template, as `edgemoe run` renders it."""
    from gguf import GGUFReader

    from . import chat

    template = GGUFReader(gguf).get_field("tokenizer.chat_template").contents()
    return chat.render_prompt(template, chat.build_messages(QUESTION), {"bos_token": "<s>", "eos_token": "</s>"})


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"crashed ({signal.Signals(-rc).name})"
        except ValueError:
            return f"crashed (signal {-rc})"
    return f"exited {rc}"


def _run(cmd: list[str], log, timeout: float, env: Optional[dict] = None) -> tuple[int, str, str]:
    log.write("$ " + " ".join(cmd) + "\n")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", timeout=timeout, env={**os.environ, **(env or {})}
        )
    except subprocess.TimeoutExpired:
        log.write(f"timed out after {timeout:.0f} s\n")
        return -999, "", f"timed out after {timeout:.0f} s"
    log.write(proc.stdout[-4000:] + "\n" + proc.stderr[-4000:] + f"\n[exit {proc.returncode}]\n")
    return proc.returncode, proc.stdout, proc.stderr


def _failure(rc: int, stderr: str) -> tuple[str, bool]:
    if rc == -999:
        return stderr, False
    from .llamacpp import last_error

    what = _describe_exit(rc)
    return (what if rc < 0 else f"{what}: {last_error(stderr)}"), rc < 0


def run_smoke(
    bin_dir: str | Path,
    lib_dir: str | Path,
    runner: Optional[list[str]] = None,
    runner_env: Optional[dict] = None,
    binding: bool = True,
    log_path: Optional[Path] = None,
    timeout: float = 120.0,
) -> SmokeResult:
    """Run the smoke test against one build's tools (`bin_dir`) and, with `binding`, its libllama (`lib_dir`).

    `runner` prefixes every tool command (qemu-aarch64 and its -cpu for a cross build). Nothing here raises for a
    broken build: the verdict is in the result.
    """
    from .convert import convert

    start = time.monotonic()
    label = " ".join(runner) if runner else "native"
    src = fixture_dir()
    if src is None:
        return SmokeResult(passed=True, skipped=f"the {FIXTURE} fixture is not shipped with this edgemoe", runner=label)
    bin_dir, lib_dir = Path(bin_dir), Path(lib_dir)
    result = SmokeResult(passed=True, runner=label)
    with (
        tempfile.TemporaryDirectory(prefix="edgemoe-smoke-") as tmp,
        open(log_path or Path(tmp) / "smoke.log", "w") as log,
    ):
        result.log = str(log_path) if log_path else ""
        models = {"F16": Path(tmp) / "F16.gguf"}
        convert(src, models["F16"], "f16")
        prompt = chat_prompt_text(models["F16"])
        for ftype in SMOKE_FTYPES[1:]:
            out = Path(tmp) / f"{ftype}.gguf"
            rc, _, err = _run(
                [*(runner or []), str(bin_dir / "llama-quantize"), str(models["F16"]), str(out), ftype, "2"],
                log,
                timeout * 2,
                runner_env,
            )
            if rc != 0:
                detail, crashed = _failure(rc, err)
                result.cases.append(SmokeCase(ftype, "tools", False, f"llama-quantize {detail}", crashed))
            else:
                models[ftype] = out
        _tools_cases(result, bin_dir, models, prompt, runner, runner_env, log, timeout)
        if binding:
            _binding_cases(result, lib_dir, models, log, timeout)
    result.cases.sort(key=lambda c: (SMOKE_FTYPES.index(c.ftype), c.path))
    result.passed = not result.failing
    result.seconds = round(time.monotonic() - start, 1)
    return result


def completion_args(model: Path, prompt: str, n_tokens: int) -> list[str]:
    """llama-completion's arguments for a repeatable greedy run of `prompt` (raw text, no chat mode)."""
    return ["-m", str(model), "-p", prompt, "-n", str(n_tokens), "--temp", "0", "--ignore-eos", "-no-cnv",
            "--no-display-prompt", "--no-warmup", "-c", "256", "-t", "2", "--seed", "1"]  # fmt: skip


def _tools_cases(
    result: SmokeResult,
    bin_dir: Path,
    models: dict[str, Path],
    prompt: str,
    runner: Optional[list[str]],
    runner_env: Optional[dict],
    log,
    timeout: float,
) -> None:
    reference: Optional[list[str]] = None
    for ftype, model in models.items():
        cmd = [*(runner or []), str(bin_dir / "llama-completion"), *completion_args(model, prompt, N_TOKENS)]
        rc, out, err = _run(cmd, log, timeout, runner_env)
        if not result.system_info:
            # "0.00.077.923 I system_info: n_threads = 2 (...) / 2 | CPU : SSE3 = 1 | ..."
            result.system_info = next(
                (
                    line.split("system_info:", 1)[1].split("|", 1)[-1].strip()
                    for line in err.splitlines()
                    if "system_info:" in line
                ),
                "",
            )
        if rc != 0:
            detail, crashed = _failure(rc, err)
            result.cases.append(SmokeCase(ftype, "tools", False, f"llama-completion {detail}", crashed))
            if ftype == "F16":
                return  # nothing to compare the others with
            continue
        words = out.split()
        if reference is None:
            reference = words
            ok = len(words) >= MIN_SAME_WORDS
            detail = f"{len(words)} words" if ok else "wrote almost nothing"
        else:
            same = next(
                (i for i, (a, b) in enumerate(zip(reference, words)) if a != b), min(len(reference), len(words))
            )
            ok = same >= MIN_SAME_WORDS
            detail = f"first {same} words as F16" + ("" if ok else f" (needs {MIN_SAME_WORDS}): wrong result")
        result.cases.append(SmokeCase(ftype, "tools", ok, detail, text=out.strip()[:200]))


def _binding_cases(result: SmokeResult, lib_dir: Path, models: dict[str, Path], log, timeout: float) -> None:
    env = {"LLAMA_CPP_LIB_PATH": str(lib_dir)}
    reference: Optional[Path] = None
    for ftype, model in models.items():
        scores = model.with_suffix(".npz")
        cmd = [sys.executable, "-m", "edgemoe_cli.smoke", "--score", str(model), str(scores)]
        if reference is not None:
            cmd += ["--reference", str(reference)]
        rc, out, err = _run(cmd, log, timeout, env)
        if rc != 0:
            detail, crashed = _failure(rc, err)
            result.cases.append(SmokeCase(ftype, "binding", False, detail, crashed))
            if ftype == "F16":
                return
            continue
        if reference is None:
            reference = scores
            result.cases.append(SmokeCase(ftype, "binding", True, "reference"))
            continue
        mean_kl, top1 = compare_scores(reference, scores)
        ok = mean_kl <= MAX_MEAN_KL and top1 >= MIN_TOP1
        detail = f"mean KL {mean_kl:.2g}, top-1 {top1:.0%}" + (
            "" if ok else f" (bounds {MAX_MEAN_KL}, {MIN_TOP1:.0%}): wrong result"
        )
        result.cases.append(SmokeCase(ftype, "binding", ok, detail, mean_kl=mean_kl, top1=top1))


def compare_scores(reference: Path, candidate: Path) -> tuple[float, float]:
    """(mean KL(reference || candidate), top-1 agreement) over the scored positions; NaN logits count as wrong."""
    import numpy as np

    ref, cand = np.load(reference)["logprobs"], np.load(candidate)["logprobs"]
    if ref.shape != cand.shape or not np.isfinite(cand).all():
        return float("inf"), 0.0
    kl = (np.exp(ref) * (ref - cand)).sum(axis=1)
    return float(kl.mean()), float((ref.argmax(axis=1) == cand.argmax(axis=1)).mean())


def _score_child(model: str, out: str, reference: Optional[str]) -> None:
    """Child process: greedy N_TOKENS from the fixture's prompt (or the reference's tokens, teacher-forced) and
    the log-probabilities at those positions, saved to `out`. Loaded with `run`'s defaults (mmap, repacking)."""
    import numpy as np

    from .llamacpp import import_binding

    llama_cpp = import_binding()
    llm = llama_cpp.Llama(model_path=model, n_ctx=256, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False)
    prompt = llm.tokenize(chat_prompt_text(Path(model)).encode(), add_bos=True, special=True)
    if reference is None:
        llm.eval(prompt)
        tokens = []
        for _ in range(N_TOKENS):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([tokens[-1]])
    else:
        tokens = [int(t) for t in np.load(reference)["tokens"]]
        llm.eval(prompt + tokens[:-1])
    rows = np.asarray(llm.scores[len(prompt) - 1 : len(prompt) - 1 + len(tokens)], dtype=np.float64)
    rows -= rows.max(axis=1, keepdims=True)
    logprobs = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
    with open(out, "wb") as f:
        np.savez(f, tokens=np.asarray(tokens, dtype=np.int64), logprobs=logprobs)
    print(json.dumps({"tokens": tokens, "system_info": llama_cpp.llama_print_system_info().decode().strip()}))


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--score":
        _score_child(
            sys.argv[2], sys.argv[3], sys.argv[5] if len(sys.argv) >= 6 and sys.argv[4] == "--reference" else None
        )
    else:
        sys.exit("usage: python -m edgemoe_cli.smoke --score MODEL.gguf OUT.npz [--reference REF.npz]")
