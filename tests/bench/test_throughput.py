"""`attnseg bench throughput` on the tiny model: every field present and consistent."""

from __future__ import annotations

import json

import pytest

from attnseg.bench.throughput import COMPONENTS, VARIANTS
from attnseg.pipeline.cli import main


def test_throughput_json_has_every_field(tmp_path, capsys):
    out = tmp_path / "tp"
    assert main(["bench", "throughput", "--model", "tiny", "--height", "64", "--width", "64",
                 "--steps", "2", "--repeats", "2", "--warmup", "0", "--batch-size", "1,2",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "| torch | 2 | harvest |" in printed and "random weights" in printed
    # A line per measured run on stderr, so a long sweep shows it is alive.
    assert captured.err.count("bench: torch batch") == 2 * 2 * len(VARIANTS)
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".md").exists()
    for key in ("platform", "cpu_count", "torch", "diffusers", "transformers", "device"):
        assert key in result["machine"]
    assert len(result["runs"]) == 2 * 2 * len(VARIANTS)
    rows = {(r["batch_size"], r["variant"]): r for r in result["summary"]}
    assert set(rows) == {(b, v) for b in (1, 2) for v in VARIANTS}
    for (bs, variant), r in rows.items():
        s = r["seconds_per_batch"]
        assert 0 < s["min"] <= s["median"] <= s["max"]
        assert abs(r["images_per_s"] - bs / s["median"]) < 1e-9
        assert abs(r["denoising_steps_per_s"] - 2 / s["median"]) < 1e-9
        assert set(r["seconds_per_image"]) == set(COMPONENTS)
        assert r["seconds_per_image"]["unet"] > 0 and r["seconds_per_image"]["vae"] > 0
        assert r["peak_device_bytes"] is None  # CPU run
        if variant == "stock":
            assert r["time_vs_stock"] == 1.0 and r["attention_state_bytes"] == 0
    for bs in (1, 2):
        harvest, store = rows[(bs, "harvest")], rows[(bs, "store_every_map")]
        assert harvest["seconds_per_image"]["harvest"] > 0
        assert harvest["seconds_per_image"]["write"] > 0
        # The running buffers are far smaller than every stored map.
        assert 0 < harvest["attention_state_bytes"] * 20 < store["attention_state_bytes"]
    # The store-every-map state grows with the step count; attnseg's does not.
    out2 = tmp_path / "tp4"
    assert main(["bench", "throughput", "--height", "64", "--width", "64", "--steps", "4",
                 "--repeats", "1", "--warmup", "0", "--batch-size", "1", "--no-plots",
                 "--no-progress", "--out", str(out2)]) == 0
    rows4 = {r["variant"]: r for r in json.loads(out2.with_suffix(".json").read_text())["summary"]}
    held = {v: rows[(1, v)]["attention_state_bytes"] for v in ("harvest", "store_every_map")}
    assert rows4["harvest"]["attention_state_bytes"] == held["harvest"]
    assert rows4["store_every_map"]["attention_state_bytes"] == 2 * held["store_every_map"]


def test_unknown_backend_is_a_clear_error(capsys):
    assert main(["bench", "throughput", "--backend", "nope", "--no-plots"]) == 2
    assert "backend(s) ['nope'] not available" in capsys.readouterr().err


def test_out_with_a_suffix_and_a_non_square_size(tmp_path, capsys):
    """--out x.json writes x.json and x.md (not x.json.md); images need not be square."""
    out = tmp_path / "x.json"
    assert main(["bench", "throughput", "--height", "64", "--width", "48", "--steps", "1",
                 "--repeats", "1", "--warmup", "0", "--batch-size", "1", "--no-plots",
                 "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.md"]
    result = json.loads(out.read_text())
    assert result["size"] == [64, 48] and f"results: {out}, {tmp_path / 'x.md'}" in printed
    # One run per variant: no spread to judge a ratio by, so every ratio is marked.
    harvest = next(r for r in result["summary"] if r["variant"] == "harvest")
    assert harvest["within_spread"] and "not meaningful" in printed


def test_a_ratio_within_the_run_spread_is_marked():
    from attnseg.bench.common import ratio_within_spread

    stock = {"median": 10.0, "min": 9.0, "max": 12.0, "n": 3}
    assert ratio_within_spread(0.95, {"median": 9.5, "min": 9.4, "max": 9.6, "n": 3}, stock)
    assert not ratio_within_spread(1.5, {"median": 15, "min": 14.8, "max": 15.2, "n": 3}, stock)
    assert ratio_within_spread(1.5, {"median": 15, "min": 14.8, "max": 15.2, "n": 1}, stock)


def test_engine_backend_runs_harvest_against_the_torch_stock_baseline(tmp_path, monkeypatch,
                                                                       torch_one_thread):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    monkeypatch.setenv("ATTNSEG_ENGINE_CACHE", str(tmp_path / "engines"))
    out = tmp_path / "tp"
    assert main(["bench", "throughput", "--backend", "onnxruntime", "--height", "64", "--width",
                 "64", "--steps", "2", "--repeats", "1", "--warmup", "0", "--batch-size", "1",
                 "--no-plots", "--no-progress", "--out", str(out)]) == 0
    rows = {(r["backend"], r["variant"]): r
            for r in json.loads(out.with_suffix(".json").read_text())["summary"]}
    # Only the stock baseline of torch (not asked for) and the engine's harvest run.
    assert set(rows) == {("torch", "stock"), ("onnxruntime", "harvest")}
    engine = rows[("onnxruntime", "harvest")]
    base = rows[("torch", "stock")]["seconds_per_batch"]["median"]
    assert engine["time_vs_stock"] == pytest.approx(engine["seconds_per_batch"]["median"] / base)
    assert engine["attention_state_bytes"] > 0  # the engine's map outputs were summed
    assert engine["seconds_per_image"]["unet"] > 0 and engine["seconds_per_image"]["write"] > 0
    assert list((tmp_path / "engines").iterdir()), "the engine was not cached"


def test_config_file_then_flags_then_set(tmp_path, capsys):
    """The benchmark's settings come from --config, flags override it, --set overrides both."""
    config = tmp_path / "tp.toml"
    config.write_text('repeats = 1\nwarmup = 0\nsteps = 3\nheight = 64\nwidth = 64\n'
                      'batch_sizes = [1]\nplots = false\n')
    out = tmp_path / "tp"
    assert main(["bench", "throughput", "--config", str(config), "--steps", "2", "--set",
                 "repeats=2", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["config"]["steps"] == 2 and result["config"]["repeats"] == 2
    assert result["config"]["warmup"] == 0 and result["size"] == [64, 64]
    assert not out.with_suffix(".png").exists()


def test_prompts_lora_through_the_cli(tmp_path, capsys):
    out = tmp_path / "pl"
    assert main(["bench", "prompts-lora", "--set", "parts=prompts", "--out", str(out)]) == 0
    assert "results:" in capsys.readouterr().out
    result = json.loads(out.with_suffix(".json").read_text())
    assert {p["class_set"] for p in result["prompts"]} >= {"voc", "cityscapes"}


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-pixart", "tiny-sd3"])
def test_every_family_runs_every_variant(tmp_path, capsys, model, torch_one_thread):
    """Stock runs the model's own processors (SD3's are joint), store-every-map keeps the
    class-relevant maps of each family, harvesting keeps a few bytes."""
    out = tmp_path / model
    assert main(["bench", "throughput", "--model", model, "--height", "64", "--width", "64",
                 "--steps", "2", "--repeats", "1", "--warmup", "0", "--batch-size", "1",
                 "--no-plots", "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.with_suffix(".json").read_text())["summary"]}
    assert set(rows) == set(VARIANTS)
    held = {v: r["attention_state_bytes"] for v, r in rows.items()}
    assert held["stock"] == 0 < held["harvest"] < held["store_every_map"]


@pytest.mark.slow
def test_compile_backend_after_the_torch_variants_on_a_dit(tmp_path, torch_one_thread):
    """torch variants then the compile backend in one run: the torch bench's clock hooks and
    processors are gone before the graph is traced (fullgraph would refuse a hook's
    `time.perf_counter`), and a DiT's own processors are what compile wraps."""
    out = tmp_path / "flux"
    assert main(["bench", "throughput", "--model", "tiny-flux", "--backend", "torch,compile",
                 "--height", "64", "--width", "64", "--steps", "2", "--repeats", "1",
                 "--warmup", "0", "--batch-size", "1", "--no-plots", "--out", str(out)]) == 0
    rows = {(r["backend"], r["variant"]): r
            for r in json.loads(out.with_suffix(".json").read_text())["summary"]}
    assert set(rows) == {("torch", v) for v in VARIANTS} | {("compile", "harvest")}
    assert rows[("compile", "harvest")]["attention_state_bytes"] > 0
