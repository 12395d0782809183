"""`edgemoe pull` against a real HTTP server speaking the Hub API (tests/hubserver.py), huggingface_hub unmocked.

Each test runs the installed `edgemoe` in a subprocess with HF_ENDPOINT pointing at a fresh local Hub and its own
HF_HUB_CACHE, as a user's shell would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fixture_dir
from hubserver import HubRepo, HubServer

from edgemoe_cli import registry, store

EDGEMOE = Path(sys.executable).with_name("edgemoe")
MODEL = "model.safetensors"
PT, THINKING = "ernie-4.5-21b-a3b-pt", "ernie-4.5-21b-a3b-thinking"


def hub_repo(name: str, gated: bool = False) -> HubRepo:
    entry = registry.get(name)
    pinned = entry.revision if len(entry.revision) == 40 else None
    return HubRepo.from_dir(entry.repo, fixture_dir(entry.variant), commit=pinned, gated=gated)


@pytest.fixture(scope="module")
def repos() -> dict[str, HubRepo]:
    return {PT: hub_repo(PT), THINKING: hub_repo(THINKING)}


@pytest.fixture
def hf_cache(tmp_path) -> Path:
    return tmp_path / "hf-cache"


def edgemoe(hub: HubServer, hf_cache: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(hf_cache),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "COLUMNS": "200",
        **env,
    }
    full_env.pop("HF_TOKEN", None) if "HF_TOKEN" not in env else None
    return subprocess.run([str(EDGEMOE), *args], capture_output=True, text=True, env=full_env, timeout=300)


def one_line_error(p: subprocess.CompletedProcess, *words: str) -> str:
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def pulled(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_full_pull_of_both_variants_then_convert_and_run(repos, hf_cache, tiny_gguf):
    with HubServer(list(repos.values())) as hub:
        for name, question in ((PT, "What is 12 + 7?"), (THINKING, "What is 3 + 4?")):
            repo = repos[name]
            result = pulled(edgemoe(hub, hf_cache, "pull", name, "--json"))
            assert result["commit"] == repo.commit and result["repo"] == repo.repo_id
            assert {f["name"] for f in result["files"]} == set(repo.files)
            for f in result["files"]:
                assert f["status"] == "downloaded"
                assert f["sha256"] == store.sha256_file(repo.files[f["name"]].source)
                assert (Path(result["path"]) / f["name"]).is_file()
            assert Path(result["path"]).parent.parent.parent == hf_cache  # the standard cache layout
            assert hub.content_bytes() > 0
            manifest = json.loads(Path(result["manifest"]).read_text())
            assert manifest["commit"] == repo.commit and len(manifest["files"]) == len(repo.files)

            # through the registry: convert takes the name, run takes what convert wrote
            out = store.home() / "gguf" / name / "f16.gguf"
            conv = edgemoe(hub, hf_cache, "convert", name, "--out", str(out), "--outtype", "f16", "--json")
            assert conv.returncode == 0, conv.stderr
            replies = []
            for gguf in (out, tiny_gguf(registry.get(name).variant, "f16")):  # pulled vs the fixture on disk
                run = edgemoe(
                    hub, hf_cache, "run", str(gguf), "-p", question, "--temp", "0", "-n", "48", "-t", "1", "--json"
                )
                assert run.returncode == 0, run.stderr
                replies.append(json.loads(run.stdout))
            assert replies[0]["completion_tokens"] > 0 and replies[0]["raw"] == replies[1]["raw"]

        # a second pull of a complete model fetches no file bytes
        before = hub.content_bytes()
        again = pulled(edgemoe(hub, hf_cache, "pull", PT, "--json"))
        assert hub.content_bytes() == before and {f["status"] for f in again["files"]} == {"cached"}

        listing = {(i["name"], i["state"]) for i in json.loads(edgemoe(hub, hf_cache, "list", "--json").stdout)}
        assert {(PT, "pulled"), (THINKING, "pulled"), (PT, "converted"), (THINKING, "converted")} <= listing


def test_dropped_connection_fails_clearly_and_the_rerun_resumes(repos, hf_cache):
    size = repos[PT].files[MODEL].size
    with HubServer([repos[PT]]) as hub:
        hub.drop_at[MODEL] = size // 2
        err = one_line_error(edgemoe(hub, hf_cache, "pull", PT), MODEL, "broke off", "re-run")
        first = hub.content_bytes(MODEL)
        partial = list(hf_cache.glob("models--baidu--ERNIE-4.5-21B-A3B-PT/blobs/*.incomplete"))
        assert len(partial) == 1, err
        kept = partial[0].stat().st_size  # huggingface_hub writes in 10 MiB chunks: what reached the disk
        assert 0 < kept <= size // 2 <= first
        assert not (registry.store_entry(PT) / "manifest.json").exists()  # nothing later stages would trust

        del hub.drop_at[MODEL]
        result = pulled(edgemoe(hub, hf_cache, "pull", PT, "--json"))
        second = hub.content_bytes(MODEL) - first
        assert second == size - kept < size  # only the missing part travelled again
        model = next(f for f in result["files"] if f["name"] == MODEL)
        assert model["status"] == "resumed" and model["sha256"] == repos[PT].files[MODEL].sha256
        assert not list(hf_cache.glob("models--*/blobs/*.incomplete"))


def test_corrupted_byte_is_detected_reported_and_not_kept(repos, hf_cache):
    with HubServer([repos[PT]]) as hub:
        hub.corrupt[MODEL] = 12345
        one_line_error(edgemoe(hub, hf_cache, "pull", PT), "checksum mismatch", MODEL, "deleted")
        blobs = hf_cache / "models--baidu--ERNIE-4.5-21B-A3B-PT" / "blobs"
        assert not (blobs / repos[PT].files[MODEL].sha256).exists()
        assert not list(blobs.glob("*.incomplete"))
        assert not (registry.store_entry(PT) / "manifest.json").exists()

        del hub.corrupt[MODEL]
        assert pulled(edgemoe(hub, hf_cache, "pull", PT, "--json"))["commit"] == repos[PT].commit


def test_too_little_disk_is_refused_before_any_byte(repos, hf_cache):
    with HubServer([repos[PT]]) as hub:
        hub.fake_size[MODEL] = 40 << 40  # the Hub says 40 TiB
        one_line_error(edgemoe(hub, hf_cache, "pull", PT), "not enough disk space", "free")
        assert hub.content_bytes() == 0

        del hub.fake_size[MODEL]
        # a reserve of all the free space and 1 GiB more: the files earlier tests deleted are freed by the
        # filesystem in its own time, so the free space can grow between here and the pull's check (a reserve of
        # exactly the free space let a CI run's pull through)
        reserve = shutil.disk_usage(hf_cache.parent).free + (1 << 30)
        one_line_error(edgemoe(hub, hf_cache, "pull", PT, EDGEMOE_DISK_RESERVE=str(reserve)), "reserve")
        assert hub.content_bytes() == 0


def test_hub_errors_are_one_line_exit_2(repos, hf_cache):
    with HubServer([repos[PT], hub_repo(THINKING, gated=True)]) as hub:
        one_line_error(
            edgemoe(hub, hf_cache, "pull", PT, "--revision", "no-such-branch"), "no-such-branch", "does not exist"
        )
        one_line_error(
            edgemoe(hub, hf_cache, "pull", PT, "--format", "gguf"), "unsloth/ERNIE-4.5-21B-A3B-PT-GGUF", "not found"
        )
        one_line_error(edgemoe(hub, hf_cache, "pull", THINKING), "gated", "--token")
        assert hub.content_bytes() == 0
        result = pulled(edgemoe(hub, hf_cache, "pull", THINKING, "--token", "hf_accepted", "--json"))
        assert result["repo"] == "baidu/ERNIE-4.5-21B-A3B-Thinking"
        one_line_error(edgemoe(hub, hf_cache, "pull", "ernie-4.5-21b-a3b-tinking"), "did you mean", THINKING)


def test_offline_uses_the_cache_or_names_what_is_missing(repos, hf_cache):
    with HubServer([repos[PT]]) as hub:
        one_line_error(edgemoe(hub, hf_cache, "pull", PT, HF_HUB_OFFLINE="1"), "offline", "not in the cache")
        pulled(edgemoe(hub, hf_cache, "pull", PT, "--json"))
        served = len(hub.requests)
        result = pulled(edgemoe(hub, hf_cache, "pull", PT, "--json", HF_HUB_OFFLINE="1"))
        assert result["offline"] and len(hub.requests) == served  # not one request
        snapshot = Path(result["path"])
        (snapshot / "tokenizer.model").unlink()
        one_line_error(edgemoe(hub, hf_cache, "pull", PT, HF_HUB_OFFLINE="1"), "1 of 6 files", "tokenizer.model")


def test_gguf_quant_pulls_only_that_file(repos, hf_cache, tiny_gguf, tmp_path):
    entry = registry.get(PT)
    q4, q8 = tmp_path / "q4.gguf", tmp_path / "q8.gguf"
    shutil.copy(tiny_gguf("pt", "f16"), q4)  # stand-ins named like the real quants
    shutil.copy(tiny_gguf("pt", "q8_0"), q8)
    gguf_repo = HubRepo.from_dir(
        entry.gguf.repo,
        None,
        extra={
            "ERNIE-4.5-21B-A3B-PT-Q4_0.gguf": q4,
            "ERNIE-4.5-21B-A3B-PT-Q8_0.gguf": q8,
            "README.md": tmp_path / "q4.gguf",
        },
    )
    with HubServer([gguf_repo]) as hub:
        result = pulled(edgemoe(hub, hf_cache, "pull", PT, "--format", "gguf", "--quant", "Q4_0", "--json"))
        assert [f["name"] for f in result["files"]] == ["ERNIE-4.5-21B-A3B-PT-Q4_0.gguf"]
        assert hub.content_bytes() == q4.stat().st_size
        path = registry.resolve(PT, fmt="gguf", quant="Q4_0")
        assert path.name == "ERNIE-4.5-21B-A3B-PT-Q4_0.gguf" and store.sha256_file(path) == store.sha256_file(q4)
        run = edgemoe(
            hub, hf_cache, "run", str(path), "-p", "What is 2 + 2?", "--temp", "0", "-n", "16", "-t", "1", "--json"
        )
        assert run.returncode == 0, run.stderr
        one_line_error(
            edgemoe(hub, hf_cache, "pull", PT, "--format", "gguf", "--quant", "Q9_X"), "no Q9_X", "Q4_0", "Q8_0"
        )


def test_dest_and_hf_home_choose_the_cache(repos, hf_cache, tmp_path):
    with HubServer([repos[PT]]) as hub:
        dest = tmp_path / "big-disk"
        result = pulled(edgemoe(hub, hf_cache, "pull", PT, "--dest", str(dest), "--json"))
        assert Path(result["path"]).is_relative_to(dest) and not hf_cache.exists()
        again = pulled(edgemoe(hub, hf_cache, "pull", PT, "--dest", str(dest), "--json", HF_HUB_OFFLINE="1"))
        assert again["path"] == result["path"]

        home = tmp_path / "hf-home"
        result = pulled(edgemoe(hub, hf_cache, "pull", PT, "--json", HF_HUB_CACHE="", HF_HOME=str(home)))
        assert Path(result["path"]).is_relative_to(home / "hub")
        assert registry.resolve(PT) == Path(result["path"])  # the latest pull is what the name means


# ---- a hostile or broken endpoint (issue 13) ----


@pytest.mark.parametrize(
    "field, value",
    [
        ("sha256", "/ABSOLUTE"),  # the proven attack: an absolute path as the LFS sha256 was "cached", failed, unlinked
        ("sha256", "../../../victim"),
        ("oid", "/ABSOLUTE"),
        ("path", "../../../victim.safetensors"),
        ("commit", "../../../victim"),
    ],
)
def test_ids_from_the_endpoint_are_checked_before_any_use(repos, hf_cache, tmp_path, field, value):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "victim.safetensors").write_bytes(b"precious")
    value = value.replace("/ABSOLUTE", str(victim))
    good = repos[PT]
    files = dict(good.files)
    if field == "commit":
        hostile = dataclasses.replace(good, commit=value, branches={"main": value})
    elif field == "path":
        files[value] = dataclasses.replace(files.pop(MODEL), path=value)
        hostile = dataclasses.replace(good, files=files)
    else:
        files[MODEL] = dataclasses.replace(files[MODEL], **{field: value})
        hostile = dataclasses.replace(good, files=files)
    with HubServer([hostile]) as hub:
        err = one_line_error(
            edgemoe(hub, hf_cache, "pull", PT, "--json", *(["--revision", "main"] if field == "commit" else [])),
            "invalid",
            "HF_ENDPOINT",
        )
        assert hub.content_bytes() == 0, err
    assert victim.read_bytes() == b"precious" and (tmp_path / "victim.safetensors").read_bytes() == b"precious"
    assert not (registry.store_entry(PT) / "manifest.json").exists()


def test_a_truncated_cached_blob_is_resumed_and_verified_not_trusted(repos, hf_cache):
    with HubServer([repos[PT]]) as hub:
        pulled(edgemoe(hub, hf_cache, "pull", PT, "--json"))
        blob = hf_cache / "models--baidu--ERNIE-4.5-21B-A3B-PT" / "blobs" / repos[PT].files[MODEL].sha256
        size = blob.stat().st_size
        with open(blob, "r+b") as f:
            f.truncate(1000)
        before = hub.content_bytes(MODEL)
        result = pulled(edgemoe(hub, hf_cache, "pull", PT, "--json"))
        model = next(f for f in result["files"] if f["name"] == MODEL)
        assert model["status"] == "resumed" and model["sha256"] == repos[PT].files[MODEL].sha256
        assert hub.content_bytes(MODEL) - before == size - 1000
        assert blob.stat().st_size == size


def test_a_listed_file_the_endpoint_does_not_serve_is_not_called_a_network_problem(repos, hf_cache):
    with HubServer([repos[PT]]) as hub:
        hub.gone.add(MODEL)
        err = one_line_error(edgemoe(hub, hf_cache, "pull", PT), "does not serve")
        assert "network" not in err
