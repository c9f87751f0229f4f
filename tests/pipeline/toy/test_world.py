"""The toy world: deterministic scenes, exact label maps, two domains, the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from attnseg.pipeline.cli import main
from attnseg.pipeline.prompts import load_classes
from attnseg.pipeline.seeds import sample_seed
from attnseg.pipeline.toy.world import render_scene, shape_mask
from attnseg.pipeline.train.sources import open_source

NAMES = [c.name for c in load_classes("toy")]


def test_toy_class_set_and_shapes():
    assert NAMES == ["circle", "square", "triangle", "star", "ring", "cross"]
    v, u = np.mgrid[-1:1:64j, -1:1:64j]
    areas = {n: shape_mask(n, u, v).mean() for n in NAMES}
    assert len({round(a, 3) for a in areas.values()}) == 6  # six distinct shapes
    assert not shape_mask("ring", np.zeros(1), np.zeros(1))[0]  # a ring has a hole
    assert shape_mask("circle", np.zeros(1), np.zeros(1))[0]


def test_scenes_are_deterministic_and_labels_exact():
    for seed in range(30):
        a, b = render_scene(seed), render_scene(seed)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
        assert a.caption == b.caption and 1 <= len(a.objects) <= 3
        ids = {NAMES.index(o) + 1 for o in a.objects}
        present = set(np.unique(a.label).tolist()) - {0}
        assert present == ids  # every named object is visible, nothing else is labelled
        for o in a.objects:
            assert f" {o}" in f" {a.caption}"
        assert (a.label == 0).mean() > 0.2  # there is background
    assert not np.array_equal(render_scene(1).image, render_scene(2).image)


def test_objects_are_textured_not_flat():
    """Objects carry two colours and backgrounds clutter: no single colour isolates a class."""
    spreads = []
    for seed in range(20):
        s = render_scene(seed)
        for k in set(np.unique(s.label).tolist()) - {0}:
            pixels = s.image[s.label == k].astype(float)
            spreads.append(pixels.std(0).max())
    assert np.median(spreads) > 20  # 0 for a flat colour


def test_the_target_domain_is_distant():
    def stats(domain):
        area, sat = [], []
        for seed in range(40):
            s = render_scene(seed, domain=domain)
            area.append((s.label > 0).mean() / len(s.objects))
            bg = s.image[s.label == 0].astype(float) / 255
            sat.append((bg.max(1) - bg.min(1)).mean())
        return np.mean(area), np.mean(sat)

    (area_s, sat_s), (area_t, sat_t) = stats("source"), stats("target")
    assert area_t < 0.6 * area_s  # smaller objects
    assert sat_t < sat_s  # grey streets against meadows
    caption = render_scene(3, domain="target").caption
    assert any(w in caption for w in ("street", "road", "parking"))


def test_render_cli_writes_a_dataset_the_readers_read(tmp_path, capsys):
    out = tmp_path / "toy"
    args = ["toy", "render", "--out", str(out), "--num-images", "12", "--seed", "3",
            "--no-progress"]
    assert main(args) == 0
    assert "12 new" in capsys.readouterr().out
    source = open_source(out)  # detected as an attnseg synthetic dataset
    assert source.class_names == ["background", *NAMES] and len(source) == 12
    sample = source.load(0)
    scene = render_scene(sample_seed(3, 0))  # scene i of seed s is render_scene(seed(s, i))
    assert np.array_equal(sample.label, scene.label)  # the label map is the scene's, exactly
    assert (sample.reliability == 1.0).all()
    assert (out / "JPEGImages" / "00000000.txt").read_text().strip() == scene.caption
    # Rerun: nothing to do; other settings into the same folder are refused.
    assert main(args) == 0 and "0 new" in capsys.readouterr().out
    assert main([*args[:-1], "--domain", "target", "--no-progress"]) == 2
    assert "holds a different job" in capsys.readouterr().err
    # Scored against themselves, the exact labels are perfect.
    assert main(["eval", "--pseudo", str(out), "--gt", str(out / "SegmentationClass"),
                 "--out", str(tmp_path / "e.json")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "e.json").read_text())["mIoU"] == pytest.approx(1.0)


def test_bad_render_arguments_are_one_line(tmp_path, capsys):
    for bad, message in ((["--domain", "moon"],
                          "'domain' expects one of 'source', 'target', got the string 'moon'"),
                         (["--height", "60"], "--height 60 must be a multiple of 8"),
                         (["--num-images", "0"], "'num_images' expects an integer >= 1, got 0")):
        assert main(["toy", "render", "--out", str(tmp_path / "t"), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "t").exists()


def test_images_are_rgb_jpegs_of_the_asked_size(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["toy", "render", "--out", str(out), "--num-images", "2", "--height", "48",
                 "--width", "80", "--no-progress"]) == 0
    with Image.open(out / "JPEGImages" / "00000001.jpg") as im:
        assert im.mode == "RGB" and im.size == (80, 48)
