"""`edgemoe run --memory`: experts streamed from the GGUF give the fully resident run's greedy tokens, within budget."""

from __future__ import annotations

import sys

import pytest
from conftest import SHARED_FIXTURES, streaming_cap

from edgemoe_cli import generate, stream
from edgemoe_cli.cli import main
from edgemoe_cli.errors import EdgeMoEError

PROMPT = "What is 93 + 16? Show the ones and the tens, then give the answer in one sentence."
CTX = 512


def _forcing_cap(path, share: float) -> tuple[int, stream.MemoryPlan]:
    return streaming_cap(path, share, CTX)


@pytest.mark.parametrize("variant", ["pt", "thinking"])
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_streaming_gives_the_resident_runs_tokens(tiny_gguf, variant, outtype):
    path = tiny_gguf(variant, outtype)
    resident = generate.run(path, PROMPT, max_tokens=24, threads=1, ctx=CTX, temp=0)
    cap, whole = _forcing_cap(path, 0.25)
    assert cap < whole.model_bytes + whole.kv_bytes + whole.runtime_bytes  # it cannot run resident under `cap`
    streamed = generate.run(path, PROMPT, max_tokens=24, threads=1, ctx=CTX, temp=0, memory=cap)
    assert resident.streaming is None
    assert streamed.raw == resident.raw and streamed.completion_tokens == resident.completion_tokens
    assert streamed.completion_tokens >= 5  # the PT fixture answers in 7 tokens, the Thinking one reasons on

    s = streamed.streaming
    plan = s["plan"]
    assert plan["streams"] and plan["memory_bytes"] == cap
    assert s["hits"] + s["misses"] == s["lookups"] > 0
    # a quarter of the experts cannot hold every layer's used experts: the cache must have evicted and re-read
    assert s["misses"] > s["cache_experts"]
    # every miss and every prefetch reads one expert's gate, up and down slices, nothing else (the same types in
    # every layer here)
    assert s["bytes_read"] == (s["misses"] + s["prefetch_reads"]) * plan["expert_set_bytes"] > 0
    assert s["prefetch_used"] <= s["prefetch_reads"]
    # one step per generated token after the first (the last one sampled at --max-tokens is never decoded)
    assert s["decode_tokens"] == streamed.completion_tokens - (streamed.finish_reason == "length")
    assert s["bytes_read_per_token"] > 0
    assert 0 < s["peak_expert_bytes"] <= s["cache_bytes"] < whole.expert_bytes
    assert 0 <= s["hit_rate"] < 1 and s["read_wait_s"] > 0 and s["compute_s"] > 0


def test_the_smallest_cap_splits_the_prompt_and_keeps_the_tokens(tiny_gguf):
    """At the minimum a layer's experts for one token barely fit: the prompt goes through in tiny ubatches."""
    path = tiny_gguf("pt", "f16")
    resident = generate.run(path, PROMPT, max_tokens=12, threads=1, ctx=CTX, temp=0)
    cap, _ = _forcing_cap(path, 0.0)
    streamed = generate.run(path, PROMPT, max_tokens=12, threads=1, ctx=CTX, temp=0, memory=cap)
    assert streamed.raw == resident.raw
    plan = streamed.streaming["plan"]
    assert plan["n_ubatch"] * plan["n_expert_used"] <= streamed.streaming["cache_experts"] < plan["n_expert"]
    assert plan["n_ubatch"] < streamed.prompt_tokens
    assert streamed.streaming["peak_expert_bytes"] <= streamed.streaming["cache_bytes"]


@pytest.mark.parametrize("native", ["1", "0"])
def test_prefetching_keeps_the_tokens(tiny_gguf, monkeypatch, native):
    """The opt-in prefetcher reads guessed experts of the next layer while a layer computes (queued to the C
    readers, or on a Python thread): still lossless."""
    path = tiny_gguf("thinking", "q8_0")
    resident = generate.run(path, PROMPT, max_tokens=24, threads=1, ctx=CTX, temp=0)
    monkeypatch.setenv("EDGEMOE_STREAM_NATIVE", native)
    cap, _ = _forcing_cap(path, 0.25)
    monkeypatch.setenv("EDGEMOE_STREAM_PREFETCH", "1")
    streamed = generate.run(path, PROMPT, max_tokens=24, threads=1, ctx=CTX, temp=0, memory=cap)
    assert streamed.raw == resident.raw
    s = streamed.streaming
    assert s["prefetch_reads"] > 0 and s["prefetch_used"] <= s["prefetch_reads"]
    assert s["bytes_read"] == (s["misses"] + s["prefetch_reads"]) * s["plan"]["expert_set_bytes"]
    assert s["peak_expert_bytes"] <= s["cache_bytes"]


