"""What the commands read from the user's folders and the user's setup, through the CLI: a
damaged JSON file (classes.json, job.json, a split file) is one line naming it; a --scheduler
the model's family does not take is one line before anything is written; a hub id that is
neither cached nor reachable is one line within seconds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from attnseg.pipeline.cli import main
from attnseg.pipeline.errors import UserError

TINY = ["--model", "tiny", "--classes", "dog,cat", "--num-per-class", "1", "--steps", "1",
        "--height", "64", "--width", "64", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two samples of the tiny model: a synthetic dataset to damage copies of."""
    out = tmp_path_factory.mktemp("ds") / "ds"
    assert main(["synth", *TINY, "--out", str(out)]) == 0
    return out


def _one_line(capsys, *parts):
    err = capsys.readouterr().err
    assert err.startswith("attnseg: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err
    return err


# ---- damaged JSON and split files


@pytest.mark.parametrize("text, what", [
    ('{"0": "background", "1": "do', "not valid JSON (Unterminated string"),
    ('["background", "dog"]', "it holds a list where a JSON object"),
    ("", "it is empty"),
    ('{"zero": "background"}', "its keys must be label ids"),
    ('{"255": "ignore"}', "it names no class"),
    ('{"0": 1}', "its values must be class names"),
])
def test_damaged_classes_json_is_one_line_in_eval_and_train(dataset, tmp_path, capsys, text,
                                                            what):
    pseudo = tmp_path / "pseudo"
    shutil.copytree(dataset, pseudo)
    (pseudo / "classes.json").write_text(text)
    gt = dataset / "SegmentationClass"
    assert main(["eval", "--pseudo", str(pseudo), "--gt", str(gt)]) == 2
    _one_line(capsys, f"{pseudo / 'classes.json'} is damaged: ", what)
    assert not (pseudo / "eval-pseudo.json").exists()
    # The same reader serves training, and the ground truth's classes.json.
    assert main(["train", "--data", str(pseudo), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--workers", "0", "--no-progress"]) == 2
    _one_line(capsys, f"{pseudo / 'classes.json'} is damaged: ", what)
    assert main(["eval", "--pseudo", str(gt), "--gt", str(pseudo)]) == 2
    _one_line(capsys, "is damaged: ", what)


def test_damaged_classes_json_in_a_real_process_has_no_traceback(dataset, tmp_path):
    pseudo = tmp_path / "pseudo"
    shutil.copytree(dataset, pseudo)
    (pseudo / "classes.json").write_text('["background", "dog"]')
    r = subprocess.run([sys.executable, "-m", "attnseg.pipeline.cli", "eval", "--pseudo",
                        str(pseudo), "--gt", str(dataset / "SegmentationClass")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"attnseg: error: {pseudo / 'classes.json'} is damaged")


@pytest.mark.parametrize("text", ['{"model": "tin', '["a"]', ""])
def test_damaged_job_json_is_one_line_and_nothing_is_written(dataset, tmp_path, capsys, text):
    out = tmp_path / "ds"
    shutil.copytree(dataset, out)
    (out / "job.json").write_text(text)
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["synth", *TINY, "--out", str(out)]) == 2
    _one_line(capsys, f"{out / 'job.json'} is damaged: ", "use another --out")
    assert sorted(p.name for p in out.rglob("*")) == before


def test_damaged_split_file_is_one_line(dataset, tmp_path, capsys):
    data = tmp_path / "ds"
    shutil.copytree(dataset, data)
    (data / "ImageSets/Segmentation/train.txt").write_bytes(b"\xff\xd8\xff\xe0 not text")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--workers", "0", "--no-progress"]) == 2
    _one_line(capsys, "split file ", "train.txt is damaged: it is not UTF-8 text")


@pytest.mark.parametrize("weights", ["1,inf", "nan", "0.5,-inf", "1,x"])
def test_classes_per_prompt_not_finite_is_one_line(tmp_path, capsys, weights):
    out = tmp_path / "prompts.jsonl"
    assert main(["prompts", "--classes", "dog,cat", "--classes-per-prompt", weights,
                 "--out", str(out)]) == 2
    _one_line(capsys, f"--classes-per-prompt {weights!r} is not a comma list of finite weights")
    assert not out.exists()


# ---- schedulers against the model's family


@pytest.mark.parametrize("model, family", [("tiny-flux", "flux"), ("tiny-sd3", "sd3")])
@pytest.mark.parametrize("scheduler", ["euler", "turbo"])
def test_flow_matching_models_refuse_a_scheduler_before_loading(tmp_path, capsys, model, family,
                                                                 scheduler):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    assert main(["synth", "--model", model, "--scheduler", scheduler, "--classes", "dog,cat",
                 "--out", str(out), "--no-progress"]) == 2
    _one_line(capsys, f"--scheduler {scheduler} does not fit model {model!r} ({family}, a "
              "flow-matching model): it takes no --scheduler", "SD 1.x/2.x, SDXL and PixArt")
    assert time.perf_counter() - t0 < 5  # told by name: nothing is built
    assert not out.exists()


def test_a_loaded_flow_matching_pipeline_refuses_a_scheduler():
    """Where the family is known only once loaded (a hub id not in the cache), set_scheduler
    refuses, and run_synth calls it before anything is written."""
    from attnseg.pipeline.models.loading import set_scheduler
    from attnseg.pipeline.models.tiny import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline()
    own = type(pipe.scheduler)
    with pytest.raises(UserError, match="does not fit this model \\(flux, a flow-matching"):
        set_scheduler(pipe, "euler")
    assert type(pipe.scheduler) is own


def test_family_of_a_folder_is_read_from_its_model_index(tmp_path, capsys):
    folder = tmp_path / "flux-folder"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert main(["synth", "--model", str(folder), "--scheduler", "dpm", "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 2
    _one_line(capsys, f"--scheduler dpm does not fit model {str(folder)!r} (flux")


def test_few_step_schedulers_say_what_they_do(tmp_path, capsys):
    """turbo with guidance and lcm without an LCM-LoRA run, with a note on stderr; turbo at
    --guidance 0 runs without one."""
    assert main(["synth", *TINY, "--scheduler", "turbo", "--guidance", "3", "--out",
                 str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert err.count("note: --scheduler turbo") == 1 and "--guidance 3 every step" in err
    assert main(["synth", *TINY, "--scheduler", "lcm", "--guidance", "1", "--out",
                 str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "note: --scheduler lcm" in err and "without an LCM-LoRA" in err
    assert main(["synth", *TINY, "--scheduler", "turbo", "--guidance", "0", "--out",
                 str(tmp_path / "c")]) == 0
    assert "note:" not in capsys.readouterr().err
    # The sampler is what was asked for: it is in the job record.
    assert json.loads((tmp_path / "c" / "job.json").read_text())["scheduler"] == "turbo"


# ---- hub ids without network


def _offline_env(tmp_path, **extra):
    """No cache (an empty HF_HOME) and a hub endpoint nothing listens on: the test does not
    depend on the machine's network, proxies or cache."""
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY",
                                "HTTP_PROXY", "ALL_PROXY", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    home = tmp_path / "hf-home"
    home.mkdir(exist_ok=True)
    env.update(HF_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9", **extra)
    return env


@pytest.mark.parametrize("offline, why", [
    (False, "the hub cannot be reached (no network?)"),
    (True, "HF_HUB_OFFLINE is set"),
])
def test_uncached_hub_id_without_network_is_one_line_at_once(tmp_path, offline, why):
    env = _offline_env(tmp_path, **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "attnseg.pipeline.cli", "synth", "--model",
                        "some-org/not-cached-model", "--classes", "dog,cat", "--out", str(out),
                        "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr
    assert r.stderr == (f"attnseg: error: some-org/not-cached-model: not in the local cache "
                        f"and {why}\n")
    assert not out.exists()
    # The hub client alone retries for about half a minute; torch's import takes a few s.
    assert took < 25, took


def test_cached_hub_model_loads_without_asking_the_hub(tmp_path):
    """A hub id in the local cache loads from it; the hub (here a local server that answers
    404 and notes what was asked) is not asked for the model."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from attnseg.pipeline.models.tiny import build_tiny_pipeline

    asked = []

    class Hub(BaseHTTPRequestHandler):
        def _answer(self):
            asked.append(self.path)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = _offline_env(tmp_path)
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
    snapshot = (tmp_path / "hf-home" / "hub" / "models--some-org--cached-model" / "snapshots"
                / ("0" * 40))
    build_tiny_pipeline().save_pretrained(str(snapshot))
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    code = ("import time, torch; from attnseg.pipeline.models.loading import load_pipeline; "
            "t = time.perf_counter(); p = load_pipeline('some-org/cached-model', "
            "torch.device('cpu'), torch.float32); print(type(p).__name__, "
            "round(time.perf_counter() - t, 1))")
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=120)
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr
    name, seconds = r.stdout.split()
    assert name == "StableDiffusionPipeline" and float(seconds) < 20, r.stdout
    assert not [path for path in asked if "cached-model" in path], asked
