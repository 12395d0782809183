"""`edgemoe serve`: the real server on 127.0.0.1 and a free port, spoken to with the official `openai` package.

Expected replies come from `generate.run` (what `edgemoe run --temp 0` answers) on the same GGUF with the same
threads per sequence, so "answered correctly" means: the same greedy tokens, split the same way.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import SHARED_FIXTURES

from edgemoe_cli import generate, serve

openai = pytest.importorskip("openai")

KEY = "test-key-0123"
CTX = 4096
QUESTIONS = [json.loads(line)["q"] for line in (SHARED_FIXTURES / "arith-dev.jsonl").read_text().splitlines()[:8]]
TAGS = ("<think>", "</think>", "<response>", "</response>", "<tool_call>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`edgemoe serve MODEL --api-key KEY ...` as a child process; ready when /health answers."""

    def __init__(self, model: Path, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edgemoe_cli.cli",
                    "serve",
                    str(model),
                    "--port",
                    str(self.port),
                    "--api-key",
                    KEY,
                    "--ctx",
                    str(CTX),
                    *args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        for _ in range(600):  # 60 s at most
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                if http("GET", self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"serve did not answer /health within 60 s: {self.log.read_text()}")

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, timeout=120, max_retries=0)

    def metrics(self) -> dict[str, float]:
        status, text = http("GET", self.url + "/metrics")
        assert status == 200
        return {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, body, {"Authorization": f"Bearer {KEY}", **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def servers(tiny_gguf, tmp_path_factory):
    """One Thinking server with 2 slots (1 thread each) and one PT server with 1 slot (1 thread)."""
    tmp = tmp_path_factory.mktemp("serve")
    started = {
        "thinking": Server(tiny_gguf("thinking"), tmp, "--parallel", "2", "--threads", "2"),
        "pt": Server(tiny_gguf("pt"), tmp, "--parallel", "1", "--threads", "1", "--queue", "0"),
    }
    yield started
    for s in started.values():
        assert s.stop() == 0


@pytest.fixture(scope="module")
def expected(tiny_gguf):
    """What `edgemoe run --temp 0` answers, per variant and question (1 thread: a slot's own thread count)."""
    answers = {}
    for variant in ("thinking", "pt"):
        llm = generate.load_model(tiny_gguf(variant), ctx=CTX, threads=1)
        try:
            for q in QUESTIONS:
                answers[variant, q] = generate.chat_reply(llm, q, max_tokens=256, temp=0)
        finally:
            llm.close()
    return answers


def ask(client, question: str, **kw):
    return client.chat.completions.create(
        model=client_model(client),
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=256,
        **kw,
    )


def client_model(client) -> str:
    return client.models.list().data[0].id


# ---- answers -----------------------------------------------------------------------------------------------------


def test_models_and_health(servers, tiny_gguf):
    models = servers["thinking"].client().models.list().data
    assert [m.id for m in models] == [tiny_gguf("thinking").stem]
    assert http("GET", servers["thinking"].url + "/health") == (200, '{"status": "ok"}')


def test_thinking_chat_splits_reasoning_and_answer(servers, expected):
    q = QUESTIONS[0]
    reply = ask(servers["thinking"].client(), q)
    message, run = reply.choices[0].message, expected["thinking", q]
    assert run.reasoning and run.answer  # the fixture reasons, then answers
    assert message.model_extra["reasoning_content"] == run.reasoning
    assert message.content == run.answer
    assert not any(tag in message.content + message.model_extra["reasoning_content"] for tag in TAGS)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == run.completion_tokens and reply.usage.prompt_tokens == run.prompt_tokens


def test_thinking_chat_streams_reasoning_then_content(servers, expected):
    q = QUESTIONS[1]
    client = servers["thinking"].client()
    kinds, reasoning, content, finish = [], [], [], []
    with ask(client, q, stream=True, stream_options={"include_usage": True}) as stream:
        for chunk in stream:
            if not chunk.choices:
                usage = chunk.usage
                continue
            delta = chunk.choices[0].delta
            if extra := (delta.model_extra or {}).get("reasoning_content"):
                kinds.append("reasoning")
                reasoning.append(extra)
            if delta.content:
                kinds.append("content")
                content.append(delta.content)
            if chunk.choices[0].finish_reason:
                finish.append(chunk.choices[0].finish_reason)
    run = expected["thinking", q]
    assert "".join(reasoning) == run.reasoning and "".join(content) == run.answer
    assert kinds == sorted(kinds, key=["reasoning", "content"].index)  # every reasoning delta before any content
    assert len(reasoning) > 1 and len(content) > 1  # streamed in pieces, not in one block at the end
    assert finish == ["stop"] and usage.completion_tokens == run.completion_tokens


def test_pt_chat_is_plain_content(servers, expected):
    q = QUESTIONS[2]
    client = servers["pt"].client()
    message = ask(client, q).choices[0].message
    assert message.content == expected["pt", q].answer and message.content
    assert "reasoning_content" not in (message.model_extra or {})
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, q, stream=True) if c.choices)
    assert streamed == message.content


