"""The model registry (configs/models.toml): entries, name lookup, resolve, and the `models` / `list` commands."""

from __future__ import annotations

import fnmatch
import json

import pytest
from typer.testing import CliRunner

from edgemoe_cli import models, registry, store
from edgemoe_cli.cli import app
from edgemoe_cli.errors import EdgeMoEError

runner = CliRunner()


def test_hub_entries_name_repo_revision_variant_files_and_gguf():
    entries = registry.load()
    for variant, repo in (("thinking", "baidu/ERNIE-4.5-21B-A3B-Thinking"), ("pt", "baidu/ERNIE-4.5-21B-A3B-PT")):
        e = entries[f"ernie-4.5-21b-a3b-{variant}"]
        assert (e.source, e.repo, e.variant, e.chat_template) == ("hub", repo, variant, f"ernie-{variant}")
        assert e.revision
        # the allow patterns take what a conversion reads and leave the rest of the repo behind
        real_files = [
            "model-00001-of-00009.safetensors",
            "model.safetensors.index.json",
            "config.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "generation_config.json",
        ]
        for f in real_files:
            assert any(fnmatch.fnmatch(f, p) for p in e.allow_patterns), f
        assert not any(fnmatch.fnmatch("benchmark.png", p) for p in e.allow_patterns)
        # one quant selects one file of the GGUF repo (single or split), not its neighbours
        gguf_files = [
            f"ERNIE-4.5-21B-A3B-{variant.upper()}-Q4_0.gguf",
            f"ERNIE-4.5-21B-A3B-{variant.upper()}-Q4_K_M.gguf",
            f"BF16/ERNIE-4.5-21B-A3B-{variant.upper()}-BF16-00001-of-00002.gguf",
        ]

        def pick(q, e=e):
            return [f for f in gguf_files if any(fnmatch.fnmatch(f, p) for p in e.gguf.allow_patterns(q))]

        assert pick("Q4_0") == gguf_files[:1] and pick("BF16") == gguf_files[2:]
        assert e.gguf.repo.endswith("-GGUF") and e.gguf.default_quant == "Q4_0"


def test_tiny_fixtures_are_local_sources():
    for variant in ("pt", "thinking"):
        e = registry.get(f"tiny-ernie-{variant}")
        assert e.source == "local" and e.variant == variant and e.formats == ("safetensors",)
        assert e.path.parts[-3:] == ("data", "fixtures", f"tiny-ernie-{variant}")


def test_unknown_name_lists_known_and_closest():
    with pytest.raises(EdgeMoEError) as e:
        registry.get("tiny-ernie-tinking")
    assert "did you mean 'tiny-ernie-thinking'" in e.value.hint and "ernie-4.5-21b-a3b-pt" in e.value.hint
    assert registry.get("TINY-ERNIE-PT").name == "tiny-ernie-pt"


def test_resolve_paths_local_names_and_unpulled_names(tmp_path):
    assert registry.resolve(str(tmp_path)) == tmp_path
    local = registry.get("tiny-ernie-pt").path
    if local.is_dir():
        assert registry.resolve("tiny-ernie-pt") == local
        assert (local / "config.json").is_file()
    else:
        with pytest.raises(EdgeMoEError, match="missing"):
            registry.resolve("tiny-ernie-pt")
    with pytest.raises(EdgeMoEError) as e:
        registry.resolve("ernie-4.5-21b-a3b-pt")
    assert "not been pulled" in e.value.message and "edgemoe pull ernie-4.5-21b-a3b-pt" in e.value.hint
    with pytest.raises(EdgeMoEError, match="does not exist"):
        registry.resolve(str(tmp_path / "nope.gguf"))


def test_models_command_lists_the_registry():
    out = runner.invoke(app, ["models", "--json"])
    assert out.exit_code == 0, out.output
    names = [m["name"] for m in json.loads(out.stdout)]
    assert names == list(registry.load())
    table = runner.invoke(app, ["models"], env={"COLUMNS": "200"})
    assert "unsloth/ERNIE-4.5-21B-A3B-Thinking-GGUF" in table.stdout


def test_list_reads_manifests_and_ggufs(tmp_path):
    assert runner.invoke(app, ["list", "--json"]).stdout.strip() == "[]"
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    entry = registry.store_entry("ernie-4.5-21b-a3b-pt")
    entry.mkdir(parents=True)
    store.write_manifest(
        entry,
        kind="pull",
        name="ernie-4.5-21b-a3b-pt",
        repo="baidu/ERNIE-4.5-21B-A3B-PT",
        commit="a" * 40,
        format="safetensors",
        quant=None,
        path=str(snapshot),
        total_bytes=2,
        files=[{"name": "config.json", "size": 2, "sha256": "x", "lfs": False}],
    )
    gguf_dir = store.home() / "gguf" / "tiny-ernie-pt"
    gguf_dir.mkdir(parents=True)
    (gguf_dir / "f16.gguf").write_bytes(b"GGUF" + bytes(60))
    (gguf_dir / "mix.gguf").write_bytes(b"GGUF" + bytes(28))
    store.write_manifest(gguf_dir / "mix.gguf", recipe="q4-experts")
    items = {(i["name"], i["state"], i["size"]) for i in json.loads(runner.invoke(app, ["list", "--json"]).stdout)}
    assert items == {
        ("ernie-4.5-21b-a3b-pt", "pulled", 2),
        ("tiny-ernie-pt", "converted", 64),
        ("tiny-ernie-pt", "quantized", 32),
    }
    (snapshot / "config.json").unlink()
    assert models.store_items()[0].state == "pulled (files missing)"


def test_convert_takes_a_registry_name(tmp_path):
    if not registry.get("tiny-ernie-pt").path.is_dir():
        pytest.skip("data/fixtures/tiny-ernie-pt is not in this checkout")
    out = tmp_path / "pt.gguf"
    result = runner.invoke(app, ["convert", "tiny-ernie-pt", "--out", str(out), "--outtype", "f16", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["out"] == str(out) and out.read_bytes()[:4] == b"GGUF"
    missing = runner.invoke(app, ["convert", "tiny-ernie-pro", "--out", str(out)])
    assert missing.exit_code != 0 and "did you mean 'tiny-ernie-pt'" in str(missing.exception)