def test_evicted_pages_are_moved_under_new_reads_and_keep_the_tokens(tiny_gguf, monkeypatch):
    """An evicted expert's pages are moved (mremap) to where the next read lands instead of being freed and faulted
    in anew: the same tokens and reads as freeing them, and fewer page faults."""
    import resource

    path = tiny_gguf("thinking", "f16")

    def run():
        cap, _ = _forcing_cap(path, 0.25)  # planned before each run: the first leaves this process holding more
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        r = generate.run(path, PROMPT, max_tokens=24, threads=1, ctx=CTX, temp=0, memory=cap)
        return r, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    moved, moved_faults = run()
    monkeypatch.setenv("EDGEMOE_STREAM_RECYCLE", "0")
    freed, freed_faults = run()
    assert moved.raw == freed.raw
    m, f = moved.streaming, freed.streaming
    assert f["recycled_bytes"] == 0 and f["misses"] > f["cache_experts"]
    # every eviction moves the pages only its expert uses (a slice's first and last page may be a neighbour's)
    assert 0 < m["recycled_bytes"] < m["bytes_read"]
    assert moved_faults < freed_faults - m["recycled_bytes"] // 4096 // 2
    assert m["peak_expert_bytes"] <= m["cache_bytes"]


def test_moving_pages_stops_before_the_kernels_limit_on_mappings(tiny_gguf, monkeypatch):
    """Each moved range becomes a mapping of its own; near half of vm.max_map_count pages are freed again."""
    path = tiny_gguf("thinking", "f16")
    cap, _ = _forcing_cap(path, 0.25)
    unlimited = generate.run(path, PROMPT, max_tokens=24, threads=1, ctx=CTX, temp=0, memory=cap)
    monkeypatch.setattr(stream, "_MAP_CHECK_EVERY", 1)
    limit = 2 * stream._map_count()  # half of it is what this process maps now: loading the model maps more
    monkeypatch.setattr(stream, "_max_map_count", lambda: limit)
    cap, _ = _forcing_cap(path, 0.25)
    limited = generate.run(path, PROMPT, max_tokens=24, threads=1, ctx=CTX, temp=0, memory=cap)
    assert limited.raw == unlimited.raw
    moved = limited.streaming["recycled_bytes"]
    # one move, then the count: the pages of one expert's slice of one projection
    assert 0 < moved <= limited.streaming["plan"]["expert_set_bytes"]
    assert moved < unlimited.streaming["recycled_bytes"]


def test_buffered_reads_where_direct_io_is_missing_keep_the_tokens(tiny_gguf, monkeypatch):
    """Without O_DIRECT (another OS, a file system refusing it) slices are read through the page cache."""
    import os

    path = tiny_gguf("pt", "q8_0")
    resident = generate.run(path, PROMPT, max_tokens=12, threads=1, ctx=CTX, temp=0)
    cap, _ = _forcing_cap(path, 0.25)
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    streamed = generate.run(path, PROMPT, max_tokens=12, threads=1, ctx=CTX, temp=0, memory=cap)
    assert streamed.raw == resident.raw
    s = streamed.streaming
    assert s["bytes_read"] == (s["misses"] + s["prefetch_reads"]) * s["plan"]["expert_set_bytes"] > 0


@pytest.mark.parametrize("native", ["1", "0"])
def test_direct_io_refused_only_when_reading_falls_back_to_buffered(tiny_gguf, monkeypatch, native):
    """Some file systems open with O_DIRECT and then refuse the reads (EINVAL): the streamer finds out before the
    first token and reads buffered, in C and in Python alike, with the same tokens."""
    import errno
    import fcntl
    import os

    path = tiny_gguf("pt", "q8_0")
    resident = generate.run(path, PROMPT, max_tokens=12, threads=1, ctx=CTX, temp=0)
    cap, _ = _forcing_cap(path, 0.25)
    preadv = os.preadv

    def no_direct_reads(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "direct I/O refused")
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", no_direct_reads)
    monkeypatch.setenv("EDGEMOE_STREAM_NATIVE", native)
    streamed = generate.run(path, PROMPT, max_tokens=12, threads=1, ctx=CTX, temp=0, memory=cap)
    assert streamed.raw == resident.raw
    s = streamed.streaming
    assert s["native_callback"] == (native == "1")
    assert s["bytes_read"] == s["misses"] * s["plan"]["expert_set_bytes"] > 0


