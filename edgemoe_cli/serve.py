"""`edgemoe serve`: an OpenAI-compatible HTTP server on edgemoe's own generator, with ERNIE Thinking parsed right.

Why our generator and not llama-server behind a proxy (bench/serve_engines.md, README "serve"): the pinned
llama-server returns an ERNIE Thinking reply as one `content` string with `</think>` and `<response>` in it and no
`reasoning_content`, whatever --reasoning-format says, so the ERNIE-specific work (splitting reasoning, answer and
tool calls, streamed) would be ours either way; our generator already does it in `run`, renders the same template
with the same tokens, keeps one process and no second hop per token, and is the one that gets expert streaming.

The pieces, all stdlib:
    Engine      one model loaded once; `parallel` slots, each its own llama context (KV cache) on that model
    Scheduler   one FIFO queue in front of the slots (fair: first come, first served); full -> 503
    Handler     http.server request handler: auth, JSON validation, OpenAI shapes, SSE, disconnect detection
A slot's generation checks its job's `cancelled` flag every token: a client that goes away (seen by a failed write
or by polling its socket) stops its generation and frees the slot at the next token.
"""

from __future__ import annotations

import codecs
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from . import chat
from .errors import EdgeMoEError

DEFAULT_MAX_TOKENS_CAP = 4096  # a request without max_tokens may use the rest of its context, up to this


# ---- options and the engine -------------------------------------------------------------------------------------


@dataclass
class ServeOptions:
    model: Path
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    ctx: int = 4096  # per slot: every request may use this many tokens of prompt + reply
    parallel: int = 1  # slots: requests generated at the same time (each with its own KV cache)
    threads: int | None = None  # CPU threads in all; each slot gets threads // parallel (at least 1)
    queue: int = 16  # requests waiting for a slot beyond those being generated; more get 503
    model_id: str | None = None  # the name /v1/models reports and requests must use (default: the file's stem)
    workers: list | None = None  # cluster.WorkerAddress list: the layers split across `edgemoe worker`s
    memory: str | int | None = None  # --memory: stay within it, streaming routed experts if the model is larger
    warm: str | Path | None = None  # --warm: a profile.json whose hottest experts fill the expert cache at start


@dataclass
class Generation:
    """What a slot produced for one job."""

    text: str  # the model's text as generated (tags included, stop token and stop string excluded)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    gen_s: float  # seconds from the first generated token to the last


