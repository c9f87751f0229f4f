"""What a synthesis folder accepts, through the command line: one shard count per folder,
growth of the per-class count (never shrinking), a refused job naming the settings that differ,
and settings that cannot work refused before anything is written (nothing half-written; the
corrected command then completes with every sample once)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from attnseg.pipeline.cli import main

from .test_job import ENV, JOB, _manifest_indices, _stop_once_writing

# One class, so a grown folder and a fresh one plan every sample alike (see SamplePlan).
ONE = ["--model", "tiny", "--classes", "dog,", "--steps", "1", "--height", "64", "--width",
       "64", "--batch-size", "2", "--no-progress"]


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a dataset folder but its locks and job record, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".lock") and p.name != "job.json"}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnseg: error: "), err
    return err[0]


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# --- item: one shard count per folder -----------------------------------------------------


def test_another_shard_count_on_a_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["synth", *JOB, "--shard", "0/2", "--out", str(out)]) == 0
    assert json.loads((out / "job.json").read_text())["shards"] == 2
    before = _listing(out)
    capsys.readouterr()
    for other, says in ((["--shard", "0/1"], "this one runs without --shard"),
                        ([], "this one runs without --shard"),
                        (["--shard", "2/3"], "this one runs --shard 2/3")):
        assert main(["synth", *JOB, *other, "--out", str(out)]) == 2
        line = _one_error_line(capsys)
        assert f"output folder {out} is written with --shard i/2 (2 shards)" in line
        assert says in line
        assert _listing(out) == before  # nothing written
    assert main(["synth", *JOB, "--shard", "1/2", "--out", str(out)]) == 0
    assert sorted(_manifest_indices(out)) == list(range(8))  # 8 samples, 8 lines
    # An unsharded folder records no count (its job.json is what it was before counts were
    # recorded), and refuses a sharded run.
    plain = tmp_path / "plain"
    assert main(["synth", *JOB, "--out", str(plain)]) == 0
    assert "shards" not in json.loads((plain / "job.json").read_text())
    capsys.readouterr()
    assert main(["synth", *JOB, "--shard", "1/2", "--out", str(plain)]) == 2
    assert f"output folder {plain} is written without --shard" in _one_error_line(capsys)
    assert sorted(_manifest_indices(plain)) == list(range(8))


def test_a_folder_sharded_before_counts_were_recorded_still_resumes(tmp_path, capsys):
    """A folder whose job.json predates the recorded count: its manifests' names tell it."""
    out = tmp_path / "ds"
    assert main(["synth", *JOB, "--shard", "0/2", "--out", str(out)]) == 0
    job = json.loads((out / "job.json").read_text())
    del job["shards"]
    (out / "job.json").write_text(json.dumps(job, indent=1, sort_keys=True))
    before = (out / "job.json").read_bytes()
    capsys.readouterr()
    assert main(["synth", *JOB, "--out", str(out)]) == 2
    assert "is written with --shard i/2 (2 shards)" in _one_error_line(capsys)
    assert main(["synth", *JOB, "--shard", "1/2", "--out", str(out)]) == 0
    assert sorted(_manifest_indices(out)) == list(range(8))
    assert (out / "job.json").read_bytes() == before  # left as it was


def test_the_ray_launcher_keeps_a_folders_shard_count(tmp_path, capsys):
    """Refused before Ray starts: --shards must be the folder's count."""
    pytest.importorskip("ray.data", reason="Ray is an optional extra: pip install 'ray[data]'")
    out = tmp_path / "ds"
    assert main(["synth", *JOB, "--shard", "1/2", "--out", str(out)]) == 0
    before = _listing(out)
    capsys.readouterr()
    assert main(["launch", "ray", "--workers", "1", "--shards", "3", "--", *JOB, "--out",
                 str(out)]) == 2
    line = _one_error_line(capsys)
    assert f"output folder {out} is written in 2 shard(s); give --shards 2" in line
    assert _listing(out) == before