def test_a_cap_the_model_fits_in_runs_as_without_memory(tiny_gguf):
    path = tiny_gguf("pt", "q8_0")
    plain = generate.run(path, PROMPT, max_tokens=12, threads=1, ctx=CTX, temp=0)
    roomy = generate.run(path, PROMPT, max_tokens=12, threads=1, ctx=CTX, temp=0, memory="64GiB")
    assert roomy.streaming is None and roomy.raw == plain.raw
    assert not stream.plan_memory(path, "64GiB", CTX).streams


def test_a_reply_under_memory_plans_for_the_context_it_can_reach(tiny_gguf):
    """One reply holds at most its prompt and --max-tokens: the KV cache and the physical batch are planned for
    that, not for --ctx, and what they would have reserved caches experts; the tokens stay the resident run's."""
    from edgemoe_cli.gguffile import open_gguf

    path = tiny_gguf("thinking", "q8_0")
    resident = generate.run(path, PROMPT, max_tokens=24, threads=1, ctx=4096, temp=0)
    cap, _ = streaming_cap(path, 0.25, 4096)
    full = stream.plan_memory(path, cap, 4096)
    streamed = generate.run(path, PROMPT, max_tokens=24, threads=1, ctx=4096, temp=0, memory=cap)
    assert streamed.raw == resident.raw
    plan = streamed.streaming["plan"]
    assert full.streams and plan["streams"]
    # prompt + 24 tokens, in whole steps of 256
    assert plan["kv_bytes"] == stream.kv_cache_bytes(open_gguf(path), 256) < full.kv_bytes
    assert streamed.prompt_tokens <= plan["n_ubatch"] < 2 * streamed.prompt_tokens
    assert plan["cache_bytes"] > full.cache_bytes


def test_the_context_planned_for_replies_is_the_longest_prompt_plus_max_tokens(tiny_gguf):
    from edgemoe_cli.gguffile import open_gguf

    path = tiny_gguf("pt", "q8_0")
    llm = generate.load_model(path, ctx=CTX, threads=1)
    try:
        lengths = [len(generate.tokenize_prompt(llm, generate.chat_prompt(llm, p)[0])) for p in ("hi", PROMPT)]
    finally:
        llm.close()
    assert lengths[0] < lengths[1]
    assert generate.reply_context(path, ["hi", PROMPT], None, 24, 4096) == (256, lengths[1])
    assert generate.reply_context(path, ["hi"], None, 300, 4096) == (512, lengths[0])
    assert generate.reply_context(path, [PROMPT], None, 24, 0) == (256, lengths[1])  # 0: the model's own
    assert generate.reply_context(path, [PROMPT], None, 600, 512) == (512, lengths[1])  # never above --ctx
    assert generate.reply_context(path, [PROMPT], None, 24, lengths[1]) == (lengths[1], None)  # does not fit
    trained = int(open_gguf(path).get_field("ernie4_5-moe.context_length").contents())
    assert generate.reply_context(path, [PROMPT], None, trained, 0) == (trained, lengths[1])  # never above it