def test_completions_raw_text(servers):
    client = servers["pt"].client()
    model = client_model(client)
    args = {
        "model": model,
        "prompt": "The Debian",
        "max_tokens": 24,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.completions.create(**args)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 24
    pieces = [c.choices[0].text for c in client.completions.create(**args, stream=True)]
    assert "".join(pieces) == whole.choices[0].text and len(pieces) > 2
    stopped = client.completions.create(**args, stop=[whole.choices[0].text[5:9]])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == whole.choices[0].text[:5]


def test_eight_concurrent_clients_all_answered_right(servers, expected):
    client = servers["thinking"].client()
    replies: dict[str, object] = {}

    def one(q: str) -> None:
        replies[q] = ask(client, q).choices[0].message

    threads = [threading.Thread(target=one, args=(q,)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(replies) == sorted(QUESTIONS)
    for q in QUESTIONS:
        assert (replies[q].model_extra["reasoning_content"], replies[q].content) == (
            expected["thinking", q].reasoning,
            expected["thinking", q].answer,
        ), q


# ---- tool calls: the ERNIE format into OpenAI's shape, checked with openai's own types ----------------------------


TOOL_REPLY = (
    "The user wants the weather; I should call the tool.\n</think>\n\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
)


def test_tool_call_message_shape():
    from openai.types.chat import ChatCompletion

    message, finish = serve.chat_message(TOOL_REPLY, thinking=True, finish="stop")
    reply = ChatCompletion.model_validate(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        }
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert choice.message.model_extra["reasoning_content"] == "The user wants the weather; I should call the tool."


def test_tool_call_streamed_shape():
    from openai.types.chat import ChatCompletionChunk

    stream = serve.ChatStream(thinking=True)
    deltas = []
    for at in range(0, len(TOOL_REPLY), 3):  # pieces that cut tags in half
        deltas += stream.feed(TOOL_REPLY[at : at + 3])
    tail, finish = stream.finish("stop")
    deltas += tail
    chunks = [
        ChatCompletionChunk.model_validate(
            {
                "id": "x",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "delta": d}],
            }
        )
        for d in deltas
    ]
    assert finish == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)  # the call's JSON is not leaked as content
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and calls[0][0].function.name == "get_weather" and calls[0][0].index == 0
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content", "") for c in chunks)
    assert reasoning == "The user wants the weather; I should call the tool."


def test_unparseable_tool_call_stays_content():
    raw = "thinking\n</think>\n<tool_call>\nnot json\n</tool_call>"
    message, finish = serve.chat_message(raw, thinking=True, finish="stop")
    assert (message["content"], finish, "tool_calls" in message) == ("not json", "stop", False)
    stream = serve.ChatStream(thinking=True)
    deltas = stream.feed(raw)
    tail, finish = stream.finish("stop")
    assert [d for d in deltas + tail if "content" in d] == [{"content": "not json"}] and finish == "stop"


