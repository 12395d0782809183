"""Load a GGUF with llama-cpp-python and generate a chat reply: streamed text pieces, then a RunResult with the
reply split into reasoning and answer, and the timings (TTFT, prompt and generation tokens/s, peak RSS).

The token loop drives libllama directly (decode one token, sample, detokenize) rather than through
`Llama.create_completion`, so the Python overhead per token stays far below one decode: tokens/s should match
llama-bench's text-generation number on the same GGUF, build and threads.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import functools
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from . import chat
from .errors import EdgeMoEError
from .gguffile import GGUF_MAGIC, architecture, check_gguf  # noqa: F401 (generate.check_gguf: its API too)
from .llamacpp import BindingInfo, binding_info, import_binding  # noqa: F401 (binding_info: generate's API too)

_CTX_STEP = 256  # a context planned from a run's own length is rounded up to whole steps of this many tokens

# ERNIE ends a PT turn with <|end_of_sentence|>; llama.cpp's end-of-generation set covers </s> and <|im_end|>
EXTRA_STOP_TEXTS = ("<|end_of_sentence|>",)

OnText = Callable[[str, str], None]  # (kind: "reasoning" | "answer", text)


@dataclass
class RunResult:
    reasoning: str
    answer: str
    raw: str  # the model's text exactly as generated (tags included, stop token excluded)
    prompt_tokens: int
    completion_tokens: int  # generated tokens in `raw` (the stop token is not counted)
    ttft_s: float  # request to first generated token: tokenizing + prompt processing + first sample
    prompt_tps: float  # prompt tokens / prompt processing time
    gen_tps: float | None  # decode steps / their time, first token excluded (as llama-bench's tg); None if < 2
    peak_rss_bytes: int  # the process's peak resident memory so far (model pages touched included)
    tool_call: str | None  # JSON text of a <tool_call>, when the Thinking model made one
    finish_reason: str  # "stop" (end-of-sequence) or "length" (max_tokens or context full)
    library: str  # the libllama that ran it
    streaming: dict | None = None  # stream.StreamStats when --memory made the run stream experts, else None


def default_threads() -> int:
    """Physical cores this process may use: llama.cpp's own default; SMT siblings only slow decoding down."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False) or usable
    return max(1, min(usable, physical))


@contextlib.contextmanager
def _llama_defaults(llama_cpp, repack: bool, cb_eval, cb_eval_user_data=None):
    """Llama() starts from llama.cpp's default model and context params and has no argument for extra buffer types
    (weight repacking) or an eval callback: change those defaults while it loads, and only then."""
    module = llama_cpp.llama_cpp
    model_defaults, context_defaults = module.llama_model_default_params, module.llama_context_default_params

    def model_params():
        params = model_defaults()
        params.use_extra_bufts = repack
        return params

    def context_params():
        params = context_defaults()
        if cb_eval is not None:
            params.cb_eval, params.cb_eval_user_data = cb_eval, cb_eval_user_data
        return params

    module.llama_model_default_params, module.llama_context_default_params = model_params, context_params
    try:
        yield
    finally:
        module.llama_model_default_params, module.llama_context_default_params = model_defaults, context_defaults


def load_model(
    path: str | Path,
    ctx: int = 4096,
    threads: int | None = None,
    n_ubatch: int = 512,
    repack: bool = True,
    cb_eval=None,
    cb_eval_user_data: int | None = None,
):
    """Load a GGUF language model for chat; returns a llama_cpp.Llama (n_ctx=0 takes the model's trained length).

    `repack=False` keeps every weight in the file's own layout, mapped from the file (llama.cpp's extra buffer
    types copy repackable weights into anonymous memory); `cb_eval` is a ggml scheduler eval callback, called with
    `cb_eval_user_data` (an address).
    """
    path = check_gguf(path)
    llama_cpp = import_binding()
    threads = threads or default_threads()
    try:
        with _llama_defaults(llama_cpp, repack, cb_eval, cb_eval_user_data):
            return llama_cpp.Llama(
                model_path=str(path),
                n_ctx=ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_ubatch=n_ubatch,
                verbose=False,
            )
    except (ValueError, RuntimeError, OSError) as e:
        arch = architecture(path)
        what = f"architecture {arch!r}" if arch else "no general.architecture key"
        raise EdgeMoEError(
            f"{path}: llama.cpp cannot load this GGUF as a language model ({what})",
            "give a model GGUF made by `edgemoe convert` or `edgemoe quantize`",
        ) from e


