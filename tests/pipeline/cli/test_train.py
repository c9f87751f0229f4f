"""`attnseg train` / `attnseg eval` end to end on a tiny-model synthetic dataset (the demo's
format), a real kill and resume, and every bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from attnseg.pipeline.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1"}
TRAIN = ["--model", "segformer-tiny", "--batch-size", "2", "--crop", "64", "--workers", "0",
         "--warmup-steps", "1", "--lr", "1e-3", "--no-progress", "--set",
         "augment.base_scale=null"]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "attnseg.pipeline.cli", *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """A synthetic dataset written by `attnseg synth` on the tiny model."""
    out = tmp_path_factory.mktemp("demo") / "ds"
    assert main(["synth", "--model", "tiny", "--classes", "aeroplane,dog,cat",
                 "--num-per-class", "2", "--steps", "2", "--height", "64", "--width", "64",
                 "--out", str(out), "--no-progress"]) == 0
    return out


def test_train_and_eval_end_to_end(demo_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(demo_data), "--loss", "cotrain", "--out", str(run),
                 "--steps", "3", "--val-data", str(demo_data), "--val-dataset", "synthetic",
                 "--val-split", "train", *TRAIN]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "validation mIoU" in out and "tiny test-size" in out
    for name in ("run.json", "model.safetensors", "log.csv", "val.csv",
                 "checkpoints/step_00000003.safetensors"):
        assert (run / name).is_file(), name
    doc = json.loads((run / "run.json").read_text())
    assert doc["classes"] == ["background", "aeroplane", "dog", "cat"]
    assert doc["config"]["loss"]["name"] == "cotrain"
    # Both co-trained networks are in the checkpoint; the model file holds network 0.
    ckpt = load_file(str(run / "checkpoints/step_00000003.safetensors"))
    assert any(k.startswith("model.1.") for k in ckpt)
    assert main(["eval", "--checkpoint", str(run), "--data", str(demo_data), "--dataset",
                 "synthetic", "--split", "train", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((run / "eval-synthetic-train.json").read_text())
    assert report["images"] == 6 and report["skipped"] == 0
    ious = [c["iou"] for c in report["per_class"] if c["iou"] is not None]
    assert report["mIoU"] == pytest.approx(float(np.mean(ious)))
    assert f"mIoU {100 * report['mIoU']:.2f}" in printed and "aeroplane" in printed
    # The pseudo-masks scored against themselves are perfect (their ignore pixels are the
    # ground truth's ignore pixels too).
    pseudo_report = tmp_path / "pseudo.json"
    assert main(["eval", "--pseudo", str(demo_data), "--gt", str(demo_data / "SegmentationClass"),
                 "--out", str(pseudo_report)]) == 0
    assert json.loads(pseudo_report.read_text())["mIoU"] == pytest.approx(1.0)


def test_eval_defaults_fit_a_synthetic_dataset(demo_data, tmp_path, capsys):
    """What a new user types: the synthetic set's only split is the default, the pseudo-mask
    score is written as JSON too, and the JSON says its metrics are fractions."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(demo_data), "--out", str(run), "--steps", "2",
                 *TRAIN]) == 0
    assert main(["eval", "--checkpoint", str(run), "--data", str(demo_data),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((run / "eval-synthetic-train.json").read_text())
    assert report["split"] == "train" and report["images"] == 6
    assert "fractions" in report["units"] and "IoU %" in printed
    pseudo = tmp_path / "pseudo"
    import shutil

    shutil.copytree(demo_data / "SegmentationClass", pseudo)
    assert main(["eval", "--pseudo", str(pseudo), "--gt",
                 str(demo_data / "SegmentationClass"), "--num-classes", "4"]) == 0
    assert f"report: {pseudo / 'eval-pseudo.json'}" in capsys.readouterr().out
    assert json.loads((pseudo / "eval-pseudo.json").read_text())["mIoU"] == pytest.approx(1.0)


def test_a_short_run_says_how_it_warms_up(demo_data, tmp_path, capsys):
    args = ["train", "--data", str(demo_data), "--steps", "20", "--model", "segformer-tiny",
            "--batch-size", "2", "--crop", "64", "--workers", "0", "--no-progress"]
    from attnseg.pipeline.cli import build_parser
    from attnseg.pipeline.cli.train import train_config_from_args

    cfg = train_config_from_args(build_parser().parse_args([*args, "--out", str(tmp_path)]))
    assert cfg.warmup_steps == 2  # not the default 1500
    assert "warming up over 2 steps" in capsys.readouterr().out
    cfg = train_config_from_args(build_parser().parse_args(
        [*args, "--out", str(tmp_path), "--warmup-steps", "50"]))
    assert cfg.warmup_steps == 50 and "lasts the whole run" in capsys.readouterr().out


def test_killed_training_resumes_to_the_same_weights(demo_data, tmp_path):
    args = ["train", "--data", str(demo_data), "--loss", "reliability-weighted", "--steps", "16",
            "--checkpoint-every", "4", *TRAIN]
    # Uninterrupted, in this process (one torch thread, as the subprocesses below).
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    killed = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "attnseg.pipeline.cli", *args, "--out",
                             str(killed)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (killed / "checkpoints/step_00000008.safetensors").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended early"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists()
    resumed = _cli(*args, "--out", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stdout
    a = load_file(str(tmp_path / "a/model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = (tmp_path / "a/log.csv").read_text().splitlines()
    lb = (killed / "log.csv").read_text().splitlines()
    # Same rows up to the timing columns.
    assert [r.split(",")[:4] for r in la] == [r.split(",")[:4] for r in lb]


def _bad_label_dataset(demo_data, tmp_path):
    import shutil

    ds = tmp_path / "bad"
    shutil.copytree(demo_data, ds)
    path = ds / "SegmentationClass" / "00000002.png"
    img = Image.open(path)
    lab = np.asarray(img).copy()
    lab[0, 0] = 9  # classes are 0..3 and 255
    out = Image.fromarray(lab, mode="P")
    out.putpalette(img.getpalette())
    out.save(path)
    return ds


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/no/such/dir"], "data folder /no/such/dir does not exist"),
    (["train", "--data", "{data}", "--model", "segformer-b9"], "unknown model 'segformer-b9'"),
    (["train", "--data", "{data}", "--loss", "focal"], "unknown loss 'focal'"),
    (["train", "--data", "{data}", "--crop", "16"], "below 32 px"),
    (["train", "--data", "{data}", "--set", "loss.gamma=2"], "unknown loss setting"),
    (["train", "--data", "{data}", "--pretrained", "/no/such/folder"],
     "pretrained folder /no/such/folder does not exist"),
    (["train", "--data", "{data}", "--dataset", "cityscapes"], "is not a Cityscapes folder"),
    (["train", "--data", "{data}", "--classes", "cityscapes"], "shares no class names"),
    (["eval", "--checkpoint", "model.pt", "--data", "{data}"], "does not exist"),
    (["eval", "--checkpoint", "{data}/classes.json", "--data", "{data}"],
     "is not a .safetensors file"),
    (["eval", "--data", "{data}"], "give --checkpoint RUN and --data ROOT"),
    (["eval", "--pseudo", "{data}"], "--pseudo and --gt go together"),
    (["eval", "--checkpoint", "{data}", "--data", "{data}"], "has no model.safetensors"),
])
def test_bad_input_is_one_line(demo_data, tmp_path, capsys, args, message):
    args = [a.replace("{data}", str(demo_data)) for a in args]
    out = tmp_path / "run"
    if args[0] == "train":
        args += ["--out", str(out), "--no-progress", "--steps", "1", "--workers", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnseg: error: ") and message in err, err
    assert err.count("\n") == 1
    assert not out.exists()


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    r = _cli("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == f"attnseg: error: data folder {tmp_path / 'missing'} does not exist\n"


def test_bad_label_value_stops_training_naming_the_file(demo_data, tmp_path):
    bad = _bad_label_dataset(demo_data, tmp_path)
    # Through a data-loader worker process: the error still arrives as one line.
    r = _cli("train", "--data", str(bad), "--out", str(tmp_path / "run"), "--steps", "4",
             "--batch-size", "6", "--crop", "64", "--no-progress", "--workers", "1")
    assert r.returncode == 2 and r.stderr.startswith("attnseg: error: label file ")
    assert "00000002.png has value(s) [9]" in r.stderr and r.stderr.count("\n") == 1
    assert main(["eval", "--pseudo", str(bad), "--gt", str(demo_data / "SegmentationClass")]) == 2


def test_eval_on_a_dataset_whose_classes_the_model_lacks(demo_data, tmp_path, capsys):
    from tests.pipeline.train.test_sources import make_voc

    run = tmp_path / "run"
    assert main(["train", "--data", str(demo_data), "--out", str(run), "--steps", "1",
                 *TRAIN]) == 0
    make_voc(tmp_path / "voc")
    assert main(["eval", "--checkpoint", str(run), "--data", str(tmp_path / "voc")]) == 2
    assert "the model has no output for dataset class(es)" in capsys.readouterr().err
    # A model trained with VOC's class list evaluates on VOC; synthetic ids map by name.
    run2 = tmp_path / "run2"
    assert main(["train", "--data", str(demo_data), "--classes", "voc", "--out", str(run2),
                 "--steps", "1", *TRAIN]) == 0
    out = tmp_path / "voc.json"
    assert main(["eval", "--checkpoint", str(run2), "--data", str(tmp_path / "voc"), "--out",
                 str(out), "--no-progress", "--scale", "none"]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 2 and len(report["per_class"]) == 21
    assert all(c["iou"] is None or 0 <= c["iou"] <= 1 for c in report["per_class"])
    assert not math.isnan(report["aAcc"])


def test_help_lists_train_and_eval(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out


def _log_steps(run) -> list[int]:
    return [int(r.split(",")[0]) for r in (run / "log.csv").read_text().splitlines()[1:]]


def _stopped_run(demo_data, run, signum, workers: int = 0) -> tuple[list[str], str, int]:
    """Start a 100,000-step training run with `workers` data loader processes in a process
    group of its own, send `signum` to the group (as a terminal's Ctrl-C, `timeout` or a
    scheduler do) after its third logged step and wait for it to stop: its arguments, its
    stderr and the step its checkpoint holds."""
    args = ["train", "--data", str(demo_data), "--steps", "100000", "--log-every", "1",
            "--checkpoint-every", "1000", *TRAIN, "--workers", str(workers), "--out", str(run)]
    # Python's own handlers, whatever this process was started with: in the background of
    # a shell without job control, this test (and so its subprocess) would inherit an
    # ignored SIGINT, which a foreground run does not have.
    inherited = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                 signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL)}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "attnseg.pipeline.cli", *args], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    finally:
        for number, handler in inherited.items():
            signal.signal(number, handler)
    try:  # a failure here must not leave a 100,000-step run behind on the machine
        deadline = time.time() + 240
        while not ((run / "log.csv").is_file() and len(_log_steps(run)) >= 3):
            assert proc.poll() is None and time.time() < deadline, "training ended early"
            time.sleep(0.05)
        os.killpg(proc.pid, signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signum, err
    ckpts = sorted((run / "checkpoints").glob("step_*.safetensors"))
    assert len(ckpts) == 1, ckpts
    stopped = int(ckpts[0].stem.split("_")[1])
    assert err.splitlines()[-2] == (
        f"attnseg: stopped after step {stopped} of 100000; saved checkpoint {ckpts[0]}")
    assert _log_steps(run) == list(range(1, stopped + 1))
    return args, err, stopped


def test_ctrl_c_saves_a_checkpoint_the_same_command_resumes_from(demo_data, tmp_path):
    """SIGINT mid-run (the checkpoint interval far away) saves the last whole step; the same
    command continues from it: log.csv counts every step once, and the resumed steps are the
    uninterrupted run's (same losses)."""
    run = tmp_path / "run"
    args, err, stopped = _stopped_run(demo_data, run, signal.SIGINT)
    assert err.splitlines()[-1] == "attnseg: interrupted; run the same command again to resume"
    resumed = _cli(*args, "--set", "stop_after=3")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {stopped}" in resumed.stdout
    assert _log_steps(run) == list(range(1, stopped + 4))  # no step twice, none left out
    # The same steps without the interruption (in this process, one torch thread as there).
    whole = tmp_path / "whole"
    assert main([*args[:-1], str(whole), "--set", f"stop_after={stopped + 3}"]) == 0
    rows = (run / "log.csv").read_text().splitlines()
    assert [r.split(",")[:4] for r in rows] == \
        [r.split(",")[:4] for r in (whole / "log.csv").read_text().splitlines()]


def test_kill_saves_a_checkpoint_as_ctrl_c_does(demo_data, tmp_path):
    """SIGTERM to the run's process group (`timeout`, a scheduler's preemption), data loader
    workers included, stops the run as Ctrl-C does, exit 143; the same command resumes."""
    run = tmp_path / "run"
    args, err, stopped = _stopped_run(demo_data, run, signal.SIGTERM, workers=2)
    assert err.splitlines()[-1] == "attnseg: terminated; run the same command again to resume"
    assert "Traceback" not in err
    resumed = _cli(*args, "--set", "stop_after=1")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {stopped}" in resumed.stdout
    assert _log_steps(run) == list(range(1, stopped + 2))


def test_a_long_cpu_run_says_what_it_costs(demo_data, tmp_path, capsys):
    """On the CPU the default recipe can take days: after six steps (the mean of five past
    the first) the run says how long a step and the rest take, and what costs less."""
    assert main(["train", "--data", str(demo_data), "--out", str(tmp_path / "run"), "--steps",
                 "10000000", "--device", "cpu", "--set", "stop_after=7", *TRAIN]) == 0
    out = capsys.readouterr().out
    note = [line for line in out.splitlines() if line.startswith("note: on the CPU a step")]
    assert len(note) == 1 and "2 crops of 64x64" in note[0] and "9999994 steps left" in note[0]
    assert "--crop 32,32 (a quarter of the pixels)" in note[0]
    assert "Ctrl-C (or kill) saves a checkpoint" in note[0]
    # A short run is not told.
    assert main(["train", "--data", str(demo_data), "--out", str(tmp_path / "short"), "--steps",
                 "4", "--device", "cpu", *TRAIN]) == 0
    assert "note: on the CPU" not in capsys.readouterr().out


def _label_png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 6), value, np.uint8)).save(path)


def test_eval_pseudo_refuses_unrelated_folders_and_says_what_it_scored(tmp_path, capsys):
    """Folders that share no sample name are not the same images: one line, exit 2. Ground
    truth beyond the pseudo-masks: scored on the shared names, and stderr says how many."""
    pseudo, gt, other = tmp_path / "pseudo", tmp_path / "gt", tmp_path / "other"
    for name in ("a", "b"):
        _label_png(pseudo / f"{name}.png", 1)
    for name in ("a", "b", "c"):
        _label_png(gt / f"{name}.png", 1)
    for name in ("x", "y"):
        _label_png(other / f"{name}.png", 1)
    assert main(["eval", "--pseudo", str(pseudo), "--gt", str(other), "--num-classes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "share no sample names" in err, err
    assert main(["eval", "--pseudo", str(pseudo), "--gt", str(gt), "--num-classes", "2"]) == 0
    captured = capsys.readouterr()
    assert f"note: scored 2 of the 3 ground-truth samples in {gt}: 1 have no pseudo-mask" \
        in captured.err
    assert "(2 images" in captured.out
    # The same names on both sides: no note.
    (gt / "c.png").unlink()
    assert main(["eval", "--pseudo", str(pseudo), "--gt", str(gt), "--num-classes", "2"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_full_resolution_head_end_to_end(demo_data, tmp_path):
    """--full-res-head: the run's model predicts with the head (its weights are saved, its spec
    says so), loads back to the same logits, and its correction is real: zeroing the head's
    last layer returns the decoder's upsampled logits, which differ."""
    from attnseg.pipeline.train.trainer import load_model

    run = tmp_path / "run"
    assert main(["train", "--data", str(demo_data), "--out", str(run), "--steps", "3",
                 "--full-res-head", *TRAIN]) == 0
    weights = load_file(str(run / "model.safetensors"))
    assert any(k.startswith("full_res.") for k in weights)
    assert json.loads((run / "run.json").read_text())["model_spec"]["full_res_head"] is True
    model = load_model(run)
    x = torch.randn(2, 3, 64, 64)
    logits, _ = model(x)
    assert logits.shape == (2, 4, 64, 64)
    again, _ = load_model(run)(x)
    assert torch.equal(logits, again)
    with torch.no_grad():
        model.full_res.fuse[-1].weight.zero_()
        model.full_res.fuse[-1].bias.zero_()
        plain, _ = model(x)
    assert not torch.allclose(plain, logits, atol=1e-4)
    # The head's parameters learn at the head rate, as the decoder's do.
    assert {n for n in model.head_parameter_names() if n.startswith("full_res.")}
    # A run without the flag keeps the old spec (no key) and no head.
    plain_run = tmp_path / "plain"
    assert main(["train", "--data", str(demo_data), "--out", str(plain_run), "--steps", "1",
                 *TRAIN]) == 0
    assert "full_res_head" not in json.loads((plain_run / "run.json").read_text())["model_spec"]
    assert load_model(plain_run).full_res is None