# ---- bad requests --------------------------------------------------------------------------------------------------


def test_bad_requests_get_openai_errors_and_the_server_lives(servers, tiny_gguf):
    server = servers["thinking"]
    url = server.url + "/v1/chat/completions"
    model = tiny_gguf("thinking").stem

    def error(status_body):
        status, body = status_body
        return status, json.loads(body)["error"]["code"]

    assert error(http("POST", url, b"{not json")) == (400, "invalid_json")
    assert error(http("POST", url, json.dumps({"model": model}).encode())) == (400, "missing_messages")
    assert error(http("POST", url, json.dumps({"messages": []}).encode())) == (400, "missing_messages")
    assert error(http("POST", url, json.dumps({"messages": [{"content": "hi"}]}).encode()))[0] == 400
    assert error(
        http("POST", url, json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode())
    ) == (400, "invalid_value")
    assert error(http("GET", server.url + "/v1/nothing")) == (404, "not_found")
    assert error(http("GET", url)) == (405, "method_not_allowed")

    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * CTX}])
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(key="wrong").chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert http("GET", server.url + "/v1/models", headers={"Authorization": ""})[0] == 401
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and e.value.code == "model_not_found"

    assert ask(client, QUESTIONS[0]).choices[0].message.content  # still answering
    metrics = server.metrics()
    assert metrics["edgemoe_errors_total"] >= 10
    assert metrics['edgemoe_requests_total{path="/v1/chat/completions",status="400"}'] >= 6


def _hold_the_slot(client, model: str):
    """A streamed request that generates until its context is full; returns it once its first piece arrived."""
    stream = client.completions.create(
        model=model, prompt="The Debian", max_tokens=CTX, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    return stream


def test_queue_full_is_503_and_a_disconnect_frees_the_slot(servers):
    server = servers["pt"]  # 1 slot, --queue 0
    client = server.client()
    model = client_model(client)
    before = server.metrics()
    stream = _hold_the_slot(client, model)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=model, prompt="The", max_tokens=4)
    assert e.value.status_code == 503 and e.value.code == "queue_full"
    stream.close()  # the client goes away mid-stream
    for _ in range(300):  # 30 s at most
        after = server.metrics()
        if after["edgemoe_cancelled_total"] > before["edgemoe_cancelled_total"] and after["edgemoe_slots_busy"] == 0:
            break
        time.sleep(0.1)
    assert after["edgemoe_cancelled_total"] == before["edgemoe_cancelled_total"] + 1
    assert after["edgemoe_slots_busy"] == 0
    # stopped early: far fewer tokens than the context it asked to fill
    assert after["edgemoe_completion_tokens_total"] - before["edgemoe_completion_tokens_total"] < CTX - 100
    assert client.completions.create(model=model, prompt="The", max_tokens=4).usage.completion_tokens == 4


# ---- process life --------------------------------------------------------------------------------------------------


def test_sigterm_mid_generation_stops_cleanly(tiny_gguf, tmp_path):
    import psutil

    server = Server(tiny_gguf("pt"), tmp_path, "--threads", "1")
    process = psutil.Process(server.proc.pid)
    stream = _hold_the_slot(server.client(), tiny_gguf("pt").stem)
    children = process.children(recursive=True)
    assert server.stop() == 0
    stream.close()
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    log = server.log.read_text()
    assert "stopped:" in log and "Traceback" not in log