@pytest.mark.skipif(sys.platform != "linux", reason="mincore and posix_fadvise: Linux")
def test_a_streamed_run_leaves_no_expert_page_in_the_page_cache(tiny_gguf, tmp_path):
    """The expert ranges of the file are never read through the page cache, and what llama.cpp's load read ahead is
    dropped: under a cgroup's limit those pages would count against the cache. Only a fringe at each end may stay:
    faulting a neighbouring weight in maps the cached pages around it too (fault-around), and mapped pages stay."""
    import mmap
    import os
    import shutil

    from edgemoe_cli.gguffile import open_gguf

    path = tmp_path / "model.gguf"  # a copy no other test reads meanwhile
    shutil.copyfile(tiny_gguf("pt", "q8_0"), path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())  # a page still dirty from the copy cannot be dropped until written
    cap, _ = _forcing_cap(path, 0.25)
    streamed = generate.run(path, PROMPT, max_tokens=8, threads=1, ctx=CTX, temp=0, memory=cap)
    assert streamed.streaming["misses"] > 0
    experts = stream.expert_tensors(open_gguf(path))
    fringe = 2**18  # 256 KiB: four times the kernel's default fault-around
    inner = [(t.file_offset + fringe, t.file_offset + t.nbytes - fringe) for t in experts]
    assert all(end - start > fringe for start, end in inner)
    assert stream.page_cache_bytes(path, inner) == 0
    assert stream.page_cache_bytes(path, [(0, path.stat().st_size)]) > 0  # mincore does see the file's pages

    # pages that arrive after the tensors were bound (a slow disk still serving the load's read-ahead, read-around
    # of a weight faulted in) go when the prompt is done and at each generated token: here the whole file is read
    # into the page cache just before the prompt is done, and again at the first token
    llm, streamer = generate.load_within(path, _forcing_cap(path, 0.25)[0], ctx=CTX, threads=1)
    size = path.stat().st_size

    def read_all():
        path.read_bytes()
        assert stream.page_cache_bytes(path, [(0, size)]) == size // mmap.PAGESIZE * mmap.PAGESIZE

    def prompt_done():
        read_all()
        streamer.prompt_done()
        assert stream.page_cache_bytes(path, inner) == 0

    tokens = []

    def on_text(kind, text):
        if not tokens:
            read_all()
        tokens.append(text)

    try:
        generate.chat_reply(llm, PROMPT, max_tokens=4, prompt_done=prompt_done, on_text=on_text)
        assert len(tokens) >= 2  # a token was decoded after the first one read the file
        assert stream.page_cache_bytes(path, inner) == 0
        # the rest of the file stays: the weights every token uses
        expert_bytes = sum(end - start + 2 * fringe for start, end in inner)
        assert stream.page_cache_bytes(path, [(0, size)]) >= size - expert_bytes - 2 * mmap.PAGESIZE * len(experts)
    finally:
        llm.close()
        streamer.close()


def test_memory_auto_is_the_ram_available(tiny_gguf):
    import psutil

    auto = stream.parse_memory("auto")
    assert 0 < auto <= psutil.virtual_memory().total
    assert stream.parse_memory("1.5GiB") == 1.5 * 2**30


def test_a_cap_below_the_resident_weights_fails_before_loading(tiny_gguf, monkeypatch, capsys):
    path = tiny_gguf("thinking", "q8_0")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although the cap was too small")

    monkeypatch.setattr(generate, "load_model", no_loading)
    monkeypatch.setattr(stream, "load_streaming", no_loading)
    with pytest.raises(EdgeMoEError, match="too small"):
        generate.run(path, PROMPT, memory="2M", ctx=CTX)
    monkeypatch.setattr(sys, "argv", ["edgemoe", "run", str(path), "-p", PROMPT, "--memory", "2MiB"])
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "too small" in err and "--memory" in err


