"""Synthesis jobs under faults: a full disk, two writers on one folder, huge jobs, bad
arguments refused before anything heavy loads."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from attnseg.pipeline.cli import main
from attnseg.pipeline.config import SynthConfig
from attnseg.pipeline.files import OutputLock
from attnseg.pipeline.prompts import default_prompts, load_classes
from attnseg.pipeline.synth.job import plan_batches, plan_samples, run_synth

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
JOB = ["--model", "tiny", "--classes", "dog,cat", "--num-per-class", "4", "--steps", "2",
       "--height", "64", "--width", "64", "--batch-size", "2", "--no-progress"]


def _cli(args, file_size_limit=None, timeout=300):
    """`attnseg ARGS` in a subprocess; with `file_size_limit`, no file it writes may grow
    past that many bytes: the kernel fails the write (EFBIG), as a full disk fails it
    (ENOSPC), through the same code path."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "attnseg.pipeline.cli", *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if file_size_limit else None)


def _manifest_indices(out: Path) -> list[int]:
    """The index of every manifest line of every shard (a sample written twice shows twice)."""
    return [json.loads(x)["index"] for m in sorted(out.glob("manifest*.jsonl"))
            for x in m.read_text().splitlines()]


def _debris(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if "tmp-attnseg" in p.name]


def _held(lock: Path) -> bool:
    """Whether another process holds the flock on `lock`."""
    import fcntl

    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _stop_once_writing(proc: subprocess.Popen, out: Path, lock_name: str) -> None:
    """Stop `proc` (SIGSTOP) once it writes `out`: it holds its shard's lock `lock_name` and
    no longer the folder's (`.lock`, held while a run checks and records the folder's job)."""
    deadline = time.monotonic() + 240
    while not (_held(out / lock_name) and not _held(out / ".lock")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.poll()
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)


# 128x128 noise images: a JPEG is ~15 KB, past the 12 KB limit; the model's own start-up
# files (a 10 KB tokenizer vocabulary) stay under it.
BIG = ["--height", "128", "--width", "128"]
LIMIT = 12000


def test_full_disk_is_one_line_leaves_nothing_and_resumes(tmp_path):
    out = tmp_path / "ds"
    r = _cli(["synth", *JOB, *BIG, "--out", str(out)], file_size_limit=LIMIT)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnseg: error: File too large (")
    assert ".jpg" in err[0] and "run the same command again" in err[0]
    assert not _debris(out) and not (out / "JPEGImages" / "00000000.jpg").exists()
    r = _cli(["synth", *JOB, *BIG, "--out", str(out)])  # space again: the job finishes
    assert r.returncode == 0, r.stderr
    assert sorted(_manifest_indices(out)) == list(range(8))  # each sample once
    assert "8 new" in r.stdout and not _debris(out)


def test_full_disk_with_webdataset_output(tmp_path):
    out = tmp_path / "wds"
    args = ["synth", *JOB, *BIG, "--format", "webdataset", "--samples-per-tar", "2", "--out",
            str(out)]
    r = _cli(args, file_size_limit=LIMIT)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnseg: error: File too large (")
    assert ".tar" in err[0] and "Traceback" not in r.stderr
    assert not _debris(out)
    r = _cli(args)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "webdataset").iterdir()) == \
        [f"{i:06d}.tar" for i in range(4)]
    assert not _debris(out)


def test_a_second_writer_of_the_same_folder_and_shard_is_refused(tmp_path, capsys):
    out = tmp_path / "ds"
    held = OutputLock(out, (0, 2))  # another process writing shard 0/2 of this folder
    try:
        assert main(["synth", *JOB, "--shard", "0/2", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another process is writing shard 0/2" in err[0]
        assert not list(out.glob("manifest*")) and not (out / "job.json").exists()
        # A different shard of the same folder runs alongside.
        assert main(["synth", *JOB, "--shard", "1/2", "--out", str(out)]) == 0
    finally:
        held.release()
    assert sorted(_manifest_indices(out)) == [2, 3, 6, 7]
    assert main(["synth", *JOB, "--shard", "0/2", "--out", str(out)]) == 0  # lock gone
    capsys.readouterr()
    assert sorted(_manifest_indices(out)) == list(range(8))


def test_two_processes_started_together_write_each_sample_once(tmp_path):
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "attnseg.pipeline.cli", "synth", *JOB, "--out", str(out)]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for rc, err in results:
        if rc == 2:
            assert "another process is writing" in err and err.count("\n") == 1
    indices = _manifest_indices(out)
    assert sorted(indices) == list(range(8))  # 8 samples, 8 lines


def test_a_second_process_on_a_folder_being_written_is_refused(tmp_path):
    """Deterministic: the first process is stopped (SIGSTOP) while it holds the folder's lock,
    so the second meets the lock and must be refused in one line; the first then finishes."""
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "attnseg.pipeline.cli", "synth", *JOB, "--out", str(out)]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        _stop_once_writing(first, out, ".lock.shard-00000-of-00001")
        second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    err = second.stderr.strip().splitlines()
    assert len(err) == 1 and "another process is writing" in err[0], err
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert sorted(_manifest_indices(out)) == list(range(8))  # every sample once