def test_two_shard_counts_at_once_are_refused(tmp_path):
    """The first process (--shard 0/2) is stopped while it writes the folder; a run with
    another count is refused in one line, and the first then finishes."""
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "attnseg.pipeline.cli", "synth", *JOB, "--out", str(out)]
    first = subprocess.Popen([*cmd, "--shard", "0/2"], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _stop_once_writing(first, out, ".lock.shard-00000-of-00002")
        second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    err = second.stderr.strip().splitlines()
    assert len(err) == 1 and "is written with --shard i/2" in err[0], err
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert sorted(_manifest_indices(out)) == [0, 1, 4, 5]  # shard 0/2's, once each
    assert not (out / "manifest.jsonl").exists()


def test_a_run_that_checked_before_another_began_the_folder_is_refused(tmp_path, capsys,
                                                                     monkeypatch):
    """Two runs that start at once both find no job before their models load; the one that
    comes second to the folder's lock must see the other's record there and be refused."""
    import attnseg.pipeline.synth.job as job_module

    out = tmp_path / "ds"
    assert main(["synth", *JOB, "--shard", "0/2", "--out", str(out)]) == 0
    before = _listing(out)
    monkeypatch.setattr(job_module, "check_job", lambda *a: None)  # "checked before"
    capsys.readouterr()
    assert main(["synth", *JOB, "--out", str(out)]) == 2
    assert "is written with --shard i/2" in _one_error_line(capsys)
    assert _listing(out) == before


# --- item: a refused job says what differs; growing the count ------------------------------


def test_a_different_job_names_the_settings_that_differ(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["synth", *ONE, "--num-per-class", "1", "--out", str(out)]) == 0
    before = _listing(out)
    capsys.readouterr()
    assert main(["synth", *ONE, "--num-per-class", "1", "--seed", "5", "--steps", "2",
                 "--set", "mask.bg_const=0.3", "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert f"output folder {out} holds a different job" in line
    assert "seed 0 there, 5 here" in line and "steps 1 there, 2 here" in line
    assert "mask.bg_const 0.45 there, 0.3 here" in line
    assert _listing(out) == before


def test_growing_the_count_keeps_the_samples_and_equals_a_fresh_run(tmp_path, capsys):
    """One class: the grown folder is byte for byte the folder a run of the larger count makes
    (sample i's seed is sample_seed(base, i), and one class keeps every index's prompt);
    the samples already there are not rewritten. 3 -> 5 with batches of 2: the short last
    batch of the first run is completed by the growth."""
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    assert main(["synth", *ONE, "--num-per-class", "3", "--out", str(grown)]) == 0
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (grown / "JPEGImages").iterdir()}
    capsys.readouterr()
    assert main(["synth", *ONE, "--num-per-class", "5", "--out", str(grown)]) == 0
    assert "(2 new, 3 already present)" in capsys.readouterr().out
    assert {p: (grown / "JPEGImages" / p).stat().st_ino for p in kept} == \
        {p: ino for p, (ino, _) in kept.items()}
    assert all((grown / "JPEGImages" / p).stat().st_mtime_ns == t for p, (_, t) in kept.items())
    job = json.loads((grown / "job.json").read_text())
    assert job["num_per_class"] == 5 and job["grown_from"] == [3]
    assert main(["synth", *ONE, "--num-per-class", "5", "--out", str(fresh)]) == 0
    assert _files(grown) == _files(fresh)  # images, labels, manifest, split, classes
    assert sorted(_manifest_indices(grown)) == list(range(5))
    # The same command again: nothing to do. Shrinking: refused in one line, nothing changes.
    capsys.readouterr()
    assert main(["synth", *ONE, "--num-per-class", "5", "--out", str(grown)]) == 0
    assert "(0 new, 5 already present)" in capsys.readouterr().out
    before = _listing(grown)
    assert main(["synth", *ONE, "--num-per-class", "4", "--out", str(grown)]) == 2
    line = _one_error_line(capsys)
    assert "holds 5 images per class; --num-per-class 4 would shrink it" in line
    assert _listing(grown) == before


def test_growing_a_folder_of_several_classes(tmp_path, capsys):
    """Several classes: the new samples take the next indices, class by class; the old ones
    stay; the growth is recorded, and grows again."""
    out = tmp_path / "ds"
    args = [*ONE, "--classes", "dog,cat"]
    assert main(["synth", *args, "--num-per-class", "2", "--out", str(out)]) == 0
    before = _files(out)
    assert main(["synth", *args, "--num-per-class", "3", "--out", str(out)]) == 0
    assert main(["synth", *args, "--num-per-class", "4", "--out", str(out)]) == 0
    after = _files(out)
    for name, data in before.items():
        if name.startswith(("JPEGImages/", "SegmentationClass/", "Reliability/")):
            assert after[name] == data, name
    records = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(8))  # every sample once, in order
    assert [r["classes"][0]["name"] for r in records] == \
        ["dog", "dog", "cat", "cat", "dog", "cat", "dog", "cat"]
    job = json.loads((out / "job.json").read_text())
    assert job["num_per_class"] == 4 and job["grown_from"] == [2, 3]
    assert (out / "ImageSets/Segmentation/train.txt").read_text().split() == \
        [f"{i:08d}" for i in range(8)]


def test_a_webdataset_folder_grows_only_from_whole_chunks(tmp_path, capsys):
    out = tmp_path / "wds"
    args = [*ONE, "--format", "webdataset", "--samples-per-tar", "2"]
    assert main(["synth", *args, "--num-per-class", "3", "--out", str(out)]) == 0
    before = _listing(out)
    capsys.readouterr()
    assert main(["synth", *args, "--num-per-class", "4", "--out", str(out)]) == 2
    assert "grows only from whole chunks" in _one_error_line(capsys)
    assert _listing(out) == before


# --- item: what can be checked is checked before anything is written ----------------------


def test_heads_the_strides_leave_out_are_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()  # an existing, empty folder stays empty
    heads = '{"mid_block.attentions.0.transformer_blocks.0.attn2": [1]}'
    bad = ["synth", *ONE, "--num-per-class", "3", "--set", "harvest.strides=[8]", "--out",
           str(out)]
    assert main([*bad, "--set", f"harvest.heads={heads}"]) == 2
    line = _one_error_line(capsys)
    assert "which the harvest strides [8]" in line and "leave out" in line
    assert list(out.iterdir()) == []
    assert main(bad) == 0  # the corrected command: not "a different job"
    assert sorted(_manifest_indices(out)) == list(range(3))


def test_webdataset_without_pyarrow_is_refused_before_the_model_loads(tmp_path, capsys,
                                                                     monkeypatch):
    import attnseg.pipeline.synth.job as job_module
    from attnseg.pipeline.config import SynthConfig
    from attnseg.pipeline.errors import UserError

    out = tmp_path / "wds"
    args = ["synth", *ONE, "--num-per-class", "2", "--format", "webdataset",
            "--samples-per-tar", "2", "--out", str(out)]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` fails

        def no_load(*a, **k):
            raise AssertionError("the model was loaded")

        m.setattr(job_module, "load_pipeline", no_load)
        assert main(args) == 2
        assert "--format webdataset needs pyarrow" in _one_error_line(capsys)
        with pytest.raises(UserError, match="needs pyarrow"):  # the API checks it too
            job_module.run_synth(SynthConfig(model="tiny", classes="dog,", format="webdataset",
                                             samples_per_tar=4, out=str(out)), progress=False)
    assert not out.exists()
    assert main(args) == 0  # with pyarrow
    assert sorted(p.name for p in (out / "webdataset").iterdir()) == ["000000.tar"]


# --- item: the toy model's vocabulary --------------------------------------------------------


@pytest.mark.parametrize("classes, named", [
    ("voc", "'aeroplane', 'bicycle', 'bird', 'boat', 'bottle' and 15 more"),
    ("circle,hexagon", "'hexagon':"),
])
def test_the_toy_model_refuses_words_it_never_learnt(tmp_path, classes, named):
    """Before torch loads, and before anything is written."""
    out = tmp_path / "o"
    code = ("import sys; from attnseg.pipeline.cli import main; "
            f"rc = main(['synth', '--model', 'toy', '--classes', {classes!r}, '--out', "
            f"{str(out)!r}]); print('torch' in sys.modules); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stdout.split() == ["False"], r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnseg: error: model toy does not know the "
                                               "class word(s) "), err
    assert named in err[0] and "circle, disc, disk, dot, square" in err[0]
    assert not out.exists()


def test_the_toy_model_takes_its_own_words(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["synth", "--model", "toy", "--classes", "circle,disc", "--num-per-class", "1",
                 "--steps", "1", "--batch-size", "2", "--no-progress", "--out", str(out)]) == 0
    assert sorted(_manifest_indices(out)) == [0, 1]