def _token_text(llama_cpp, vocab, token: int) -> str:
    return llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", "replace")


def chat_prompt(llm, prompt: str, system: str | None = None) -> tuple[str, bool]:
    """The prompt text rendered with the GGUF's chat template, and whether it is a Thinking prompt.

    A GGUF without `tokenizer.chat_template` gets the text as is (plain continuation).
    """
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return (f"{system}\n{prompt}" if system else prompt), False
    llama_cpp = import_binding()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    special = {
        "bos_token": _token_text(llama_cpp, vocab, llama_cpp.llama_vocab_bos(vocab)),
        "eos_token": _token_text(llama_cpp, vocab, llama_cpp.llama_vocab_eos(vocab)),
    }
    return chat.render_prompt(template, chat.build_messages(prompt, system), special), chat.is_thinking_template(
        template
    )


def reply_context(
    model: str | Path, prompts: list[str], system: str | None, max_tokens: int, ctx: int
) -> tuple[int, int | None]:
    """(context, largest batch) that replies to `prompts` one at a time can reach: the longest prompt, tokenized from
    the GGUF's vocabulary alone (no weights loaded), plus `max_tokens`, in whole steps of _CTX_STEP and never above
    `ctx` (0: the model's). What a --memory plan reserves the KV cache and the compute buffer for, instead of a
    context the replies never fill. A prompt that does not fit leaves (ctx, None): chat_reply says so as ever."""
    from .llamacpp import load_vocab

    llm = load_vocab(check_gguf(model))
    try:
        longest = max(len(tokenize_prompt(llm, chat_prompt(llm, p, system)[0])) for p in prompts)
        if not ctx:  # the trained length, from the metadata (a vocabulary-only model reports none)
            arch = llm.metadata.get("general.architecture", "")
            ctx = int(llm.metadata.get(f"{arch}.context_length", 0) or 0)
    finally:
        llm.close()
    reach = -(-(longest + max_tokens) // _CTX_STEP) * _CTX_STEP
    if longest >= (ctx or reach):
        return ctx, None
    return min(ctx or reach, reach), longest


def tokenize_prompt(llm, text: str) -> list[int]:
    """Tokens of a rendered prompt: special tokens parsed, BOS added only if the GGUF asks and never twice."""
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    bos = llm.token_bos()
    if len(tokens) >= 2 and tokens[0] == tokens[1] == bos:  # template wrote BOS and the vocab added one too
        tokens = tokens[1:]
    return tokens


def _stop_tokens(llm) -> set[int]:
    stops = {llm.token_eos()}
    for text in EXTRA_STOP_TEXTS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if len(ids) == 1:
            stops.add(ids[0])
    return stops


def _sampler(llama_cpp, temp: float, seed: int | None):
    """llama.cpp's default sampling chain: top-k 40, top-p 0.95, min-p 0.05, temperature, seeded draw."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for stage in (
        llama_cpp.llama_sampler_init_top_k(40),
        llama_cpp.llama_sampler_init_top_p(0.95, 1),
        llama_cpp.llama_sampler_init_min_p(0.05, 1),
        llama_cpp.llama_sampler_init_temp(temp),
        llama_cpp.llama_sampler_init_dist(llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF),
    ):
        llama_cpp.llama_sampler_chain_add(chain, stage)
    return chain


def _greedy_picker(llama_cpp, llm) -> Callable[[], int]:
    """Argmax of the last logits, read in place: the same token llama.cpp's greedy sampler picks (the first
    maximum), without copying the vocabulary into a candidate array each step, which costs a few percent of a
    small model's decode time."""
    import numpy as np

    n_vocab = llm.n_vocab()
    view, address = None, None

    def pick() -> int:
        nonlocal view, address
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        at = ctypes.cast(logits, ctypes.c_void_p).value
        if at != address:  # llama.cpp may move its output buffer; rebuild the view only then
            view, address = np.ctypeslib.as_array(logits, shape=(n_vocab,)), at
        return int(view.argmax())

    return pick


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _decode(llama_cpp, llm, tokens: list[int]) -> None:
    for start in range(0, len(tokens), llm.n_batch):
        chunk = tokens[start : start + llm.n_batch]
        batch = (llama_cpp.llama_token * len(chunk))(*chunk)
        if llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(batch, len(chunk))) != 0:
            raise EdgeMoEError("llama.cpp failed to process the prompt", "try a smaller --ctx or a shorter prompt")


