"""`attnseg bench toy`: the method measured in the toy world, against exact ground truth.

Everything runs on scenes rendered by `attnseg toy render` (exact labels) and on a model
trained on other renders (`--model toy`, the shipped one, by default):

1. **Trivial baselines** on the test set: all background; a colour threshold with the image-level
   labels (pixels far from the image's median colour are foreground; with several classes, each
   foreground component gets one, largest component first). The threshold is tuned on the
   validation set.
2. **Labeller tuning** (validation set only): the noise levels real images are put through the
   UNet at, chosen for the default preset.
3. **Pseudo-masks per preset** on the test set at those noise levels: mIoU, mean and spread
   over `seeds` (each seed draws the labeller's noise); the preset's own mask constants.
4. **Threshold tuned**: the default preset with its background threshold chosen on the
   validation set (no ignore band), as a recipe tuned for this model would be;
5. **Localisation**: in two-object test scenes, how often each class word's map peaks on its
   own object;
6. **Downstream** (`downstream_images` > 0): a segmenter trained only on images the model
   generates with their pseudo-masks (`attnseg synth`, default preset), against the same
   segmenter trained on as many rendered scenes with exact labels (the upper bound), both
   scored on the test set; one synthesis and training seed per entry of `seeds`.

Validation and test sets are rendered from their own seeds (`val_seed`, `test_seed`), apart
from the training scenes of the model (`ToyModelConfig.render_seed`). Results: OUT.json and
OUT.md; rendered sets live in the work folder (OUT.work) and are reused.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from attnseg.kernels.regions import connected_components
from attnseg.pipeline.config import PRESETS, get_preset
from attnseg.pipeline.data import open_source
from attnseg.pipeline.device import resolve_device, resolve_dtype
from attnseg.pipeline.errors import UserError
from attnseg.pipeline.evaluate import MetricAccumulator
from attnseg.pipeline.models import load_pipeline, model_fingerprint
from attnseg.pipeline.prompts import load_classes
from attnseg.pipeline.real_images import RealImageConfig, RealImageLabeller
from attnseg.pipeline.toy_world import ToyRenderConfig, render_dataset

from .quality import _pct, score_real_pseudo_masks
from .throughput import machine_info, output_base, with_suffix, write_json_and_markdown


@dataclass
class ToyBenchConfig:
    """One `attnseg bench toy` run."""

    model: str = "toy"
    presets: tuple[str, ...] = tuple(PRESETS)
    seeds: tuple[int, ...] = (0, 1, 2)
    val_seed: int = 101
    test_seed: int = 102
    num_images: int = 200  # per rendered set (validation, test)
    size: int = 64
    # Candidate noise levels of the labeller, tuned on the validation set.
    noise_candidates: tuple[tuple[float, ...], ...] = (
        (0.1,), (0.2,), (0.3,), (0.5,), (0.1, 0.3), (0.2, 0.4))
    template: str = "a photo of a {}"
    thresholds: tuple[float, ...] = tuple(range(10, 201, 10))  # colour baseline, RGB distance
    bg_candidates: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # default preset, tuned
    # Downstream: images synthesised (and rendered, for the upper bound) per run; 0: skipped.
    downstream_images: int = 240
    train_steps: int = 2000
    train_model: str = "segformer-tiny"
    synth_steps: int = 20
    guidance: float = 4.0
    exact_seed: int = 2000  # render seed of the upper bound's training scenes
    # The CRF table: each preset with and without (this many iterations where the preset has
    # none); 0: skipped.
    crf_iterations: int = 10
    crf_cost_size: int = 512  # the CRF's cost is also timed at this size, 21 labels (0: not)
    device: str = "auto"
    dtype: str = "auto"
    work: str | None = None  # None: <out>.work
    out: str = "attnseg-bench/toy"
    progress: bool = True

    def __post_init__(self):
        self.presets = tuple(self.presets)
        self.seeds = tuple(self.seeds)
        self.noise_candidates = tuple(tuple(c) for c in self.noise_candidates)

    def validate(self) -> None:
        for p in self.presets:
            get_preset(p)
        if not self.seeds:
            raise UserError("seeds must not be empty")
        if self.num_images < 1:
            raise UserError("num_images must be >= 1")
        if self.val_seed == self.test_seed:
            raise UserError("val_seed and test_seed must differ (tune on one, report the other)")
        for c in self.noise_candidates:
            RealImageConfig(noise_levels=c).validate()


def _render(work: Path, name: str, seed: int, cfg: ToyBenchConfig, domain: str = "source"):
    folder = work / name
    render_dataset(ToyRenderConfig(out=str(folder), num_images=cfg.num_images, seed=seed,
                                   domain=domain, height=cfg.size, width=cfg.size),
                   progress=False)
    return open_source(folder, "synthetic", "train")


# --------------------------------------------------------------------------------------------
# Trivial baselines


def colour_threshold_labels(image: np.ndarray, present: list[int], threshold: float) -> np.ndarray:
    """The trivial labeller: foreground = RGB distance from the image's median colour above
    `threshold`; one class: all of it; several: per connected component, largest first,
    class ids in the order given (the image-level labels say which, not where)."""
    img = image.astype(np.float32)
    median = np.median(img.reshape(-1, 3), axis=0)
    fg = np.linalg.norm(img - median, axis=-1) > threshold
    out = np.zeros(image.shape[:2], np.uint8)
    if not present:
        return out
    if len(present) == 1:
        out[fg] = present[0]
        return out
    comp = connected_components(fg)
    ids, counts = np.unique(comp[comp > 0], return_counts=True)
    for k, cid in enumerate(ids[np.argsort(-counts)]):
        out[comp == cid] = present[min(k, len(present) - 1)]
    return out


def _score(source, predict) -> float:
    acc = MetricAccumulator(source.class_names, source.ignore_index, extra_column=True)
    n_src = len(source.class_names)
    for i in range(len(source)):
        s = source.load(i)
        pred = predict(s.image, [int(c) for c in np.unique(s.label) if 0 < c < n_src])
        pred = np.where(pred == 255, n_src, pred).astype(np.int64)  # unsure: wrong
        acc.update(torch.from_numpy(pred), torch.from_numpy(s.label))
    return acc.result()["mIoU"]


def trivial_baselines(val, test, thresholds) -> dict:
    """All-background and the tuned colour threshold, scored on `test`."""
    on_val = {t: _score(val, lambda im, p, t=t: colour_threshold_labels(im, p, t))
              for t in thresholds}
    best = max(on_val, key=on_val.get)
    return {
        "all_background": _score(test, lambda im, p: np.zeros(im.shape[:2], np.uint8)),
        "colour_threshold": _score(test, lambda im, p: colour_threshold_labels(im, p, best)),
        "colour_threshold_tuned": {"threshold": best, "val_mIoU": on_val[best]},
    }


# --------------------------------------------------------------------------------------------
# The model's pseudo-masks


def _labeller(pipe, preset: str, levels, cfg: ToyBenchConfig, seed: int,
              bg: float | None = None, crf: int | None = None) -> RealImageLabeller:
    real = RealImageConfig(noise_levels=levels, template=cfg.template, size=cfg.size,
                           seed=seed)
    p = get_preset(preset, pipe.vae_scale_factor)
    if bg is not None:  # a tuned threshold, no ignore band
        p = replace(p, mask=replace(p.mask, bg_const=bg, ignore_low=bg, ignore_high=bg))
    if crf is not None:  # None: the preset's own setting
        p = replace(p, mask=replace(p.mask, crf_iterations=crf))
    return RealImageLabeller(pipe, p, real)


def _pseudo_miou(pipe, preset, levels, cfg, seed, source, classes, bg=None, crf=None) -> float:
    with _labeller(pipe, preset, levels, cfg, seed, bg, crf) as labeller:
        return score_real_pseudo_masks(labeller, classes, source)["mIoU"]


def crf_cost(size: int, classes: int, iterations: int, repeats: int = 3,
             exact: bool = True) -> dict:
    """Seconds per image of the dense CRF at this size (random image and probabilities): the
    lattice (the CPU default), the exact kernel this machine runs (numba on CPU, Triton on GPU;
    `exact=False` skips it: O(N^2)), and pydensecrf's lattice where it is installed."""
    from attnseg.kernels.crf import dense_crf

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(1, classes, size, size, generator=g).softmax(1)
    image = (torch.rand(1, 3, size, size, generator=g) * 255).round()
    params = dict(iterations=iterations, w_app=4.0, sxy_app=40.0, srgb=13.0, w_smooth=3.0,
                  sxy_smooth=3.0)

    def timed(fn) -> float:
        fn()  # compile / warm up
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats

    device = "cuda" if torch.cuda.is_available() else "cpu"
    p, im = probs.to(device), image.to(device)
    out = {"size": size, "classes": classes, "iterations": iterations,
           "threads": torch.get_num_threads(),
           "lattice_seconds_per_image": timed(lambda: dense_crf(p, im, impl="lattice",
                                                                **params)),
           "exact_impl": "triton" if device == "cuda" else "numba",
           "exact_seconds_per_image": None, "pydensecrf_seconds_per_image": None}
    if exact:
        out["exact_seconds_per_image"] = timed(
            lambda: dense_crf(p, im, impl=out["exact_impl"], **params))
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError:
        return out
    unary = np.ascontiguousarray(-np.log(probs[0].numpy().reshape(classes, -1)))
    rgb = np.ascontiguousarray(image[0].permute(1, 2, 0).numpy().astype(np.uint8))

    def theirs():
        d = densecrf.DenseCRF2D(size, size, classes)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=params["sxy_smooth"], compat=params["w_smooth"])
        d.addPairwiseBilateral(sxy=params["sxy_app"], srgb=params["srgb"], rgbim=rgb,
                               compat=params["w_app"])
        d.inference(iterations)

    out["pydensecrf_seconds_per_image"] = timed(theirs)
    return out


