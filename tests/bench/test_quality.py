"""`attnseg bench quality`: real-image pseudo-masks, their scoring, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from attnseg.bench.quality import class_set_names, foreground_split, score_real_pseudo_masks
from attnseg.pipeline.config import get_preset
from attnseg.pipeline.harvest.real_images import (
    RealImageConfig,
    RealImageLabeller,
    model_input_size,
)
from attnseg.pipeline.prompts import load_classes
from attnseg.pipeline.train.sources import normalize_name, open_source
from tests.pipeline.train.test_sources import make_voc

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# make_voc draws VOC ids 0, 5, 12, 20 (background, bottle, dog, tvmonitor) and 255.
CLASS_FILE = "bottle\ndog\ntvmonitor\n"


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled") / "voc"
    make_voc(root, names=("a", "b", "c"), size=(24, 40))
    return root


def test_model_input_size_keeps_the_aspect_in_multiples_of_8():
    assert model_input_size(375, 500, 512) == (384, 512)
    assert model_input_size(500, 333, 128) == (128, 88)


@pytest.mark.parametrize("preset", ["attnseg", "dataset-diffusion", "daam"])
def test_real_image_masks_name_only_the_prompted_classes(tiny_pipe, preset):
    classes = load_classes("voc")
    present = [classes[4], classes[11]]  # bottle, dog
    before = dict(tiny_pipe.unet.attn_processors)
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    with RealImageLabeller(tiny_pipe, get_preset(preset), RealImageConfig(size=64)) as lab:
        labels, rel = lab.label(image, present, index=3)
        lab.label(image, present, index=4)  # another image in between changes nothing
        again, rel_again = lab.label(image, present, index=3)
        empty, _ = lab.label(image, [], index=5)
    assert labels.shape == rel.shape == (50, 70) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 5, 12, 255}
    assert set(np.unique(labels)) & {5, 12}, "no prompted class was labelled anywhere"
    np.testing.assert_array_equal(labels, again)
    np.testing.assert_array_equal(rel, rel_again)
    assert (empty == 0).all()
    assert dict(tiny_pipe.unet.attn_processors).keys() == before.keys()
    assert all(type(p) is type(before[k]) for k, p in tiny_pipe.unet.attn_processors.items())


class _OracleLabeller:
    """Answers with the ground truth itself (in class-set ids), or with nothing at all."""

    def __init__(self, source, classes, unsure=False):
        self.source, self.unsure = source, unsure
        self.by_name = {normalize_name(c.name): c.id for c in classes}
        self.cfg = RealImageConfig()
        self.seen = []

    def label(self, image, present, index):
        self.seen.append(sorted(c.name for c in present))
        gt = self.source.load(index).label
        out = np.full(gt.shape, 255, np.uint8)
        if not self.unsure:
            for sid, name in enumerate(self.source.class_names):
                out[gt == sid] = self.by_name.get(normalize_name(name), 0)
        return out, np.zeros_like(out)


def test_foreground_split_says_where_the_miou_is_lost():
    import torch

    # Truth rows (background, cat, dog); prediction columns and a "no prediction" column.
    hist = torch.tensor([[50, 5, 5, 0],
                         [4, 20, 10, 6],
                         [0, 0, 10, 0]])
    split = foreground_split(hist, ["background", "cat", "dog"])
    # Object in both: 20 + 10 + 0 + 10 = 40; truth objects 50, predicted objects 50.
    assert split["foreground_iou"] == pytest.approx(40 / (50 + 50 - 40))
    assert split["class_accuracy_on_foreground"] == pytest.approx(30 / 40)
    assert foreground_split(hist, ["cat", "dog", "bird"]) == {
        "foreground_iou": None, "class_accuracy_on_foreground": None}


def test_scoring_maps_class_set_ids_to_the_labelled_sets(voc):
    voc_classes = load_classes("voc")
    # A subset of VOC's classes in another order: tvmonitor, dog, bottle, aeroplane.
    classes = [voc_classes[i] for i in (19, 11, 4, 0)]
    source = open_source(voc, "voc", "val")
    names = {c.name for c in classes}
    perfect = _OracleLabeller(source, classes)
    report = score_real_pseudo_masks(perfect, classes, source)
    # The prompts named exactly the ground truth's classes the class set has.
    for i, seen in enumerate(perfect.seen):
        gt_names = {source.class_names[s] for s in np.unique(source.load(i).label) if s != 255}
        assert seen == sorted(gt_names & names)
    scored = [c for c in report["per_class"] if c["iou"] is not None]
    assert {c["name"] for c in scored} == {"background", "bottle", "dog", "tvmonitor"}
    assert report["mIoU"] == pytest.approx(1.0) and report["unlabelled_frac"] == 0.0
    assert report["classes_not_in_class_set"] == {}
    # A class the set lacks is never predicted and is reported.
    no_dog = [c for c in classes if c.name != "dog"]
    lacking = score_real_pseudo_masks(_OracleLabeller(source, no_dog), no_dog, source)
    assert lacking["classes_not_in_class_set"] == {"dog": 3}
    dog = next(c for c in lacking["per_class"] if c["name"] == "dog")
    assert dog["iou"] == 0.0 and lacking["mIoU"] < 1.0
    unsure = score_real_pseudo_masks(_OracleLabeller(source, classes, unsure=True), classes,
                                     source)
    assert unsure["unlabelled_frac"] == 1.0 and unsure["mIoU"] == 0.0
    assert class_set_names(classes)[0] == "background"


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "attnseg.pipeline.cli", "bench", "quality",
                           *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_quality_cli_end_to_end_and_resume(voc, tmp_path):
    (tmp_path / "classes.txt").write_text(CLASS_FILE)
    common = ["--classes", str(tmp_path / "classes.txt"), "--num-per-class", "1", "--steps", "3",
              "--height", "64", "--width", "64", "--labelled", str(voc), "--noise-levels",
              "0.1,0.3", "--train-steps", "4", "--train-model", "segformer-tiny", "--set",
              "train.batch_size=2", "--set", "train.augment.crop_size=[32,32]", "--set",
              "train.workers=0", "--no-progress", "--out", str(tmp_path / "q")]
    run = _cli(*common, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["synthesis"]["samples"] == 3 and report["synthesis"]["images_per_s"] > 0
    variants = {r["variant"] for r in report["throughput"]["summary"]}
    assert variants == {"stock", "harvest", "store_every_map"}
    real = report["pseudo_masks_real"]
    assert real["images"] == 3 and 0.0 <= real["mIoU"] <= 1.0
    assert real["classes_not_in_class_set"] == {}
    down = report["downstream"]
    assert down["train"]["steps"] == 4 and down["eval"]["images"] == 3
    assert 0.0 <= down["eval"]["mIoU"] <= 1.0
    md = (tmp_path / "q.md").read_text()
    assert "pseudo-mask mIoU, real labelled set" in md and "downstream mIoU" in md
    assert "random weights" in run.stdout

    # Rerun: the dataset and the training run are reused; the generated images' own labels,
    # given as ground truth, score 1.0.
    dataset = tmp_path / "q.work" / "dataset"
    again = _cli(*common, "--no-throughput", "--pseudo-gt", str(dataset), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    report2 = json.loads((tmp_path / "q.json").read_text())
    assert report2["synthesis"]["resumed"] is True
    assert report2["synthesis"]["images_per_s"] == report["synthesis"]["images_per_s"]
    assert report2["downstream"]["train"]["new_steps"] == 0
    assert report2["downstream"]["eval"]["mIoU"] == down["eval"]["mIoU"]
    assert report2["pseudo_masks_real"]["mIoU"] == real["mIoU"]
    assert report2["pseudo_masks_generated"]["mIoU"] == pytest.approx(1.0)
    assert report2["throughput"] is None


@pytest.mark.parametrize("args, message", [
    (["--labelled", "nowhere"], "labelled set nowhere does not exist"),
    (["--noise-levels", "0.2,1.5"], "'noise_levels' expects a list of finite numbers in [0, 1]"),
    (["--set", "nonsense"], "is not of the form SECTION.KEY=VALUE"),
    (["--set", "other.x=1"], "unknown bench quality section(s) ['other'] (known: real, train)"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    run = _cli(*args, "--out", str(tmp_path / "q"), cwd=tmp_path)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "q.json").exists()


def test_a_foreign_json_is_refused_as_throughput(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"benchmark": "something else"}))
    run = _cli("--throughput", str(tmp_path / "x.json"), "--num-per-class", "1", "--steps", "1",
               "--height", "64", "--classes", "dog", "--train-steps", "0", "--out",
               str(tmp_path / "q"), cwd=tmp_path)
    assert run.returncode == 2 and "is not an `attnseg bench throughput` result" in run.stderr