def _piece(llama_cpp, vocab, token: int) -> bytes:
    """The bytes a generated token stands for (a UTF-8 character may span several tokens)."""
    size = 64
    while True:
        buf = (ctypes.c_char * size)()
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n >= 0:
            return bytes(buf[:n])
        size = -n  # too small: llama.cpp returns minus the size it needs


def chat_reply(
    llm,
    prompt: str,
    system: str | None = None,
    max_tokens: int = 512,
    temp: float = 0.0,
    seed: int | None = None,
    on_text: OnText | None = None,
    prompt_done: Callable[[], None] | None = None,
) -> RunResult:
    """Generate one reply to `prompt` with a loaded model; `on_text` receives the reply as it streams,
    `prompt_done` is called once the prompt is processed (the expert streamer splits its counts there)."""
    llama_cpp = import_binding()
    t_request = time.perf_counter()
    text, thinking = chat_prompt(llm, prompt, system)
    tokens = tokenize_prompt(llm, text)
    n_ctx = llm.n_ctx()
    if len(tokens) >= n_ctx:
        raise EdgeMoEError(
            f"the prompt is {len(tokens)} tokens, the context only {n_ctx}", "raise --ctx or shorten the prompt"
        )
    budget = min(max_tokens, n_ctx - len(tokens))
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    stops = dict.fromkeys(_stop_tokens(llm), True)  # grows into a cache of llama_vocab_is_eog answers
    splitter = chat.ReplySplitter(thinking)
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    pieces: dict[int, bytes] = {}  # detokenizing through ctypes costs more than a dict lookup
    raw: list[str] = []

    def emit(text: str) -> None:
        raw.append(text)
        if on_text is not None:
            for kind, part in splitter.feed(text):
                on_text(kind, part)

    if temp > 0:
        sampler = _sampler(llama_cpp, temp, seed)
        pick = functools.partial(llama_cpp.llama_sampler_sample, sampler, llm.ctx, -1)
    else:
        sampler, pick = None, _greedy_picker(llama_cpp, llm)
    one = (llama_cpp.llama_token * 1)()
    try:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        llm.n_tokens = 0  # keep Llama's own bookkeeping honest: its cache no longer holds anything
        t_prompt = time.perf_counter()
        _decode(llama_cpp, llm, tokens)
        token = pick()
        t_first = t_last = time.perf_counter()
        if prompt_done is not None:
            prompt_done()
        sampled, finish = 1, "length"
        while True:
            stop = stops.get(token)
            if stop is None:
                stop = stops[token] = bool(llama_cpp.llama_vocab_is_eog(vocab, token))
            if stop:
                finish = "stop"
                break
            piece = pieces.get(token)
            if piece is None:
                piece = pieces[token] = _piece(llama_cpp, vocab, token)
            if decoded := utf8.decode(piece):
                emit(decoded)
            if sampled >= budget:
                break
            one[0] = token
            if llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
                break  # context full: what we have is the reply
            token = pick()
            t_last = time.perf_counter()
            sampled += 1
    finally:
        if sampler is not None:
            llama_cpp.llama_sampler_free(sampler)
    if tail := utf8.decode(b"", final=True):
        emit(tail)
    if on_text is not None:
        for kind, part in splitter.flush():
            on_text(kind, part)
    raw_text = "".join(raw)
    completion_tokens = sampled - (finish == "stop")
    reply = chat.parse_reply(raw_text, thinking, truncated=finish == "length")
    prompt_s = t_first - t_prompt
    return RunResult(
        reasoning=reply.reasoning,
        answer=reply.answer,
        raw=raw_text,
        prompt_tokens=len(tokens),
        completion_tokens=completion_tokens,
        ttft_s=round(t_first - t_request, 6),
        prompt_tps=round(len(tokens) / prompt_s, 3) if prompt_s > 0 else 0.0,
        gen_tps=round((sampled - 1) / (t_last - t_first), 3) if sampled > 1 and t_last > t_first else None,
        peak_rss_bytes=peak_rss_bytes(),
        tool_call=reply.tool_call,
        finish_reason=finish,
        library=binding_info().library,
    )


