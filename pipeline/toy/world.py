"""A world with ground truth: procedural scenes of shapes with exact label maps.

No real diffusion weights or labelled datasets can be downloaded on the machines this project is
built on, so masks are measured in a small world whose truth is known exactly. A scene is 1-3
objects of the `toy` class set (circle, square, triangle, star, ring, cross), each with a
random size, position, rotation and a two-colour texture (stripes, checks, dots or a gradient),
painted in order over a cluttered, textured background, so later objects occlude earlier ones.
The label map is the painted masks themselves (0 background, class ids as in
`data/classes_toy.txt`), so it is exact; the caption names every object.

Two domains: `source` (meadow-like backgrounds, saturated objects at 25-50 % of the image) and
`target` (street-like grey backgrounds with lane markings and kerbs, darker objects at 15-30 %),
the distant domain a LoRA must reach.

Scene i is a function of (seed, i) only (`seeds.sample_seed`), so renders are deterministic,
resumable and shardable like synthesis. The output is the synthetic dataset layout
(`dataset.DatasetWriter`: JPEG, palette label PNG, reliability (255: exact), manifest with the
caption as the sample's prompt, classes.json), which every reader of the project reads; each
image's caption is also written next to it (`NAME.txt`) for `attnseg lora train`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import UserError
from ..files import atomic_write_bytes, hold_output, holding_output
from ..prompts import data_file, fill_template, load_classes
from ..seeds import sample_seed
from ..settings import PositiveInt
from ..synth.writer import DatasetWriter

DOMAINS = ("source", "target")
# Where each domain's objects come from and sit (fractions of the image side).
_DOMAIN_SCALE = {"source": (0.25, 0.5), "target": (0.15, 0.3)}
# What captions call each domain's background.
BACKGROUND_WORDS = {"source": ("a meadow", "a grassy field", "a garden lawn"),
                    "target": ("a city street", "an asphalt road", "a parking lot")}


@dataclass
class ToyRenderConfig:
    """One `attnseg toy render` job."""

    out: str = "out/toy"
    num_images: PositiveInt = 100
    seed: int = 0
    domain: Literal["source", "target"] = "source"
    height: PositiveInt = 64
    width: PositiveInt = 64
    max_objects: PositiveInt = 3

    def validate(self) -> None:
        if self.num_images < 1:
            raise UserError("--num-images must be >= 1")
        if self.domain not in DOMAINS:
            raise UserError(f"--domain must be one of {', '.join(DOMAINS)}, not "
                            f"{self.domain!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < 32 or v % 8:
                raise UserError(f"--{name} {v} must be a multiple of 8, at least 32")
        if not 1 <= self.max_objects <= 3:
            raise UserError("--max-objects must be 1, 2 or 3")


# --------------------------------------------------------------------------------------------
# Shapes: a mask of points (u, v) in the object's own frame, unit circumradius.


def _polygon(points: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of every (u, v) against the closed polygon `points`."""
    inside = np.zeros(u.shape, dtype=bool)
    x0, y0 = points[-1]
    for x1, y1 in points:
        crosses = (y1 > v) != (y0 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (v - y1) * (x0 - x1) / (y0 - y1)
        inside ^= crosses & (u < x_at)
        x0, y0 = x1, y1
    return inside


def _regular(n: int, radius: float = 1.0, phase: float = math.pi / 2) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], 1)


def _star() -> np.ndarray:
    a = math.pi / 2 + math.pi * np.arange(10) / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


_CROSS = np.array([(-0.3, 1), (0.3, 1), (0.3, 0.3), (1, 0.3), (1, -0.3), (0.3, -0.3), (0.3, -1),
                   (-0.3, -1), (-0.3, -0.3), (-1, -0.3), (-1, 0.3), (-0.3, 0.3)]) * 0.95


def shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The mask of shape `name` at points (u, v) of its own frame."""
    rho2 = u * u + v * v
    if name == "circle":
        return rho2 <= 0.85**2
    if name == "ring":
        return (rho2 <= 1.0) & (rho2 >= 0.55**2)
    if name == "square":
        return _polygon(_regular(4, phase=math.pi / 4), u, v)
    if name == "triangle":
        return _polygon(_regular(3), u, v)
    if name == "star":
        return _polygon(_star(), u, v)
    if name == "cross":
        return _polygon(_CROSS, u, v)
    raise ValueError(f"unknown shape {name!r}")


# --------------------------------------------------------------------------------------------
# Textures


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid, bilinearly upsampled."""
    grid = rng.random((cells + 1, cells + 1))
    y = np.linspace(0, cells, h)
    x = np.linspace(0, cells, w)
    y0 = np.minimum(y.astype(int), cells - 1)
    x0 = np.minimum(x.astype(int), cells - 1)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _pattern(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A two-colour pattern in {0, 1} over an object's frame (or a gradient in [0, 1])."""
    kind = rng.integers(4)
    period = rng.uniform(0.35, 0.7)
    if kind == 0:  # stripes at a random angle
        a = rng.uniform(0, math.pi)
        return ((np.cos(a) * u + np.sin(a) * v) / period % 1.0 < 0.5).astype(float)
    if kind == 1:  # checks
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(float)
    if kind == 2:  # dots
        du = (u / period) % 1.0 - 0.5
        dv = (v / period) % 1.0 - 0.5
        return (du * du + dv * dv < 0.09).astype(float)
    return np.clip(0.5 + 0.5 * u, 0.0, 1.0)  # gradient across the object


def _object_colours(rng: np.random.Generator, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """Two distinct colours: saturated in the source domain, darker and duller in the target."""
    def one():
        hue = rng.random()
        if domain == "source":
            sat, val = rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
        else:
            sat, val = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
        return _hsv_to_rgb(hue, sat, val)

    a = one()
    b = one()
    while np.abs(a - b).sum() < 0.6:
        b = one()
    return a, b


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _background(rng: np.random.Generator, h: int, w: int, domain: str) -> np.ndarray:
    """A cluttered background [h, w, 3] in [0, 1]: the domain's palette, low-frequency noise,
    and distractor strokes and blobs in random colours (so no colour threshold isolates the
    objects)."""
    noise = _smooth_noise(rng, h, w, 4)[..., None]
    fine = _smooth_noise(rng, h, w, 16)[..., None]
    if domain == "source":
        base = _hsv_to_rgb(rng.uniform(0.18, 0.36), rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.7))
        other = _hsv_to_rgb(rng.uniform(0.08, 0.2), rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.8))
    else:
        g = rng.uniform(0.25, 0.5)
        base = np.array([g, g, g * rng.uniform(0.95, 1.1)])
        other = np.full(3, rng.uniform(0.15, 0.35))
    img = base * (1 - noise) + other * noise
    img = img * (0.85 + 0.3 * (fine - 0.5))
    yy, xx = np.mgrid[0:h, 0:w]
    if domain == "target":  # lane markings and a kerb
        for _ in range(rng.integers(1, 3)):
            x0 = rng.uniform(0, w)
            slope = rng.uniform(-0.6, 0.6)
            line = np.abs(xx - (x0 + slope * (yy - h / 2))) < max(1.0, w / 64)
            dashed = (yy // max(2, h // 8)) % 2 == 0
            img[line & dashed] = [0.9, 0.9, 0.8] if rng.random() < 0.7 else [0.9, 0.75, 0.2]
        kerb = int(rng.uniform(0.6, 0.9) * h)
        img[kerb:] = img[kerb:] * 0.7 + 0.3 * np.array([0.55, 0.55, 0.5])
    for _ in range(rng.integers(3, 7)):  # clutter: strokes and blobs of any colour
        colour = _hsv_to_rgb(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0))
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        if rng.random() < 0.5:
            a = rng.uniform(0, math.pi)
            d = np.abs(np.cos(a) * (yy - cy) - np.sin(a) * (xx - cx))
            along = np.abs(np.sin(a) * (yy - cy) + np.cos(a) * (xx - cx))
            mask = (d < rng.uniform(0.5, 1.5)) & (along < rng.uniform(0.1, 0.4) * w)
        else:
            r = rng.uniform(0.02, 0.06) * w
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[mask] = colour
    return np.clip(img, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Scenes


@dataclass
class ToyScene:
    """One rendered scene: image uint8 [H, W, 3], exact labels uint8 [H, W], the objects in
    paint order (class name) and the caption naming them."""

    image: np.ndarray
    label: np.ndarray
    objects: list[str]
    caption: str


def render_scene(seed: int, height: int = 64, width: int = 64, domain: str = "source",
                 max_objects: int = 3, class_names: tuple[str, ...] | None = None) -> ToyScene:
    """The scene of `seed` (a pure function of its arguments)."""
    names = class_names or tuple(c.name for c in load_classes("toy"))
    ids = {n: i + 1 for i, n in enumerate(names)}
    rng = np.random.default_rng(seed)
    count = min(max_objects, int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25])))
    classes = [str(c) for c in rng.choice(names, size=count, replace=False)]
    img = _background(rng, height, width, domain)
    label = np.zeros((height, width), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(float) + 0.5
    side = min(height, width)
    lo, hi = _DOMAIN_SCALE[domain]
    painted = []
    for name in classes:
        for _ in range(20):  # place it so that at least half of it stays visible
            r = rng.uniform(lo, hi) * side / 2 * 1.15
            cy = rng.uniform(r * 0.6, height - r * 0.6)
            cx = rng.uniform(r * 0.6, width - r * 0.6)
            a = rng.uniform(0, 2 * math.pi)
            u = (math.cos(a) * (xx - cx) + math.sin(a) * (yy - cy)) / r
            v = (-math.sin(a) * (xx - cx) + math.cos(a) * (yy - cy)) / r
            mask = shape_mask(name, u, v)
            if mask.sum() < 12:
                continue
            # Earlier objects must keep at least half of their area in view.
            if all(((label == ids[p]) & ~mask).sum() >= 0.5 * m.sum() for p, m in painted):
                break
        c1, c2 = _object_colours(rng, domain)
        t = _pattern(rng, u, v)[..., None]
        img = np.where(mask[..., None], c1 * (1 - t) + c2 * t, img)
        label[mask] = ids[name]
        painted.append((name, mask))
    visible = [n for n in classes if (label == ids[n]).any()]
    caption = _caption(rng, visible, domain)
    image = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return ToyScene(image, label, visible, caption)


def _caption(rng: np.random.Generator, objects: list[str], domain: str) -> str:
    """"a circle and a star on a meadow"; every object named by its class word."""
    words = [fill_template("a {}", o) for o in objects]
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return f"{listed} on {rng.choice(BACKGROUND_WORDS[domain])}"


def toy_class_words() -> dict[str, list[str]]:
    """Per toy class: its name, then its lexicon words (synonyms and hyponyms): the class
    words the toy model learnt."""
    from ..adapt.prompt_augment import LEXICON_FILE, load_lexicon

    lexicon = load_lexicon(data_file(LEXICON_FILE))
    return {c.name: [c.name] + lexicon.get(c.name.casefold(), []) for c in load_classes("toy")}


def is_toy_model(model: str) -> bool:
    """Whether `model` is a toy-world model: the shipped `toy`, or a folder that
    `attnseg toy train-model` exported (its card, attnseg_toy_model.json, says so)."""
    return model == "toy" or (Path(model).expanduser() / "attnseg_toy_model.json").is_file()


def check_toy_words(model: str, prompts: dict) -> None:
    """Refuse class words a toy-world model never learnt (it knows the toy shapes' words
    only: `--classes voc` would make minutes of meaningless images), naming them and the words
    it knows. Other models are not checked (their vocabularies are open)."""
    if not is_toy_model(model):
        return
    known = [w for words in toy_class_words().values() for w in words]
    folded = {w.casefold() for w in known}
    unknown = list(dict.fromkeys(w for specs in prompts.values() for spec in specs
                                 for _, w in spec.labels if w.casefold() not in folded))
    if unknown:
        shown = ", ".join(repr(w) for w in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise UserError(f"model {model} does not know the class word(s) {shown}{more}: it "
                        f"learnt the toy world's shapes only ({', '.join(known)}); use "
                        "--classes toy or those words")


@holding_output
def render_dataset(cfg: ToyRenderConfig, progress: bool = True) -> dict:
    """Render (or resume rendering) a dataset of toy scenes into `cfg.out`."""
    cfg.validate()
    classes = load_classes("toy")
    out = Path(cfg.out)
    job = {"model": "toy-render", "model_hash": "exact", "preset": "exact", "mask": {},
           "render": asdict(cfg) | {"out": None}}
    hold_output(out)  # a second process rendering into the folder is refused
    writer = DatasetWriter(out, job, classes)
    todo = [i for i in range(cfg.num_images) if i not in writer.done]
    by_name = {c.name: c for c in classes}
    bar = None
    if progress and todo:
        from ..progress import progress_bar

        bar = progress_bar(total=cfg.num_images, initial=cfg.num_images - len(todo), unit="img",
                           desc="render")
    try:
        for i in todo:
            scene = render_scene(sample_seed(cfg.seed, i), cfg.height, cfg.width, cfg.domain,
                                 cfg.max_objects, tuple(c.name for c in classes))
            name = f"{i:08d}"
            atomic_write_bytes(out / "JPEGImages" / f"{name}.txt", (scene.caption + "\n").encode())
            writer.write(i, name, scene.image, scene.label,
                         np.full(scene.label.shape, 255, dtype=np.uint8), {
                             "prompt": scene.caption,
                             "classes": [{"id": by_name[o].id, "name": o, "word": o}
                                         for o in scene.objects],
                             "seed": cfg.seed, "domain": cfg.domain})
            if bar is not None:
                bar.update(1)
        writer.finish()
    finally:
        if bar is not None:
            bar.close()
    return {"out": str(out), "images": cfg.num_images, "new": len(todo),
            "domain": cfg.domain, "size": [cfg.height, cfg.width]}