@dataclass
class Job:
    tokens: list[int]
    max_tokens: int
    temperature: float
    seed: int | None
    stop: list[str]
    ignore_eos: bool = False
    events: queue.Queue = field(
        default_factory=queue.Queue
    )  # ("text", str) ... then ("done", Generation) | ("error", str)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Metrics:
    """Counters for /metrics (Prometheus text format); updated from handler and slot threads under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.errors = 0
        self.cancelled = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.gen_seconds = 0.0
        self.last_tps = 0.0
        self.busy = 0

    def request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            if status >= 400:
                self.errors += 1

    def generated(self, g: Generation) -> None:
        with self.lock:
            self.prompt_tokens += g.prompt_tokens
            self.completion_tokens += g.completion_tokens
            self.gen_seconds += g.gen_s
            if g.completion_tokens > 1 and g.gen_s > 0:
                self.last_tps = (g.completion_tokens - 1) / g.gen_s
            if g.finish_reason == "cancelled":
                self.cancelled += 1

    def render(self, queue_depth: int, slots: int, streaming=None) -> str:
        """`streaming`: stream.StreamStats of the expert cache when the model streams under --memory."""
        with self.lock:
            mean_tps = self.completion_tokens / self.gen_seconds if self.gen_seconds > 0 else 0.0
            lines = [
                "# HELP edgemoe_requests_total HTTP requests answered, by path and status.",
                "# TYPE edgemoe_requests_total counter",
                *(
                    f'edgemoe_requests_total{{path="{p}",status="{s}"}} {n}'
                    for (p, s), n in sorted(self.requests.items())
                ),
                "# HELP edgemoe_errors_total Requests answered with a 4xx or 5xx status.",
                "# TYPE edgemoe_errors_total counter",
                f"edgemoe_errors_total {self.errors}",
                "# HELP edgemoe_cancelled_total Generations stopped because the client went away.",
                "# TYPE edgemoe_cancelled_total counter",
                f"edgemoe_cancelled_total {self.cancelled}",
                "# HELP edgemoe_prompt_tokens_total Prompt tokens processed.",
                "# TYPE edgemoe_prompt_tokens_total counter",
                f"edgemoe_prompt_tokens_total {self.prompt_tokens}",
                "# HELP edgemoe_completion_tokens_total Tokens generated.",
                "# TYPE edgemoe_completion_tokens_total counter",
                f"edgemoe_completion_tokens_total {self.completion_tokens}",
                "# HELP edgemoe_tokens_per_second Generation speed of the last finished request (decode steps/s).",
                "# TYPE edgemoe_tokens_per_second gauge",
                f"edgemoe_tokens_per_second {self.last_tps:.3f}",
                "# HELP edgemoe_tokens_per_second_mean Tokens generated / seconds spent generating, since start.",
                "# TYPE edgemoe_tokens_per_second_mean gauge",
                f"edgemoe_tokens_per_second_mean {mean_tps:.3f}",
                "# HELP edgemoe_queue_depth Requests waiting for a slot.",
                "# TYPE edgemoe_queue_depth gauge",
                f"edgemoe_queue_depth {queue_depth}",
                "# HELP edgemoe_slots_busy Slots generating now.",
                "# TYPE edgemoe_slots_busy gauge",
                f"edgemoe_slots_busy {self.busy}",
                "# HELP edgemoe_slots Slots (requests generated at the same time).",
                "# TYPE edgemoe_slots gauge",
                f"edgemoe_slots {slots}",
            ]
            if streaming is not None:
                lines += [
                    "# HELP edgemoe_expert_cache_bytes Expert cache under --memory (routed experts kept resident).",
                    "# TYPE edgemoe_expert_cache_bytes gauge",
                    f"edgemoe_expert_cache_bytes {streaming.cache_bytes}",
                    "# HELP edgemoe_expert_cache_hit_ratio Expert lookups found in the cache, since start.",
                    "# TYPE edgemoe_expert_cache_hit_ratio gauge",
                    f"edgemoe_expert_cache_hit_ratio {streaming.hit_rate}",
                    "# HELP edgemoe_expert_bytes_read_total Bytes of experts read from the GGUF.",
                    "# TYPE edgemoe_expert_bytes_read_total counter",
                    f"edgemoe_expert_bytes_read_total {streaming.bytes_read}",
                    "# HELP edgemoe_expert_read_wait_seconds_total Seconds spent waiting on expert reads.",
                    "# TYPE edgemoe_expert_read_wait_seconds_total counter",
                    f"edgemoe_expert_read_wait_seconds_total {streaming.read_wait_s}",
                ]
        return "\n".join(lines) + "\n"


class Engine:
    """One model, `parallel` llama contexts on it, a FIFO queue and one thread per context."""

    def __init__(self, opts: ServeOptions):
        from . import generate
        from .llamacpp import import_binding

        if opts.parallel < 1 or opts.queue < 0:
            raise EdgeMoEError("--parallel must be >= 1 and --queue >= 0", "e.g. --parallel 2 --queue 16")
        self.generate = generate
        self.llama_cpp = llama_cpp = import_binding()
        total_threads = opts.threads or generate.default_threads()
        self.slot_threads = max(1, total_threads // opts.parallel)
        self.split = None
        self.streamer = None
        if opts.workers and opts.memory is not None:
            raise EdgeMoEError("--memory and --workers do not go together", "split across workers, or stream: not both")
        if opts.workers:
            from . import cluster

            if opts.parallel != 1:  # the slots would share each worker's one RPC connection from several threads
                raise EdgeMoEError(
                    "--workers serves one request at a time", "drop --parallel, or serve without --workers"
                )
            llm, self.split = cluster.load_split_model(
                opts.model, opts.workers, ctx=opts.ctx, threads=self.slot_threads
            )
            self.llm = llm
        else:
            self.llm, self.streamer = generate.load_within(
                opts.model, opts.memory, ctx=opts.ctx, threads=self.slot_threads, warm=opts.warm
            )
            llm = self.llm
            if self.streamer is not None and opts.parallel != 1:
                # the expert cache is the model's: two slots at different layers would evict what the other reads
                self.close()
                raise EdgeMoEError(
                    "a model streamed under --memory serves one request at a time",
                    "drop --parallel, or give --memory enough for the whole model",
                )
        self.model_id = opts.model_id or Path(opts.model).stem
        self.n_ctx = llm.n_ctx()
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.template = llm.metadata.get("tokenizer.chat_template")
        self.thinking = chat.is_thinking_template(self.template)
        self.special = {
            "bos_token": generate._token_text(llama_cpp, self.vocab, llama_cpp.llama_vocab_bos(self.vocab)),
            "eos_token": generate._token_text(llama_cpp, self.vocab, llama_cpp.llama_vocab_eos(self.vocab)),
        }
        self.stop_tokens = dict.fromkeys(generate._stop_tokens(llm), True)
        self.eog_cache = dict(self.stop_tokens)
        self.pieces: dict[int, bytes] = {}  # token -> its bytes, shared by the slots (a dict is safe under the GIL)
        # slot 0 is the Llama's own context; the others share its model (weights loaded once) with their own KV
        self.contexts = [llm.ctx]
        self._own_contexts = []
        for _ in range(opts.parallel - 1):
            params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
            ctx = llama_cpp.llama_init_from_model(llm.model, params)
            if not ctx:
                self.close()
                raise EdgeMoEError(
                    f"llama.cpp could not create {opts.parallel} contexts of {opts.ctx} tokens",
                    "lower --parallel or --ctx",
                )
            self.contexts.append(ctx)
            self._own_contexts.append(ctx)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.waiting = 0  # jobs queued, not yet taken by a slot
        self.waiting_lock = threading.Lock()
        self.queue_limit = opts.queue
        self.metrics = Metrics()
        self.workers = [
            threading.Thread(target=self._slot_loop, args=(ctx,), name=f"slot-{i}", daemon=True)
            for i, ctx in enumerate(self.contexts)
        ]
        for w in self.workers:
            w.start()

    # -- prompts --

    def render(self, messages: list[dict], tools: list | None) -> str:
        if not self.template:  # a GGUF without a chat template: the messages' text, one per line
            return "\n".join(m["content"] for m in messages)
        variables = dict(self.special)
        if tools:
            variables["tools"] = tools
        return chat.render_prompt(self.template, messages, variables)

    def tokenize(self, text: str) -> list[int]:
        return self.generate.tokenize_prompt(self.llm, text)

    # -- queue --

    def submit(self, job: Job) -> bool:
        """Queue a job; False when every slot is busy and `queue` jobs already wait (the caller answers 503)."""
        with self.waiting_lock:
            if self.metrics.busy + self.waiting >= len(self.contexts) + self.queue_limit:
                return False
            self.waiting += 1
        self.jobs.put(job)
        return True

    def queue_depth(self) -> int:
        with self.waiting_lock:
            return self.waiting

    def _slot_loop(self, ctx) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self.waiting_lock:
                self.waiting -= 1
                self.metrics.busy += 1
            try:
                if job.cancelled.is_set():
                    result = Generation("", len(job.tokens), 0, "cancelled", 0.0)
                else:
                    result = self._generate(ctx, job)
                self.metrics.generated(result)
                job.events.put(("done", result))
            except Exception as e:  # a failed decode must answer this request and keep the slot alive
                job.events.put(("error", f"generation failed: {e}"))
            finally:
                with self.waiting_lock:
                    self.metrics.busy -= 1

    def _generate(self, ctx, job: Job) -> Generation:
        g, llama_cpp = self.generate, self.llama_cpp
        # the generator's helpers take a Llama; this slot's view of one: its own context, the shared model
        view = SimpleNamespace(ctx=ctx, n_batch=self.llm.n_batch, n_vocab=self.llm.n_vocab)
        budget = min(job.max_tokens, self.n_ctx - len(job.tokens))
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        if job.temperature > 0:
            sampler = g._sampler(llama_cpp, job.temperature, job.seed)
            pick = lambda: llama_cpp.llama_sampler_sample(sampler, ctx, -1)  # noqa: E731
        else:
            sampler, pick = None, g._greedy_picker(llama_cpp, view)
        one = (llama_cpp.llama_token * 1)()
        text, held = [], ""  # held: text that might be the start of a stop string
        longest_stop = max((len(s) for s in job.stop), default=0)
        finish, sampled, eog_stop = "length", 0, False
        t_first = t_last = time.perf_counter()
        try:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            g._decode(llama_cpp, view, job.tokens)
            token = pick()
            t_first = t_last = time.perf_counter()
            sampled = 1
            while True:
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                eog = self.eog_cache.get(token)
                if eog is None:
                    eog = self.eog_cache[token] = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
                if eog and not job.ignore_eos:
                    finish, eog_stop = "stop", True
                    break
                piece = self.pieces.get(token)
                if piece is None:  # detokenizing through ctypes costs more than a dict lookup
                    piece = self.pieces[token] = g._piece(llama_cpp, self.vocab, token)
                if decoded := utf8.decode(piece):
                    if job.stop:  # hold back what could be the start of a stop string
                        held += decoded
                        hit = min((at for at in (held.find(s) for s in job.stop) if at >= 0), default=-1)
                        if hit >= 0:
                            decoded, held, finish = held[:hit], "", "stop"
                        else:
                            cut = max(0, len(held) - (longest_stop - 1))
                            decoded, held = held[:cut], held[cut:]
                    if decoded:
                        text.append(decoded)
                        job.events.put(("text", decoded))
                    if finish == "stop":
                        break
                if sampled >= budget:
                    break
                one[0] = token
                if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
                    break  # context full
                token = pick()
                t_last = time.perf_counter()
                sampled += 1
        finally:
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
        if self.streamer is not None:
            self.streamer.check()  # a failed expert read: what was generated is not valid
        tail = held + utf8.decode(b"", final=True)
        if tail and finish != "cancelled":
            text.append(tail)
            job.events.put(("text", tail))
        return Generation("".join(text), len(job.tokens), sampled - eog_stop, finish, t_last - t_first)

    def close(self) -> None:
        """Stop the slots (a running generation is cancelled by its handler first) and free the contexts."""
        for _ in getattr(self, "workers", []):
            self.jobs.put(None)
        for w in getattr(self, "workers", []):
            w.join(timeout=30)
        for ctx in getattr(self, "_own_contexts", []):
            self.llama_cpp.llama_free(ctx)
        self._own_contexts = []
        if getattr(self, "llm", None) is not None:
            self.llm.close()
        if getattr(self, "streamer", None) is not None:
            self.streamer.close()  # after the model: its expert tensors point into the streamer's regions
            self.streamer = None


# ---- OpenAI request and response shapes ----------------------------------------------------------------------------


class ApiError(Exception):
    """An OpenAI-style error answer: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None, kind: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, kind: type, default, low=None, high=None):
    value = body.get(name)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float) if kind is float else int)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        bounds = f" in [{low}, {high}]" if high is not None else (f" >= {low}" if low is not None else "")
        raise ApiError(
            400, f"'{name}' must be {'a number' if kind is float else 'an integer'}{bounds}", "invalid_value", name
        )
    return kind(value)