def test_planning_is_lazy(tmp_path, monkeypatch):
    """A job of billions of samples starts as fast and as small as a job of one."""
    classes = load_classes("voc")
    plan = plan_samples(classes, default_prompts(classes), 10**9, 0)
    assert len(plan) == 20 * 10**9
    last = plan[len(plan) - 1]
    assert last.index == len(plan) - 1 and last.spec.labels[0][0].name == "tvmonitor"
    assert plan[:3] == [plan.sample(i) for i in range(3)]
    assert plan_batches(len(plan), 4, (1, 3)) == range(1, 5 * 10**9, 3)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # the first unit of work is reached: start-up is over

    monkeypatch.setattr("attnseg.pipeline.synth.job._write_unit", stop)
    peaks = {}
    for n in (1, 10**9):
        cfg = SynthConfig(model="tiny", classes="voc", num_per_class=n, steps=1, height=64,
                          width=64, out=str(tmp_path / f"ds{n}"))
        tracemalloc.start()
        with pytest.raises(KeyboardInterrupt):
            run_synth(cfg, progress=False)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # Planning every sample up front took GBs at this size; now the two start-ups match.
    assert peaks[10**9] < peaks[1] + 4 * 2**20, peaks


@pytest.mark.parametrize("args, message", [
    (["--height", "100"], "--height 100 is not a positive multiple of 8"),
    (["--classes", "dog,Dog"], "names a class twice"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--shard", "3/2"], "--shard '3/2'"),
])
def test_bad_arguments_are_refused_before_torch_loads(tmp_path, args, message):
    """Refused within about a second: nothing heavy (torch, diffusers) is imported first."""
    code = ("import sys; from attnseg.pipeline.cli import main; "
            f"rc = main(['synth', '--out', {str(tmp_path / 'o')!r}, *{args!r}]); "
            "print('torch' in sys.modules, 'diffusers' in sys.modules); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stdout.split() == ["False", "False"]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt", ["voc", "webdataset"])
def test_write_pool_writes_the_same_bytes_as_inline(tmp_path, fmt, torch_one_thread):
    """Writing on worker threads (the default) against writing inline: the same files, every
    sample once."""
    extra = ["--format", fmt, "--samples-per-tar", "4"] if fmt == "webdataset" else []
    outs = {}
    for workers in (0, 3):
        out = tmp_path / f"w{workers}"
        assert main(["synth", *JOB, *extra, "--write-workers", str(workers),
                     "--out", str(out)]) == 0
        outs[workers] = {p.relative_to(out).as_posix(): p.read_bytes()
                         for p in sorted(out.rglob("*")) if p.is_file()
                         and not p.name.startswith(".lock")}
    # Every file: images, labels, chunks, and the manifest (sample order), job, classes and
    # split files, byte for byte.
    assert outs[0].keys() == outs[3].keys()
    assert {"job.json", "classes.json"} <= outs[0].keys()
    assert any(k.endswith(".tar") if fmt == "webdataset" else k == "manifest.jsonl"
               for k in outs[0])
    assert [k for k in outs[0] if outs[0][k] != outs[3][k]] == []
    if fmt == "voc":  # the manifest in sample order, as inline
        assert _manifest_indices(tmp_path / "w3") == list(range(8))


def test_write_pool_raises_the_first_failure_after_all_finish():
    from attnseg.pipeline.synth.job import WritePool

    done, recorded = [], []

    def write(i):
        if i == 1:
            raise OSError(28, "No space left on device")
        done.append(i)

    pool = WritePool(workers=2, max_pending=8)  # no submit waits: the error shows at close
    for i in range(4):
        pool.submit(write, i, then=lambda i=i: recorded.append(i))
    with pytest.raises(OSError, match="No space"):
        pool.close()
    # Every job ran; the steps after the failure were not taken (their samples stay unwritten
    # in the manifest, so a resumed run makes them again).
    assert sorted(done) == [0, 2, 3] and recorded == [0] and not pool._pending
    # With a short queue the failure shows at a later submit instead; steps run in order.
    done.clear()
    recorded.clear()
    pool = WritePool(workers=3, max_pending=1)
    with pytest.raises(OSError, match="No space"):
        for i in range(4):
            pool.submit(write, i, then=lambda i=i: recorded.append(i))
    pool.close()
    assert recorded == [0]
    pool = WritePool(workers=3, max_pending=4)
    for i in (0, 2, 3, 4, 5):
        pool.submit(write, i, then=lambda i=i: recorded.append(i))
    pool.close()
    assert recorded == [0, 0, 2, 3, 4, 5]


def test_finished_folder_of_other_weights_is_refused_when_the_model_is_at_hand(tmp_path):
    """A job whose samples are all written returns without loading the model; a caller that
    passes its loaded pipeline (benchmarks) is refused if the folder was made with other
    weights under the same model name (a retrained model), rather than handed old samples."""
    import torch

    from attnseg.pipeline.errors import UserError
    from attnseg.pipeline.models.tiny import build_tiny_pipeline

    cfg = SynthConfig(model="tiny", classes="dog,cat", num_per_class=1, steps=1, height=64,
                      width=64, out=str(tmp_path / "ds"), write_workers=0)
    assert run_synth(cfg, progress=False, pipe=build_tiny_pipeline(seed=0))["new"] == 2
    assert run_synth(cfg, progress=False, pipe=build_tiny_pipeline(seed=0))["new"] == 0
    other = build_tiny_pipeline(seed=0)
    with torch.no_grad():
        next(other.unet.parameters()).add_(1.0)
    with pytest.raises(UserError, match="other weights of model 'tiny'"):
        run_synth(cfg, progress=False, pipe=other)


def test_later_harvest_settings_keep_older_job_files_valid(tmp_path):
    """Harvest settings added after job files were first written are recorded only when set:
    a dataset begun before them resumes (its job.json lacks them), one made with them set
    records them."""
    from dataclasses import replace

    from attnseg.pipeline.config import LATER_SETTINGS, get_preset

    h = get_preset("attnseg").harvest
    assert not set(LATER_SETTINGS) & set(h.job_record())
    changed = replace(h, joint_softmax="joint", transformer_depth=(0.5, 1.0))
    assert changed.job_record()["joint_softmax"] == "joint"
    assert changed.job_record()["transformer_depth"] == (0.5, 1.0)


def test_a_damaged_manifest_line_is_one_line_and_the_rerun_completes(tmp_path, capsys):
    """A garbage line in the middle of the manifest (not a torn last line: something else
    changed the file) is refused naming the file and line; once it is deleted, the same command
    writes that sample again and every sample is listed once."""
    out = tmp_path / "ds"
    assert main(["synth", *JOB, "--out", str(out)]) == 0
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    lines[2] = "garbage that is not JSON\n"
    manifest.write_text("".join(lines))
    capsys.readouterr()
    assert main(["synth", *JOB, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{manifest}, line 3: not a manifest record" in err[0], err
    manifest.write_text("".join(lines[:2] + lines[3:]))  # what the message says to do
    assert main(["synth", *JOB, "--out", str(out)]) == 0
    assert sorted(_manifest_indices(out)) == list(range(8))
    names = (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert names == [f"{i:08d}" for i in range(8)]


@pytest.mark.parametrize("fmt", ["voc", "webdataset"])
def test_crf_on_the_write_pool_writes_the_same_bytes_as_inline(tmp_path, fmt, monkeypatch,
                                                               torch_one_thread):
    """A preset that refines with a dense CRF (attn2mask) runs the CRF on the write pool's
    threads, beside the next batch's generation, and writes the folder it writes inline (the CRF
    on the main thread): byte for byte. (Splitting a batch over threads changes no bit either:
    test_numba_lattice_matches_the_torch_lattice.)"""
    import threading

    from attnseg.pipeline.harvest import masks as masks_module

    where = []
    real = masks_module.crf_refine

    def crf_refine(*args, **kwargs):
        where.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(masks_module, "crf_refine", crf_refine)
    extra = ["--format", fmt, "--samples-per-tar", "4"] if fmt == "webdataset" else []
    outs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        where.clear()
        assert main(["synth", *JOB, *extra, "--preset", "attn2mask", "--write-workers",
                     str(workers), "--out", str(out)]) == 0
        # Inline: every batch's CRF on the main thread; on the pool: all but the first batch's
        # (generated before the folder is made, with its masks).
        assert where[0] and all(where) == (workers == 0) and len(where) == 4
        outs[workers] = {p.relative_to(out).as_posix(): p.read_bytes()
                         for p in sorted(out.rglob("*")) if p.is_file()
                         and not p.name.startswith(".lock")}
    assert outs[0].keys() == outs[2].keys()
    assert [k for k in outs[0] if outs[0][k] != outs[2][k]] == []
    if fmt == "voc":
        assert _manifest_indices(tmp_path / "w2") == list(range(8))
