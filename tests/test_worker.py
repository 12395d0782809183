"""Several processes as one over llama.cpp's RPC backend, on loopback: `edgemoe worker` and `--workers`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edgemoe_cli import cluster
from edgemoe_cli.errors import EdgeMoEError
from edgemoe_cli.llamacpp import native_build_dir

needs_rpc = pytest.mark.skipif(
    native_build_dir() is None or not (native_build_dir() / "bin" / "ggml-rpc-server").exists(),
    reason="the active llama.cpp build has no ggml-rpc-server (rebuild with `edgemoe build`)",
)
EDGEMOE = [sys.executable, "-m", "edgemoe_cli.cli"]
QUESTION = "What is 84 + 17?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProc:
    """`edgemoe worker --port P --json` as a child; ready when it has printed its address."""

    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.out = tmp / f"worker-{self.port}.json"
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen(
                [*EDGEMOE, "worker", "--port", str(self.port), "--threads", "1", "--json", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        for _ in range(600):  # 60 s at most
            text = self.out.read_text()
            if text.rstrip().endswith("}"):
                self.info = json.loads(text[text.index("{") :])
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}: {text}")
            time.sleep(0.1)
        self.stop()
        raise AssertionError("worker did not print its address within 60 s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def two_workers(tmp_path):
    workers = [WorkerProc(tmp_path), WorkerProc(tmp_path)]
    yield workers
    for w in workers:
        w.stop()


def run_json(model: Path, *args: str) -> dict:
    proc = subprocess.run(
        [*EDGEMOE, "run", str(model), "-p", QUESTION, "--temp", "0", "--threads", "1", "--ctx", "512", "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---- pure parts ----------------------------------------------------------------------------------------------------


def test_parse_workers():
    ws = cluster.parse_workers("10.0.0.2:50052, 10.0.0.3:50053=6GiB")
    assert [(w.endpoint, w.memory_bytes) for w in ws] == [("10.0.0.2:50052", None), ("10.0.0.3:50053", 6 * 2**30)]
    for bad in ("10.0.0.2", "10.0.0.2:http", ":50052", "a:1,a:1", "", "h:70000"):
        with pytest.raises(EdgeMoEError):
            cluster.parse_workers(bad)


def test_split_follows_memory():
    split = cluster.plan_split(28, 8 * 2**30, [("a:1", 8 * 2**30), ("b:1", 16 * 2**30)])
    assert [(p.device, p.layers) for p in split.parts] == [("local", 7), ("a:1", 7), ("b:1", 14)]
    assert split.n_gpu_layers == 21 and split.tensor_split == [7.0, 14.0]
    tiny = cluster.plan_split(4, 100, [("a:1", 10**9), ("b:1", 10**9)])  # every part keeps at least one layer
    assert sum(p.layers for p in tiny.parts) == 4 and min(p.layers for p in tiny.parts) >= 1
    with pytest.raises(EdgeMoEError, match="too few"):
        cluster.plan_split(2, 1, [("a:1", 1), ("b:1", 1)])


# ---- with ggml-rpc-server ------------------------------------------------------------------------------------------


@needs_rpc
def test_worker_binds_loopback_and_prints_its_address(tmp_path):
    """Bound to 127.0.0.1 by default, and its rpc-server dies with it (even when it is SIGKILLed)."""
    import psutil

    others = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    w = WorkerProc(tmp_path)
    try:
        assert w.info["listen"] == f"127.0.0.1:{w.port}" and w.info["address"] == f"127.0.0.1:{w.port}"
        assert not w.info["public"]
        socket.create_connection(("127.0.0.1", w.port), timeout=2).close()
        for other in others:  # not reachable on any other interface of this machine
            with pytest.raises(OSError):
                socket.create_connection((other, w.port), timeout=2).close()
    finally:
        assert w.stop() == 0
    w = WorkerProc(tmp_path)
    w.proc.kill()
    w.proc.wait(timeout=30)
    for _ in range(300):  # 30 s at most
        if cluster.reachable(cluster.WorkerAddress("127.0.0.1", w.port), timeout=1) is not None:
            break
        time.sleep(0.1)
    assert cluster.reachable(cluster.WorkerAddress("127.0.0.1", w.port), timeout=1) is not None
    help_text = subprocess.run([*EDGEMOE, "worker", "--help"], capture_output=True, text=True).stdout
    assert "NO authentication" in help_text


@needs_rpc
@pytest.mark.parametrize("variant", ["pt", "thinking"])
def test_two_workers_give_the_single_process_tokens(variant, tiny_gguf, two_workers):
    model = tiny_gguf(variant)
    alone = run_json(model)
    split = run_json(model, "--workers", ",".join(w.info["address"] for w in two_workers))
    assert split["raw"] == alone["raw"] and split["completion_tokens"] == alone["completion_tokens"]
    parts = {p["device"]: p["layers"] for p in split["split"]["parts"]}
    assert set(parts) == {"local", *(w.info["address"] for w in two_workers)}
    assert all(n >= 1 for n in parts.values()) and sum(parts.values()) == 4


@needs_rpc
def test_unreachable_worker_is_one_line(tiny_gguf):
    port = free_port()
    proc = subprocess.run(
        [*EDGEMOE, "run", str(tiny_gguf("pt")), "-p", "hi", "--workers", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"worker 127.0.0.1:{port} is not reachable" in proc.stderr and "Traceback" not in proc.stderr


@needs_rpc
def test_worker_killed_mid_generation_is_one_line_exit_2(tiny_gguf, two_workers, tmp_path):
    """serve --workers generating (ignore_eos, so it runs until killed); SIGKILL one worker; the server ends with
    one line naming it and exit 2, and the client's stream ends instead of hanging."""
    port = free_port()
    victim = two_workers[1]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [
                *EDGEMOE,
                "serve",
                str(tiny_gguf("pt")),
                "--port",
                str(port),
                "--threads",
                "1",
                "--ctx",
                "4096",
                "--workers",
                ",".join(w.info["address"] for w in two_workers),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                assert server.poll() is None, log.read_text()
                time.sleep(0.1)
        body = json.dumps(
            {"prompt": "The Debian", "max_tokens": 4000, "temperature": 0, "stream": True, "ignore_eos": True}
        ).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as stream:
            assert stream.readline().startswith(b"data: ")  # generating across the workers
            os.kill(victim.info["pid"], signal.SIGKILL)  # its ggml-rpc-server, as a crash or power cut would
            for _ in range(100000):  # the stream must end (the server dies), not hang
                if not stream.readline():
                    break
        assert server.wait(timeout=60) == 2
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("error:")]
    assert error == [
        f"error: worker {victim.info['address']} stopped answering mid-run (connection refused) — "
        "restart `edgemoe worker` there, then run again"
    ]
    assert not any("GGML_ABORT" in line or "Traceback" in line for line in lines)


@needs_rpc
def test_bench_with_workers(tiny_gguf, two_workers, tmp_path):
    from edgemoe_cli import bench

    model = tiny_gguf("thinking")
    result = bench.bench(
        [model],
        threads=[1],
        reps=1,
        n_prompt=16,
        n_gen=8,
        pg=(8, 8),
        bandwidth=False,
        workers=cluster.parse_workers(",".join(w.info["address"] for w in two_workers)),
    )
    assert {r.test for r in result.rows} == {"pp16", "tg8", "pp8+tg8"} and all(r.mean_tps > 0 for r in result.rows)
    parts = result.splits[str(model)]
    assert [p["device"] for p in parts] == ["local", *(w.info["address"] for w in two_workers)]
    assert sum(p["layers"] for p in parts) == 4 and min(p["layers"] for p in parts) >= 1
