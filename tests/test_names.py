"""One name from pull to run: `pull NAME`, `quantize NAME --recipe R`, `run NAME[:TAG]`, `list`, `rm`, by name only.

Against the local Hub server (tests/hubserver.py), with the installed `edgemoe` in a subprocess, as a user types it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hubserver import HubRepo, HubServer
from test_pull import EDGEMOE, PT, THINKING, edgemoe, hub_repo, one_line_error, pulled

from edgemoe_cli import models, registry, store
from edgemoe_cli.errors import EdgeMoEError
from edgemoe_cli.recipe import explain, load_recipe, read_tensors

QUESTION = "What is 3 + 4?"


@pytest.fixture
def hf_cache(tmp_path):
    return tmp_path / "hf-cache"


def run_json(hub, hf_cache, model: str, *extra: str) -> tuple[dict, str]:
    p = edgemoe(hub, hf_cache, "run", model, "-p", QUESTION, "--temp", "0", "-n", "24", "-t", "1", "--json", *extra)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), p.stderr


@pytest.mark.parametrize("name", [PT, THINKING])
def test_pull_quantize_run_by_name(name, hf_cache):
    variant = registry.get(name).variant
    with HubServer([hub_repo(name)]) as hub:
        pulled(edgemoe(hub, hf_cache, "pull", name, "--json"))
        one_line_error(edgemoe(hub, hf_cache, "run", name, "-p", QUESTION), "no GGUF", f"quantize {name}")

        q = edgemoe(hub, hf_cache, "quantize", name, "--recipe", "edge-balanced", "--json")
        assert q.returncode == 0, q.stderr
        made = json.loads(q.stdout)
        gguf_dir = store.home() / "gguf" / name
        assert made["out"] == str(gguf_dir / "edge-balanced.gguf")
        assert made["model"] == str(gguf_dir / "bf16.gguf")  # converted into the store first: the checkpoint is bf16
        assert f"{name}:bf16" in q.stderr and "converted" in q.stderr
        want = {t.name: t.type for t in explain(load_recipe("edge-balanced"), gguf_dir / "bf16.gguf").tensors}
        assert {t.name: t.type for t in read_tensors(gguf_dir / "edge-balanced.gguf")[0]} == want

        reply, said = run_json(hub, hf_cache, name)
        assert reply["completion_tokens"] > 0 and (reply["reasoning"] != "") == (variant == "thinking")
        assert f"{name}:edge-balanced" in said and "newest" in said  # says which one it took, on stderr
        tagged, said = run_json(hub, hf_cache, f"{name}:EDGE-balanced")
        assert tagged["raw"] == reply["raw"] and "as tagged" in said

        # a second quantize reuses the converted file; run then takes the newest made
        again = edgemoe(hub, hf_cache, "quantize", name, "--recipe", "q4_0-uniform", "--json")
        assert again.returncode == 0, again.stderr
        assert "converted" not in again.stderr
        assert json.loads(again.stdout)["model"] == str(gguf_dir / "bf16.gguf")
        os.utime(gguf_dir / "edge-balanced.gguf", (0, 0))  # make the order explicit, not a matter of timing
        _, said = run_json(hub, hf_cache, name)
        assert f"{name}:q4_0-uniform" in said
        one_line_error(
            edgemoe(hub, hf_cache, "run", f"{name}:q9", "-p", QUESTION),
            f"no {name}:q9",
            f"{name}:bf16",
            f"{name}:edge-balanced",
            f"{name}:q4_0-uniform",
        )

        listing = json.loads(edgemoe(hub, hf_cache, "list", "--json").stdout)
        assert {i["ref"] for i in listing} == {name, f"{name}:bf16", f"{name}:edge-balanced", f"{name}:q4_0-uniform"}


def test_run_takes_the_pulled_gguf_or_lists_the_choices(hf_cache, tiny_gguf, tmp_path):
    entry = registry.get(PT)
    q4, q8 = tmp_path / "q4.gguf", tmp_path / "q8.gguf"
    shutil.copy(tiny_gguf("pt", "f16"), q4)
    shutil.copy(tiny_gguf("pt", "q8_0"), q8)
    gguf_repo = HubRepo.from_dir(
        entry.gguf.repo, None, extra={"ERNIE-4.5-21B-A3B-PT-Q4_0.gguf": q4, "ERNIE-4.5-21B-A3B-PT-Q8_0.gguf": q8}
    )
    with HubServer([gguf_repo]) as hub:
        pulled(edgemoe(hub, hf_cache, "pull", PT, "--format", "gguf", "--quant", "Q4_0", "--json"))
        _, said = run_json(hub, hf_cache, PT)
        assert f"{PT}:Q4_0" in said and "pulled" in said
        pulled(edgemoe(hub, hf_cache, "pull", PT, "--format", "gguf", "--quant", "Q8_0", "--json"))
        err = one_line_error(edgemoe(hub, hf_cache, "run", PT, "-p", QUESTION), "several", f"{PT}:Q4_0", f"{PT}:Q8_0")
        assert "Traceback" not in err
        reply, _ = run_json(hub, hf_cache, f"{PT}:q8_0")
        assert reply["completion_tokens"] > 0
        # only quantized GGUFs and no checkpoint: nothing to quantize from, and the hint says what to pull
        one_line_error(edgemoe(hub, hf_cache, "quantize", PT, "--recipe", "edge-balanced"), "nothing", f"pull {PT}")


def test_rm_deletes_only_store_files_and_asks(hf_cache):
    with HubServer([hub_repo(PT)]) as hub:
        result = pulled(edgemoe(hub, hf_cache, "pull", PT, "--json"))
        assert edgemoe(hub, hf_cache, "quantize", PT, "--recipe", "q4_0-uniform").returncode == 0
        made = store.home() / "gguf" / PT / "q4_0-uniform.gguf"
        one_line_error(edgemoe(hub, hf_cache, "rm", f"{PT}:q4_0-uniform"), "--yes")  # no terminal to ask on
        assert made.is_file()
        gone = json.loads(edgemoe(hub, hf_cache, "rm", f"{PT}:q4_0-uniform", "--yes", "--json").stdout)
        assert gone["paths"] == [str(made), str(made) + ".manifest.json"] and not made.exists()
        assert (store.home() / "gguf" / PT / "bf16.gguf").is_file()

        whole = json.loads(edgemoe(hub, hf_cache, "rm", PT, "--yes", "--json").stdout)
        assert not (store.home() / "gguf" / PT).exists() and not (store.home() / "models" / PT).exists()
        assert whole["kept"] == [result["path"]]  # the Hugging Face cache is not the store's to delete
        assert all((Path(result["path"]) / f["name"]).is_file() for f in result["files"])
        one_line_error(edgemoe(hub, hf_cache, "rm", PT, "--yes"), "nothing called", "edgemoe list")


def test_rm_refuses_a_store_entry_that_leads_outside(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.gguf").write_bytes(b"GGUF")
    (store.home() / "gguf").mkdir(parents=True)
    (store.home() / "gguf" / "linked").symlink_to(outside)
    with pytest.raises(EdgeMoEError, match="not inside the store"):
        models.plan_removal("linked")
    assert (outside / "keep.gguf").is_file()


def test_split_ref():
    assert models.split_ref("ernie:edge-balanced") == ("ernie", "edge-balanced")
    assert models.split_ref("ernie:stock:Q4_K_M") == ("ernie", "stock:Q4_K_M")
    assert models.split_ref("ernie") == ("ernie", None)


def test_compare_by_name_asks_every_prompt(tiny_gguf):
    for name, variant in ((PT, "pt"), (THINKING, "thinking")):
        made = store.home() / "gguf" / name
        made.mkdir(parents=True)
        shutil.copy(tiny_gguf(variant, "f16"), made / "f16.gguf")
    questions = ["What is 2 + 2?", "Name a colour."]
    p = subprocess.run(
        [
            str(EDGEMOE),
            "compare",
            "--pt",
            PT,
            "--thinking",
            THINKING,
            "-p",
            questions[0],
            "-p",
            questions[1],
            "-n",
            "8",
            "-t",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    items = json.loads(p.stdout)["items"]
    assert [i["prompt"]["text"] for i in items] == questions
    assert all(i["pt"]["completion_tokens"] > 0 and i["thinking"]["completion_tokens"] > 0 for i in items)
    assert f"{PT}:f16" in p.stderr and f"{THINKING}:f16" in p.stderr


def test_serve_by_name_writes_the_resolved_file_and_the_name_into_its_unit(tiny_gguf, tmp_path):
    made = store.home() / "gguf" / PT
    made.mkdir(parents=True)
    shutil.copy(tiny_gguf("pt", "f16"), made / "f16.gguf")
    unit = tmp_path / "edgemoe.service"
    p = subprocess.run(
        [str(EDGEMOE), "serve", PT, "--install-systemd", "--unit-path", str(unit), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    exec_start = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
    assert f'"{(made / "f16.gguf").resolve()}"' in exec_start and f'"--model-id" "{PT}:f16"' in exec_start


def test_repeated_list_options_add_up():
    from edgemoe_cli import bench

    assert bench.split_list(["a.gguf,b.gguf", "c.gguf"]) == ["a.gguf", "b.gguf", "c.gguf"]
    assert bench.split_list("x, y,") == ["x", "y"] and bench.split_list(None) == []
    assert bench.parse_threads(",".join(["1", "4,2"])) == [1, 2, 4]