def test_unreadable_memory_size_is_a_one_line_error(tiny_gguf, monkeypatch, capsys):
    path = tiny_gguf("pt", "q8_0")
    monkeypatch.setattr(sys, "argv", ["edgemoe", "run", str(path), "-p", "hi", "--memory", "lots"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "--memory" in err


def test_the_c_callback_and_the_python_one_give_the_same_tokens(tiny_gguf, monkeypatch):
    """stream_cb.c answers the nodes streaming ignores in C; without a compiler (EDGEMOE_STREAM_NATIVE=0 here) the
    Python callback answers all of them the same way: the same tokens, the same reads."""
    path = tiny_gguf("thinking", "q8_0")
    cap, _ = _forcing_cap(path, 0.25)
    native = generate.run(path, PROMPT, max_tokens=12, threads=1, ctx=CTX, temp=0, memory=cap)
    monkeypatch.setenv("EDGEMOE_STREAM_NATIVE", "0")
    cap, _ = _forcing_cap(path, 0.25)  # again: the first run left this process holding more (the plan counts it)
    python = generate.run(path, PROMPT, max_tokens=12, threads=1, ctx=CTX, temp=0, memory=cap)
    assert native.raw == python.raw
    n, p = native.streaming, python.streaming
    assert n["native_callback"] and not p["native_callback"]
    assert p["callbacks"] == p["python_callbacks"] > 0 and n["callbacks"] > 0
    # what reaches Python with the C callback: the routing results and the expert matmuls, a few per layer
    assert 0 < n["python_callbacks"] < n["callbacks"] / 10


def test_warming_from_a_profile_keeps_the_tokens(tiny_gguf, tmp_path):
    """--warm profile.json reads the profile's most routed experts before the first token: the same tokens, the
    cache filled within its budget, and those reads kept apart from the run's own."""
    from edgemoe_cli import profile

    path = tiny_gguf("thinking", "q8_0")
    resident = generate.run(path, PROMPT, max_tokens=12, threads=1, ctx=CTX, temp=0)
    prof = profile.profile(path, SHARED_FIXTURES / "calib.txt", tmp_path / "prof", max_tokens=256, ctx=CTX, threads=1)
    cap, _ = _forcing_cap(path, 0.25)
    warmed = generate.run(
        path, PROMPT, max_tokens=12, threads=1, ctx=CTX, temp=0, memory=cap, warm=prof.outputs["json"]
    )
    assert warmed.raw == resident.raw
    s = warmed.streaming
    assert 0 < s["warm_bytes"] <= s["cache_bytes"] and s["warm_bytes"] % s["plan"]["expert_set_bytes"] == 0
    assert s["bytes_read"] == s["misses"] * s["plan"]["expert_set_bytes"]  # warming is not counted as a miss


def test_a_profile_of_another_model_is_a_one_line_error(tiny_gguf, tmp_path):
    import json

    path = tiny_gguf("pt", "q8_0")
    bad = tmp_path / "profile.json"
    bad.write_text(json.dumps({"counts": [[1, 2, 3]], "layers": [{"layer": 1}]}))
    cap, _ = _forcing_cap(path, 0.25)
    with pytest.raises(EdgeMoEError, match="profiles a different model"):
        generate.run(path, PROMPT, max_tokens=4, threads=1, ctx=CTX, memory=cap, warm=bad)


def test_warm_without_memory_is_a_one_line_error(tiny_gguf, tmp_path, monkeypatch, capsys):
    path = tiny_gguf("pt", "q8_0")
    monkeypatch.setattr(sys, "argv", ["edgemoe", "run", str(path), "-p", "hi", "--warm", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "--memory" in err


@pytest.mark.parametrize("native", ["1", "0"])
def test_a_read_that_fails_is_an_error_not_a_reply(tiny_gguf, monkeypatch, native):
    """A disk that stops delivering (here: the GGUF's descriptors swapped for /dev/null, which reads as end of
    file) must surface as one EdgeMoEError after decoding, from the C readers and from the Python ones alike."""
    import os

    monkeypatch.setenv("EDGEMOE_STREAM_NATIVE", native)
    path = tiny_gguf("pt", "q8_0")
    cap, _ = _forcing_cap(path, 0.25)
    llm, streamer = generate.load_within(path, cap, ctx=CTX, threads=1)
    try:
        assert (streamer.native is not None) == (native == "1")
        null = os.open(os.devnull, os.O_RDONLY)
        for fd in (streamer.fd, streamer.direct_fd):
            if fd >= 0:
                os.dup2(null, fd)
        os.close(null)
        generate.chat_reply(llm, PROMPT, max_tokens=4, temp=0)
        with pytest.raises(EdgeMoEError, match="streaming experts from the GGUF failed"):
            streamer.check()
    finally:
        llm.close()
        streamer.close()


@pytest.mark.parametrize("cc", ["cc", "aarch64-linux-gnu-gcc"])
def test_the_c_part_compiles_cleanly_for_this_machine_and_for_arm(cc, tmp_path):
    """stream_cb.c is compiled on the user's board by its own compiler: no warnings with -Wall -Wextra, here and
    for aarch64 (the boards edgemoe is for) where the cross compiler is installed."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which(cc) is None:
        pytest.skip(f"{cc} not installed")
    source = Path(stream.__file__).with_name("stream_cb.c")
    flags = ["-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-pthread"]
    subprocess.run([cc, *flags, "-o", str(tmp_path / "stream_cb.so"), str(source)], check=True)