def test_port_in_use_is_one_line(tiny_gguf, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "edgemoe_cli.cli", "serve", str(tiny_gguf("pt")), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


def test_install_systemd_writes_a_unit_and_does_not_enable_it(tiny_gguf, tmp_path):
    unit_path = tmp_path / "units" / "edgemoe-serve.service"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgemoe_cli.cli",
            "serve",
            str(tiny_gguf("thinking")),
            "--install-systemd",
            "--unit-path",
            str(unit_path),
            "--port",
            "8099",
            "--threads",
            "3",
            "--api-key",
            "s3cret%",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["path"] == str(unit_path) and "enable --now edgemoe-serve.service" in result["enable"][-1]
    unit = unit_path.read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert f'"{tiny_gguf("thinking").resolve()}"' in exec_start
    assert '"--port" "8099"' in exec_start and '"--threads" "3"' in exec_start
    assert "LLAMA_CPP_LIB_PATH=" in unit and 'EDGEMOE_API_KEY=s3cret%%"' in unit  # % escaped for systemd
    assert "s3cret" not in proc.stdout  # the key is in the 0600 file, not on the terminal
    assert unit_path.stat().st_mode & 0o777 == 0o600
    assert not list(unit_path.parent.glob("*.part"))


def test_queue_is_first_come_first_served(tiny_gguf, tmp_path):
    """One slot busy, B then C queued: B is answered before C starts (a FIFO, not whichever thread wakes first)."""
    server = Server(tiny_gguf("pt"), tmp_path, "--threads", "1", "--queue", "4")
    try:
        client = server.client()
        model = tiny_gguf("pt").stem
        stream = _hold_the_slot(client, model)
        finished: list[str] = []

        def ask_in_turn(name: str) -> None:
            client.completions.create(model=model, prompt="The", max_tokens=8, temperature=0)
            finished.append(name)

        threads = []
        for depth, name in enumerate(["B", "C"], start=1):
            threads.append(threading.Thread(target=ask_in_turn, args=(name,)))
            threads[-1].start()
            for _ in range(300):  # wait until it is queued before sending the next
                if server.metrics()["edgemoe_queue_depth"] == depth:
                    break
                time.sleep(0.1)
            assert server.metrics()["edgemoe_queue_depth"] == depth
        stream.close()  # frees the slot
        for t in threads:
            t.join(timeout=120)
        assert finished == ["B", "C"]
    finally:
        assert server.stop() == 0


def server_streaming_cap(model: Path, share: float):
    """streaming_cap as the server process will plan it: the plan counts the process's own anonymous memory, which
    in this test process (pytest, models loaded by other tests) is far larger than in a fresh `edgemoe serve`."""
    code = (
        "import json, sys; sys.path.insert(0, 'tests'); import edgemoe_cli.cli, edgemoe_cli.serve;"
        "from edgemoe_cli.llamacpp import import_binding; import_binding();"
        "from conftest import streaming_cap;"
        "cap, whole = streaming_cap(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]));"
        "print(json.dumps([cap, whole.expert_bytes]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model), str(share), str(CTX)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    cap, expert_bytes = json.loads(out.splitlines()[-1])
    return cap, SimpleNamespace(expert_bytes=expert_bytes)


def test_memory_streams_experts_and_answers_as_run(tiny_gguf, tmp_path, expected):
    """serve --memory: the model streams its experts (a cache of a quarter of them) and answers as run does; the
    expert cache shows in /metrics."""
    model = tiny_gguf("thinking")
    cap, whole = server_streaming_cap(model, 0.5)
    server = Server(model, tmp_path, "--memory", str(cap), "--threads", "1")
    try:
        q = QUESTIONS[0]
        message, run = ask(server.client(), q).choices[0].message, expected["thinking", q]
        assert message.model_extra["reasoning_content"] == run.reasoning and message.content == run.answer
        metrics = server.metrics()
        assert 0 < metrics["edgemoe_expert_cache_bytes"] < whole.expert_bytes
        assert metrics["edgemoe_expert_bytes_read_total"] > 0 and 0 <= metrics["edgemoe_expert_cache_hit_ratio"] < 1
    finally:
        assert server.stop() == 0


def test_memory_with_several_slots_is_one_line(tiny_gguf):
    model = tiny_gguf("pt")
    cap, _ = server_streaming_cap(model, 0.5)
    args = ["serve", str(model), "--memory", str(cap), "--parallel", "2", "--port", str(free_port())]
    proc = subprocess.run([sys.executable, "-m", "edgemoe_cli.cli", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "one request at a time" in proc.stderr and "Traceback" not in proc.stderr