def _text_content(content, where: str) -> str:
    """A message's content as text: a string, or OpenAI's list of parts of which only text parts are accepted."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"{where}: only text content parts are supported", "invalid_value", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", "invalid_value", "messages")


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            400, "'messages' is required: a non-empty list of {role, content}", "missing_messages", "messages"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(
                400, f"messages[{i}] needs a role of system, user, assistant or tool", "invalid_value", "messages"
            )
        message = {**m, "content": _text_content(m.get("content"), f"messages[{i}]")}
        if message["role"] == "developer":  # OpenAI's newer name for the system role; templates know `system`
            message["role"] = "system"
        out.append(message)
    return out


def parse_sampling(body: dict, engine: Engine, tokens: list[int]) -> dict:
    """max_tokens, temperature, seed, stop and ignore_eos of a request, checked; the prompt checked against the
    context."""
    if len(tokens) >= engine.n_ctx:
        raise ApiError(
            400,
            f"the prompt is {len(tokens)} tokens, the context only {engine.n_ctx}",
            "context_length_exceeded",
            "messages" if "messages" in body else "prompt",
        )
    if _number(body, "n", int, 1, 1) != 1:
        raise ApiError(400, "only n=1 is supported", "invalid_value", "n")
    room = engine.n_ctx - len(tokens)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", int, min(room, DEFAULT_MAX_TOKENS_CAP), 1)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "invalid_value", "stop")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be true or false", "invalid_value", "ignore_eos")
    return {
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", float, 0.8, 0, 2),
        "seed": _number(body, "seed", int, None),
        "stop": stop,
        "ignore_eos": ignore_eos,
    }


def openai_tool_call(call_text: str) -> dict | None:
    """ERNIE's `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` body as an OpenAI tool call, or None
    when it is not a JSON object with a name (then the text is returned as content instead)."""
    try:
        call = json.loads(call_text)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": arguments},
    }


def chat_message(raw: str, thinking: bool, finish: str) -> tuple[dict, str]:
    """A finished reply as OpenAI's assistant message and finish_reason: reasoning in `reasoning_content`, the
    answer without tags in `content`, a `<tool_call>` as `tool_calls`."""
    reply = chat.parse_reply(raw, thinking, truncated=finish == "length")
    message = {"role": "assistant", "content": reply.answer}
    if thinking:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_call is not None and (call := openai_tool_call(reply.tool_call)):
        message["content"] = None
        message["tool_calls"] = [call]
        return message, "tool_calls"
    return message, finish


class ChatStream:
    """Turns generated text pieces into OpenAI chat deltas: `reasoning_content` while the Thinking model reasons,
    then `content` without tags; a tool call is held back and sent whole as `tool_calls` when it is complete."""

    def __init__(self, thinking: bool):
        self.thinking = thinking
        self.splitter = chat.ReplySplitter(thinking)
        self.raw = ""
        self.held_tool_text = False  # answer text not sent because it is inside a <tool_call>

    def _in_tool_call(self) -> bool:
        tool_at = self.raw.find(chat.TOOL_OPEN)
        response_at = self.raw.find(chat.RESPONSE_OPEN)
        return self.thinking and tool_at >= 0 and (response_at < 0 or tool_at < response_at)

    def _deltas(self, segments) -> list[dict]:
        out = []
        for kind, part in segments:
            if kind == "reasoning":
                out.append({"reasoning_content": part})
            elif self._in_tool_call():
                self.held_tool_text = True
            else:
                out.append({"content": part})
        return out

    def feed(self, text: str) -> list[dict]:
        self.raw += text
        return self._deltas(self.splitter.feed(text))

    def finish(self, finish: str) -> tuple[list[dict], str]:
        deltas = self._deltas(self.splitter.flush())
        if self.held_tool_text or self._in_tool_call():
            message, finish = chat_message(self.raw, self.thinking, finish)
            if message.get("tool_calls"):
                deltas.append({"tool_calls": [{"index": 0, **message["tool_calls"][0]}]})
            elif message["content"]:  # not a valid call: what was held back is the answer after all
                deltas.append({"content": message["content"]})
        return deltas, finish


# ---- HTTP --------------------------------------------------------------------------------------------------------

MAX_BODY_BYTES = 16 * 2**20


class ClientGone(Exception):
    pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address, engine: Engine, api_key: str | None, log: Callable[[str], None]):
        self.engine, self.api_key, self.log = engine, api_key, log
        self.stopping = threading.Event()
        self.in_flight = 0
        self.in_flight_lock = threading.Lock()
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgemoe"
    # a socket timeout on every connection: a client that promises a body and never sends it, or stops reading a
    # stream, or idles on keep-alive, frees its thread (and a stream's slot) instead of holding it forever
    timeout = 120
    server: Server

    # -- plumbing --

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        self.server.log(f"{self.address_string()} {format % args}")

    def _send_json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.engine.metrics.request(self._route, status)

    def _send_error(self, e: ApiError) -> None:
        self._send_json(e.status, e.body())

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _events(self, job: Job):
        """The job's events as they come; a client that went away, or a server stopping, cancels the job."""
        while True:
            try:
                event = job.events.get(timeout=0.2)
            except queue.Empty:
                if self._client_gone() or self.server.stopping.is_set():
                    job.cancelled.set()
                continue
            yield event
            if event[0] in ("done", "error"):
                return

    def _read_json(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(400, "a JSON body with a Content-Length is required", "invalid_body") from None
        if length < 0 or length > MAX_BODY_BYTES:
            raise ApiError(400, f"the body must be at most {MAX_BODY_BYTES} bytes", "invalid_body")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", "invalid_json")
        return body

    def _authorize(self) -> None:
        import hmac

        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)", "invalid_api_key")

    def _check_model(self, body: dict) -> None:
        engine = self.server.engine
        model = body.get("model")
        if model is not None and model not in (engine.model_id, Path(engine.llm.model_path).name):
            raise ApiError(
                404,
                f"the model '{model}' does not exist; this server serves '{engine.model_id}'",
                "model_not_found",
                "model",
            )

    # -- routes --

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self._route = self.path.split("?", 1)[0]
        routes = {
            ("GET", "/health"): self._health,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
        }
        with self.server.in_flight_lock:
            self.server.in_flight += 1
        try:
            handler = routes.get((method, self._route))
            if handler is None:
                known = any(path == self._route for _, path in routes)
                raise ApiError(
                    405 if known else 404,
                    f"{method} {self._route} is not served here",
                    "method_not_allowed" if known else "not_found",
                )
            if self._route.startswith("/v1/"):
                self._authorize()
            if self.server.stopping.is_set():
                raise ApiError(503, "the server is shutting down", "shutting_down")
            handler()
        except ApiError as e:
            self.close_connection = True
            self._send_error(e)
        except ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client went away or went silent
            self.close_connection = True
        except Exception as e:  # one request's bug must not take the server down: answer 500 and log it
            self.close_connection = True
            self.server.log(f"internal error on {method} {self._route}: {type(e).__name__}: {e}")
            try:
                self._send_error(ApiError(500, f"internal error: {type(e).__name__}", "internal_error"))
            except OSError:
                pass
        finally:
            with self.server.in_flight_lock:
                self.server.in_flight -= 1

    def _health(self) -> None:
        self._send_json(200, {"status": "ok"})

    def _metrics(self) -> None:
        engine = self.server.engine
        streaming = engine.streamer.stats() if engine.streamer is not None else None
        body = engine.metrics.render(engine.queue_depth(), len(engine.contexts), streaming).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        engine.metrics.request(self._route, 200)

    def _models(self) -> None:
        engine = self.server.engine
        self._send_json(
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": engine.model_id,
                        "object": "model",
                        "created": int(os.path.getmtime(engine.llm.model_path)),
                        "owned_by": "edgemoe",
                        "meta": {"n_ctx": engine.n_ctx, "thinking": engine.thinking},
                    }
                ],
            },
        )

    def _queue(self, tokens: list[int], sampling: dict) -> Job:
        job = Job(tokens=tokens, **sampling)
        if not self.server.engine.submit(job):
            raise ApiError(
                503, "every slot is busy and the queue is full; retry later", "queue_full", kind="server_error"
            )
        return job

    def _chat(self) -> None:
        engine = self.server.engine
        body = self._read_json()
        self._check_model(body)
        messages = parse_messages(body)
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise ApiError(400, "'tools' must be a list", "invalid_value", "tools")
        try:
            prompt = engine.render(messages, tools)
        except EdgeMoEError as e:
            raise ApiError(400, e.message, "template_error", "messages") from None
        except (KeyError, TypeError) as e:
            raise ApiError(
                400, f"the messages do not fit the model's chat template: {e}", "template_error", "messages"
            ) from None
        tokens = engine.tokenize(prompt)
        sampling = parse_sampling(body, engine, tokens)
        stream = body.get("stream", False)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        job = self._queue(tokens, sampling)
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "created": created, "model": engine.model_id}
        if not stream:
            generation = self._wait(job)
            message, finish = chat_message(generation.text, engine.thinking, generation.finish_reason)
            self._send_json(
                200,
                {
                    **head,
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                    "usage": _usage(generation),
                },
            )
            return
        translator = ChatStream(engine.thinking)
        chunk = {**head, "object": "chat.completion.chunk"}
        self._start_stream()
        self._sse(
            job,
            {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        )
        for kind, value in self._events(job):
            if kind == "text":
                for delta in translator.feed(value):
                    self._sse(job, {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            elif kind == "error":
                self._sse(job, {"error": {"message": value, "type": "server_error", "code": "generation_failed"}})
            elif value.finish_reason == "cancelled":
                raise ClientGone
            else:
                deltas, finish = translator.finish(value.finish_reason)
                for delta in deltas:
                    self._sse(job, {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                self._sse(job, {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
                if include_usage:
                    self._sse(job, {**chunk, "choices": [], "usage": _usage(value)})
        self._sse_done(job)

    def _completions(self) -> None:
        engine = self.server.engine
        body = self._read_json()
        self._check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' is required: a non-empty string", "missing_prompt", "prompt")
        tokens = engine.tokenize(prompt)
        sampling = parse_sampling(body, engine, tokens)
        job = self._queue(tokens, sampling)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": engine.model_id,
        }
        if not body.get("stream", False):
            generation = self._wait(job)
            self._send_json(
                200,
                {
                    **head,
                    "choices": [
                        {
                            "index": 0,
                            "text": generation.text,
                            "logprobs": None,
                            "finish_reason": generation.finish_reason,
                        }
                    ],
                    "usage": _usage(generation),
                },
            )
            return
        self._start_stream()
        for kind, value in self._events(job):
            if kind == "text":
                self._sse(
                    job, {**head, "choices": [{"index": 0, "text": value, "logprobs": None, "finish_reason": None}]}
                )
            elif kind == "error":
                self._sse(job, {"error": {"message": value, "type": "server_error", "code": "generation_failed"}})
            elif value.finish_reason == "cancelled":
                raise ClientGone
            else:
                self._sse(
                    job,
                    {
                        **head,
                        "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": value.finish_reason}],
                        "usage": _usage(value),
                    },
                )
        self._sse_done(job)

    def _wait(self, job: Job) -> Generation:
        for kind, value in self._events(job):
            if kind == "error":
                raise ApiError(500, value, "generation_failed")
            if kind == "done":
                if value.finish_reason == "cancelled":
                    if self.server.stopping.is_set():
                        raise ApiError(503, "the server is shutting down", "shutting_down")
                    raise ClientGone
                return value
        raise ClientGone

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.server.engine.metrics.request(self._route, 200)

    def _sse(self, job: Job, obj: dict) -> None:
        try:
            self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")
            self.wfile.flush()
        except OSError:
            job.cancelled.set()  # the slot stops at its next token
            raise ClientGone from None

    def _sse_done(self, job: Job) -> None:
        try:
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:
            raise ClientGone from None


def _usage(g: Generation) -> dict:
    return {
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.completion_tokens,
        "total_tokens": g.prompt_tokens + g.completion_tokens,
    }


# ---- running it ------------------------------------------------------------------------------------------------


@dataclass
class ServeInfo:
    url: str
    model: str
    model_id: str
    thinking: bool
    slots: int
    threads_per_slot: int
    ctx: int
    queue: int
    api_key: bool
    library: str
    split: list | None = None  # with --workers: [{device, memory_bytes, layers}]


@dataclass
class ServeSummary:
    requests: int
    errors: int
    cancelled: int
    completion_tokens: int


def serve(opts: ServeOptions, on_ready: Callable[[ServeInfo], None], log: Callable[[str], None]) -> ServeSummary:
    """Load the model, listen, and answer until SIGTERM or SIGINT; then stop taking requests, cancel what runs,
    free the model and return what was served."""
    if not (0 < opts.port < 65536):
        raise EdgeMoEError(f"--port {opts.port} is not a TCP port", "give 1-65535, e.g. --port 8080")
    engine = Engine(opts)
    try:
        httpd = Server((opts.host, opts.port), engine, opts.api_key, log)
    except OSError as e:
        engine.close()
        raise EdgeMoEError(
            f"cannot listen on {opts.host}:{opts.port}: {e.strerror}",
            "another server may hold the port: choose another with --port",
        ) from e
    except socket.gaierror as e:  # pragma: no cover - a subclass of OSError on current Pythons
        engine.close()
        raise EdgeMoEError(f"cannot resolve --host {opts.host}", "give an IP address such as 127.0.0.1") from e

    def on_signal(signum, frame):
        httpd.stopping.set()
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        host, port = httpd.server_address[:2]
        on_ready(
            ServeInfo(
                url=f"http://{host}:{port}",
                model=str(opts.model),
                model_id=engine.model_id,
                thinking=engine.thinking,
                slots=len(engine.contexts),
                threads_per_slot=engine.slot_threads,
                ctx=engine.n_ctx,
                queue=opts.queue,
                api_key=opts.api_key is not None,
                library=engine.generate.binding_info().library,
                split=[vars(p) for p in engine.split.parts] if engine.split else None,
            )
        )
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.stopping.set()
        httpd.server_close()
        # handlers cancel their jobs within a poll interval; give them a bounded time to answer and leave
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with httpd.in_flight_lock:
                if httpd.in_flight == 0:
                    break
            time.sleep(0.05)
        engine.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    m = engine.metrics
    return ServeSummary(
        requests=sum(m.requests.values()), errors=m.errors, cancelled=m.cancelled, completion_tokens=m.completion_tokens
    )


# ---- systemd -----------------------------------------------------------------------------------------------------

UNIT_NAME = "edgemoe-serve.service"


@dataclass
class SystemdUnit:
    path: str
    unit: str  # the file's text (the API key masked)
    enable: list[str]  # the commands that would start it (not run by edgemoe)


def _systemd_word(word: str) -> str:
    """One ExecStart/Environment word, quoted for systemd: `%` and `$` are its specifiers, quotes and backslashes
    are escaped."""
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def default_unit_path() -> Path:
    """Where the unit goes: the system's unit directory as root, else the user's (`systemctl --user`)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/etc/systemd/system") / UNIT_NAME
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "systemd" / "user" / UNIT_NAME


def install_systemd(opts: ServeOptions, path: Path | None = None) -> SystemdUnit:
    """Write (never enable) a systemd unit that runs `edgemoe serve` with these options, this build's library and
    an absolute model path; the API key, if any, goes into the unit as EDGEMOE_API_KEY and the file is 0600."""
    from .generate import check_gguf, default_threads
    from .llamacpp import select_binding_library

    model = check_gguf(opts.model).resolve()
    path = Path(path) if path else default_unit_path()
    system_wide = str(path).startswith("/etc/")
    threads = opts.threads or default_threads()
    console_script = Path(sys.executable).with_name("edgemoe")
    program = [str(console_script)] if console_script.exists() else [sys.executable, "-m", "edgemoe_cli.cli"]
    argv = [
        *program,
        "serve",
        str(model),
        "--host",
        opts.host,
        "--port",
        str(opts.port),
        "--ctx",
        str(opts.ctx),
        "--parallel",
        str(opts.parallel),
        "--threads",
        str(threads),
        "--queue",
        str(opts.queue),
    ]
    if opts.memory is not None:
        argv += ["--memory", str(opts.memory)]
    if opts.warm is not None:
        argv += ["--warm", str(Path(opts.warm).resolve())]
    if opts.workers:
        argv += [
            "--workers",
            ",".join(w.endpoint + (f"={w.memory_bytes}" if w.memory_bytes else "") for w in opts.workers),
        ]
    if opts.model_id:
        argv += ["--model-id", opts.model_id]
    env = {}
    if library := select_binding_library():
        env["LLAMA_CPP_LIB_PATH"] = library
    if opts.api_key:
        env["EDGEMOE_API_KEY"] = opts.api_key
    lines = [
        "# written by `edgemoe serve --install-systemd`; not enabled: see the commands below",
        "[Unit]",
        f"Description=edgemoe serve {model.name} (OpenAI-compatible API on {opts.host}:{opts.port})",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        *(f"Environment={_systemd_word(f'{k}={v}')}" for k, v in env.items()),
        "ExecStart=" + " ".join(_systemd_word(w) for w in argv),
        # edgemoe serve stops cleanly on SIGTERM: running generations are cancelled, the model freed
        "KillSignal=SIGTERM",
        "TimeoutStopSec=30",
        "Restart=on-failure",
        "RestartSec=5",
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if system_wide else 'default.target'}",
        "",
    ]
    unit = "\n".join(lines)
    from .store import atomic_output

    with atomic_output(path) as part:
        if opts.api_key:  # made private before the key is written into it
            os.chmod(part, 0o600)
        part.write_text(unit)
    systemctl = "systemctl" if system_wide else "systemctl --user"
    if opts.api_key:  # what is shown or printed as JSON must not carry the key
        unit = unit.replace(_systemd_word(f"EDGEMOE_API_KEY={opts.api_key}"), '"EDGEMOE_API_KEY=(in the file)"')
    return SystemdUnit(
        path=str(path), unit=unit, enable=[f"{systemctl} daemon-reload", f"{systemctl} enable --now {path.name}"]
    )