def run(
    model: str | Path,
    prompt: str,
    system: str | None = None,
    max_tokens: int = 512,
    threads: int | None = None,
    ctx: int = 4096,
    temp: float = 0.0,
    seed: int | None = None,
    on_text: OnText | None = None,
    memory: str | int | None = None,
    repack: bool = True,
    warm: str | Path | None = None,
) -> RunResult:
    """`edgemoe run`: load `model`, answer `prompt` once, free the model.

    `memory` (bytes, a size or "auto") caps what the run keeps resident: a model that does not fit streams its
    routed experts from the file (stream.py). `repack=False` runs without llama.cpp's weight repacking (what
    streaming itself runs with; the benchmark's plain mmap baseline). `warm`: a profile.json whose most routed
    experts fill the expert cache before the first token (only when the run streams).
    """
    if not prompt.strip():
        raise EdgeMoEError("the prompt is empty", "give a question with -p TEXT or -f FILE")
    batch = None
    if memory is not None:  # what the cap does not reserve for a context this reply never fills caches experts
        ctx, batch = reply_context(model, [prompt], system, max_tokens, ctx)
    llm, streamer = load_within(model, memory, ctx=ctx, threads=threads, repack=repack, warm=warm, batch=batch)
    try:
        started = time.perf_counter()
        result = chat_reply(
            llm,
            prompt,
            system,
            max_tokens=max_tokens,
            temp=temp,
            seed=seed,
            on_text=on_text,
            prompt_done=streamer.prompt_done if streamer is not None else None,
        )
        if streamer is not None:
            streamer.check()
            stats = streamer.stats()
            stats.compute_s = round(time.perf_counter() - started - stats.read_wait_s - stats.hook_s, 6)
            result.streaming = asdict(stats)
        return result
    finally:
        llm.close()  # before the streamer: the model's expert tensors point into the streamer's regions
        if streamer is not None:
            streamer.close()


def load_within(
    model: str | Path,
    memory: str | int | None,
    ctx: int = 4096,
    threads: int | None = None,
    repack: bool = True,
    warm: str | Path | None = None,
    batch: int | None = None,
):
    """(Llama, stream.ExpertStreamer or None): `model` loaded to live within `memory` (bytes, a size, "auto" or
    None for no cap) — streaming its routed experts when it does not fit (stream.py), today's load when it does.
    `batch`: the most tokens decoded at once, when known (one reply's prompt): the physical batch is planned for it.

    The one way run, compare and serve load under --memory. Close the Llama before the streamer: the model's
    expert tensors point into the streamer's regions.
    """
    if warm is not None and memory is None:
        raise EdgeMoEError("--warm fills the expert cache of --memory", "give --memory SIZE too, or drop --warm")
    if memory is not None:
        from . import stream

        plan = stream.plan_memory(check_gguf(model), memory, ctx, batch)  # too small: an error before loading
        if plan.streams:
            load = functools.partial(load_model, ctx=ctx, threads=threads)
            return stream.load_streaming(model, plan, load, warm=warm)
    return load_model(model, ctx=ctx, threads=threads, repack=repack), None


def read_prompt(prompt: str | None, prompt_file: str | Path | None) -> str:
    """The user message from -p TEXT or -f FILE (- is stdin): exactly one of them, not empty."""
    if prompt is not None and prompt_file is not None:
        raise EdgeMoEError("give the prompt once: -p TEXT or -f FILE, not both", "drop one of -p / -f")
    if prompt_file is not None:
        try:
            text = sys.stdin.read() if str(prompt_file) == "-" else Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeMoEError(f"cannot read prompt file {prompt_file}: {e}", "give a readable UTF-8 text file") from e
        if not text.strip():
            raise EdgeMoEError(f"prompt file {prompt_file} is empty", "write the question into it, or use -p TEXT")
        return text.strip("\n")
    if prompt is None or not prompt.strip():
        raise EdgeMoEError("no prompt given", "ask with -p 'What is 51 - 29?' or -f question.txt")
    return prompt