def _train_and_score(cfg: ToyBenchConfig, data: Path, run: Path, seed: int, test) -> float:
    from attnseg.pipeline.evaluate import evaluate_model, inference_for
    from attnseg.pipeline.train import load_model, run_training, train_config_from

    tcfg = train_config_from(dict(
        data=[str(data)], out=str(run), model=cfg.train_model, steps=cfg.train_steps,
        batch_size=8, lr=2e-3, warmup_steps=cfg.train_steps // 10, head_lr_mult=1.0,
        workers=0, checkpoint_every=cfg.train_steps, log_every=cfg.train_steps,
        progress=False, seed=seed, augment={"crop_size": [cfg.size, cfg.size],
                                            "base_scale": None}))
    run_training(tcfg)
    report = evaluate_model(load_model(run), test, inference_for("synthetic"))
    return report["mIoU"]


def downstream(cfg: ToyBenchConfig, pipe, work: Path, test) -> dict:
    """Segmenters trained on the model's synthetic data vs on exact-label renders."""
    from attnseg.pipeline.config import SynthConfig
    from attnseg.pipeline.synth import run_synth

    per_class = max(1, cfg.downstream_images // len(load_classes("toy")))
    # The model's data and the runs trained on it are keyed by its weights: a work folder
    # kept from another model's run must not be resumed as this one's (a finished synth job
    # returns without loading the model, so it would not notice).
    model_key = model_fingerprint(pipe)
    synthetic, exact = [], []
    for seed in cfg.seeds:
        data = work / f"synth-{per_class}x6-seed{seed}-{model_key}"
        run_synth(SynthConfig(model=cfg.model, classes="toy", num_per_class=per_class,
                              out=str(data), batch_size=24, steps=cfg.synth_steps,
                              guidance=cfg.guidance, height=cfg.size, width=cfg.size,
                              seed=seed, device=cfg.device, dtype=cfg.dtype), progress=False,
                  pipe=pipe)
        synthetic.append(_train_and_score(cfg, data, work / f"train-synth-seed{seed}-{model_key}",
                                          seed, test))
        rendered = work / f"exact-{per_class * 6}-seed{cfg.exact_seed + seed}"
        render_dataset(ToyRenderConfig(out=str(rendered), num_images=per_class * 6,
                                       seed=cfg.exact_seed + seed, height=cfg.size,
                                       width=cfg.size), progress=False)
        exact.append(_train_and_score(cfg, rendered, work / f"train-exact-seed{seed}", seed,
                                      test))
    s, e = _mean_spread(synthetic), _mean_spread(exact)
    return {"images": per_class * 6, "train_model": cfg.train_model,
            "train_steps": cfg.train_steps, "synthetic": s, "exact_labels": e,
            "fraction_of_upper_bound": s["mean"] / e["mean"] if e["mean"] else None}


def two_object_localisation(pipe, cfg: ToyBenchConfig, levels, source, classes) -> dict:
    """Over scenes with exactly two objects: the fraction of (scene, class word) whose map's
    maximum lies on that class's own pixels, and of scenes where both words do."""
    by_id = {c.id: c for c in classes}
    hits = words = both = scenes = 0
    with _labeller(pipe, "attnseg", levels, cfg, cfg.seeds[0]) as labeller:
        for i in range(len(source)):
            s = source.load(i)
            present = [int(c) for c in np.unique(s.label) if c in by_id]
            if len(present) != 2:
                continue
            maps = labeller.maps(s.image, [by_id[c] for c in present], i)
            ok = [s.label.flat[int(np.argmax(m))] == c for m, c in zip(maps, present,
                                                                        strict=True)]
            hits += sum(ok)
            words += 2
            both += all(ok)
            scenes += 1
    return {"scenes": scenes, "word_peaks_on_own_object": hits / words if words else None,
            "both_words": both / scenes if scenes else None}


def _mean_spread(values: list[float]) -> dict:
    a = np.array(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "values": [float(v) for v in a]}


def run_toy_bench(cfg: ToyBenchConfig) -> dict:
    """Run the toy-world benchmark; writes OUT.json and OUT.md and returns the report."""
    cfg.validate()
    base = output_base(cfg.out)
    work = Path(cfg.work) if cfg.work else with_suffix(base, ".work")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    classes = load_classes("toy")
    val = _render(work, f"val-{cfg.val_seed}", cfg.val_seed, cfg)
    test = _render(work, f"test-{cfg.test_seed}", cfg.test_seed, cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    pipe = load_pipeline(cfg.model, device, dtype)
    report: dict = {"benchmark": "toy", "config": asdict(cfg), "machine": machine_info(device),
                    "model": cfg.model}
    report["baselines"] = trivial_baselines(val, test, cfg.thresholds)
    tuning = {",".join(map(str, c)): _pseudo_miou(pipe, "attnseg", c, cfg, cfg.seeds[0], val,
                                                  classes)
              for c in cfg.noise_candidates}
    chosen = max(cfg.noise_candidates, key=lambda c: tuning[",".join(map(str, c))])
    report["labeller"] = {"val_mIoU_by_noise_levels": tuning, "chosen": list(chosen),
                          "template": cfg.template}
    report["pseudo_masks"] = {
        p: _mean_spread([_pseudo_miou(pipe, p, chosen, cfg, s, test, classes)
                         for s in cfg.seeds]) for p in cfg.presets}
    on_val = {bg: _pseudo_miou(pipe, "attnseg", chosen, cfg, cfg.seeds[0], val, classes, bg)
              for bg in cfg.bg_candidates}
    best = max(on_val, key=on_val.get)
    report["tuned_threshold"] = {
        "preset": "attnseg", "bg_const": best, "val_mIoU_by_bg": on_val,
        "test": _mean_spread([_pseudo_miou(pipe, "attnseg", chosen, cfg, s, test, classes, best)
                              for s in cfg.seeds])}
    if cfg.crf_iterations:
        # Each preset with and without the CRF (the one the published run lacks is run here).
        by_preset = {}
        for p in cfg.presets:
            has = get_preset(p).mask.crf_iterations > 0
            other = _mean_spread([_pseudo_miou(pipe, p, chosen, cfg, s, test, classes,
                                               crf=0 if has else cfg.crf_iterations)
                                  for s in cfg.seeds])
            published = report["pseudo_masks"][p]
            by_preset[p] = {"without": other if has else published,
                            "with": published if has else other,
                            "iterations": get_preset(p).mask.crf_iterations if has
                            else cfg.crf_iterations}
        cost = [crf_cost(cfg.size, 4, cfg.crf_iterations)]
        if cfg.crf_cost_size:
            cost.append(crf_cost(cfg.crf_cost_size, 21, cfg.crf_iterations, repeats=1,
                                 exact=False))
        report["crf"] = {"by_preset": by_preset, "cost": cost}
    report["localisation"] = two_object_localisation(pipe, cfg, chosen, test, classes)
    report["downstream"] = downstream(cfg, pipe, work, test) if cfg.downstream_images else None
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["files"] = write_report(report, base)
    return report


def markdown(report: dict) -> str:
    """The report as markdown tables."""
    cfg = report["config"]
    b = report["baselines"]
    lines = [
        f"# Toy-world benchmark: model `{report['model']}`", "",
        f"Rendered validation seed {cfg['val_seed']} and test seed {cfg['test_seed']}, "
        f"{cfg['num_images']} source-domain scenes each at {cfg['size']}x{cfg['size']}, exact "
        "labels. Pseudo-masks: the real-image labeller (image-level labels; latents noised to "
        f"{report['labeller']['chosen']} of the schedule, chosen on validation); unsure pixels "
        "count as wrong. mIoU in %, mean ± std over seeds "
        f"{cfg['seeds']} (the labeller's noise).", "",
        "| method | test mIoU |", "|---|---|",
        f"| all background | {_pct(b['all_background'])} |",
        f"| colour threshold + image labels (threshold "
        f"{b['colour_threshold_tuned']['threshold']}, tuned on validation) | "
        f"{_pct(b['colour_threshold'])} |",
    ]
    for name, r in report["pseudo_masks"].items():
        lines.append(f"| preset `{name}` | {_pct(r['mean'])} ± {_pct(r['std'])} |")
    t = report["tuned_threshold"]
    lines.append(f"| preset `attnseg`, background threshold {t['bg_const']} (tuned on "
                 f"validation, no ignore band) | {_pct(t['test']['mean'])} ± "
                 f"{_pct(t['test']['std'])} |")
    crf = report.get("crf")
    loc = report["localisation"]
    lines += ["", f"Localisation, {loc['scenes']} two-object test scenes: each class word's "
              f"map peaks on its own object in {_pct(loc['word_peaks_on_own_object'])} % of "
              f"(scene, word) pairs; both words in {_pct(loc['both_words'])} % of scenes.", "",
              "Labeller tuning (validation mIoU, preset attnseg): " + ", ".join(
                  f"[{k}] {_pct(v)}" for k, v in report["labeller"]
                  ["val_mIoU_by_noise_levels"].items()), ""]
    if crf:
        lines += ["Dense CRF (the lattice, pydensecrf's model; iterations as the preset says, "
                  f"else {cfg['crf_iterations']}), same seeds:", "",
                  "| preset | without CRF | with CRF |", "|---|---|---|"]
        for name, r in crf["by_preset"].items():
            lines.append(f"| `{name}` | {_pct(r['without']['mean'])} ± "
                         f"{_pct(r['without']['std'])} | {_pct(r['with']['mean'])} ± "
                         f"{_pct(r['with']['std'])} ({r['iterations']} it.) |")
        lines += ["", "CRF cost per image (random image; one run, this machine):", "",
                  "| size, labels, iterations | lattice (attnseg) | exact (attnseg) | "
                  "pydensecrf |", "|---|---|---|---|"]
        for c in crf["cost"]:
            def ms(v):
                return "—" if v is None else f"{1000 * v:.0f} ms"
            lines.append(f"| {c['size']}x{c['size']}, {c['classes']}, {c['iterations']} | "
                         f"{ms(c['lattice_seconds_per_image'])} | "
                         f"{ms(c['exact_seconds_per_image'])} ({c['exact_impl']}) | "
                         f"{ms(c['pydensecrf_seconds_per_image'])} |")
        lines.append("")
    d = report.get("downstream")
    if d:
        lines += [f"Downstream ({d['train_model']}, {d['train_steps']} steps, {d['images']} "
                  "training images, test mIoU in %):", "",
                  "| trained on | test mIoU |", "|---|---|",
                  f"| the model's images + pseudo-masks (`attnseg synth`) | "
                  f"{_pct(d['synthetic']['mean'])} ± {_pct(d['synthetic']['std'])} |",
                  f"| rendered scenes, exact labels (upper bound) | "
                  f"{_pct(d['exact_labels']['mean'])} ± {_pct(d['exact_labels']['std'])} |",
                  "", f"Synthetic data reaches {_pct(d['fraction_of_upper_bound'])} % of the "
                  "upper bound.", ""]
    return "\n".join(lines)


def write_report(report: dict, base: Path) -> list[str]:
    files = write_json_and_markdown(report, base, markdown(report))
    png = with_suffix(base, ".png")
    if plot(report, png):
        files.append(str(png))
    return files


def plot(report: dict, path: Path) -> bool:
    """Test mIoU of every row (mean and seed spread) as bars, trivial baselines in grey, and
    the downstream pair; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    b = report["baselines"]
    rows = [("all background", b["all_background"], 0.0, "0.6"),
            ("colour threshold", b["colour_threshold"], 0.0, "0.6")]
    for name, r in report["pseudo_masks"].items():
        rows.append((name, r["mean"], r["std"], "C0"))
    t = report["tuned_threshold"]
    rows.append((f"attnseg bg {t['bg_const']}", t["test"]["mean"], t["test"]["std"], "C1"))
    for name, r in (report.get("crf") or {}).get("by_preset", {}).items():
        # The variant the published preset is not (its own row is above).
        if get_preset(name).mask.crf_iterations:
            rows.append((f"{name}, no CRF", r["without"]["mean"], r["without"]["std"], "C2"))
        else:
            rows.append((f"{name} + CRF", r["with"]["mean"], r["with"]["std"], "C2"))
    d = report.get("downstream")
    fig, axes = plt.subplots(1, 2 if d else 1, figsize=(12 if d else 9, 4.2),
                             gridspec_kw={"width_ratios": [4, 1]} if d else None)
    ax = axes[0] if d else axes
    ax.bar(range(len(rows)), [100 * r[1] for r in rows], yerr=[100 * r[2] for r in rows],
           color=[r[3] for r in rows], capsize=2)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("test mIoU (%)")
    ax.set_title(f"pseudo-masks on rendered test scenes, model {report['model']}", fontsize=9)
    if d:
        pair = [d["synthetic"], d["exact_labels"]]
        axes[1].bar([0, 1], [100 * r["mean"] for r in pair],
                    yerr=[100 * r["std"] for r in pair], color=["C0", "0.6"], capsize=2)
        axes[1].set_xticks([0, 1], ["synthetic", "exact labels"], fontsize=7)
        axes[1].set_title(f"downstream {d['train_model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

