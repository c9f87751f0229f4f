"""The toy benchmark's pseudo-mask experiments against exact labels: trivial baselines, the
labeller and its presets, the dense CRF's cost, localisation (layers and heads chosen on
validation) and which object is which."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.kernels.regions import connected_components
from attnseg.pipeline.config import Preset, get_preset
from attnseg.pipeline.harvest.attention import cross_attention_heads
from attnseg.pipeline.harvest.real_images import (
    RealImageConfig,
    RealImageLabeller,
    image_latents,
    noise_timesteps,
)
from attnseg.pipeline.prompts import fill_template
from attnseg.pipeline.seeds import sample_seed
from attnseg.pipeline.toy.world import ToyRenderConfig, render_dataset
from attnseg.pipeline.train.evaluate import MetricAccumulator
from attnseg.pipeline.train.sources import open_source

from ..quality import score_real_pseudo_masks
from .config import ToyBenchConfig


def _render(work: Path, name: str, seed: int, cfg: ToyBenchConfig, domain: str = "source"):
    folder = work / name
    render_dataset(ToyRenderConfig(out=str(folder), num_images=cfg.num_images, seed=seed,
                                   domain=domain, height=cfg.size, width=cfg.size),
                   progress=False)
    return open_source(folder, "synthetic", "train")


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


def _with_layers(preset, layers: tuple | None, latent_stride: int, heads: dict | None = None):
    """The preset with its maps taken from `layers` (strides, blocks; the model's own strides)
    or only from `heads` (`HarvestConfig.heads`, at whatever level each layer is), checked
    against the model; None: as it is."""
    if heads:
        every_level = tuple(latent_stride << k for k in range(8))
        preset = replace(preset, harvest=replace(preset.harvest, heads=heads,
                                                 strides=every_level, blocks=("down", "mid",
                                                                              "up")))
    if layers is not None:
        strides, blocks = layers
        preset = replace(preset, harvest=replace(preset.harvest, strides=strides, blocks=blocks))
    preset.harvest.validate(latent_stride)
    return preset


def _labeller(pipe, preset: str | Preset, levels, cfg: ToyBenchConfig, seed: int,
              bg: float | None = None, crf: int | None = None,
              layers: tuple | None = None, heads: dict | None = None) -> RealImageLabeller:
    """The real-image labeller of `preset` (a name, or a preset already resolved for this
    model) with the bench's optional threshold, CRF, layer or head setting."""
    real = RealImageConfig(noise_levels=levels, template=cfg.template, size=cfg.size,
                           seed=seed)
    if isinstance(preset, str):
        preset = get_preset(preset, pipe.vae_scale_factor)
    p = _with_layers(preset, layers, pipe.vae_scale_factor, heads)
    if bg is not None:  # a tuned threshold, no ignore band
        p = replace(p, mask=replace(p.mask, bg_const=bg, ignore_low=bg, ignore_high=bg))
    if crf is not None:  # None: the preset's own setting
        p = replace(p, mask=replace(p.mask, crf_iterations=crf))
    return RealImageLabeller(pipe, p, real)


def _pseudo_scores(pipe, preset, levels, cfg, seed, source, classes, bg=None, crf=None,
                   layers=None, heads=None) -> dict:
    with _labeller(pipe, preset, levels, cfg, seed, bg, crf, layers, heads) as labeller:
        return score_real_pseudo_masks(labeller, classes, source)


def _pseudo_miou(*args, **kw) -> float:
    return _pseudo_scores(*args, **kw)["mIoU"]


def _seed_rows(reports: list[dict]) -> dict:
    """mIoU mean and spread over seeds, with the foreground IoU and the class accuracy on the
    foreground (their means): where the mIoU is lost."""
    row = _mean_spread([r["mIoU"] for r in reports])
    for key in ("foreground_iou", "class_accuracy_on_foreground"):
        vals = [r[key] for r in reports if r.get(key) is not None]
        row[key] = float(np.mean(vals)) if vals else None
    return row


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


def two_object_localisation(pipe, cfg: ToyBenchConfig, levels, source, classes,
                            layers: tuple | None = None, heads: dict | None = None,
                            seed: int | None = None) -> dict:
    """Over scenes with exactly two objects: the fraction of (scene, class word) whose map's
    maximum lies on that class's own pixels, and of scenes where both words do; the default
    preset's maps, from its own layers, from `layers` (strides, blocks) or from `heads`; the
    labeller's noise drawn with `seed` (default: `cfg.tune_seed`)."""
    by_id = {c.id: c for c in classes}
    hits = words = both = scenes = 0
    seed = cfg.tune_seed if seed is None else seed
    with _labeller(pipe, "attnseg", levels, cfg, seed, layers=layers,
                   heads=heads) as labeller:
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


@torch.no_grad()
def caption_errors(pipe, latents: torch.Tensor, texts: torch.Tensor, levels, draws: int,
                   generator: torch.Generator) -> torch.Tensor:
    """[K, h, w]: for each of K caption embeddings (`texts`, [K, L, D]), the UNet's squared
    noise-prediction error per latent pixel on `latents` ([1, C, h, w]) noised with the same
    `draws` noise draws at each of `levels` (fractions of the schedule), summed. All K x
    levels x draws calls are one batch."""
    k, n = texts.shape[0], len(levels) * draws
    noise = torch.randn((n, *latents.shape[1:]), generator=generator).to(latents)
    t = noise_timesteps(pipe, levels, latents.device).repeat_interleave(draws)
    noisy = pipe.scheduler.add_noise(latents.expand(n, -1, -1, -1), noise, t)
    pred = pipe.unet(noisy.repeat(k, 1, 1, 1), t.repeat(k),
                     encoder_hidden_states=texts.repeat_interleave(n, 0)).sample
    err = (pred.float() - noise.float().repeat(k, 1, 1, 1)).pow(2).sum(1)
    return err.view(k, n, *err.shape[1:]).sum(1)


def which_object(pipe, cfg: ToyBenchConfig, levels, source, classes) -> dict:
    """Which object is which, over scenes with two or more objects, on their object pixels:
    the fraction whose class is the present class the default preset's maps rank first (its
    attention; labeller at `levels`), beside the fraction whose class is the present class
    whose one-word caption ("a photo of a star") predicts the added noise best there
    (`caption_errors` at `error_probe_levels`, upsampled): what the model knows apart from
    its attention. Chance: one over the number of classes present, pixel-weighted."""
    by_id = {c.id: c for c in classes}
    right = {"attention": 0, "denoising_error": 0}
    chance, pixels, scenes = 0.0, 0, 0
    with _labeller(pipe, "attnseg", levels, cfg, cfg.tune_seed) as labeller:
        for i in range(len(source)):
            s = source.load(i)
            present = [int(c) for c in np.unique(s.label) if c in by_id]
            if len(present) < 2:
                continue
            ids, fg = np.array(present), s.label > 0
            truth = s.label[fg]
            maps = labeller.maps(s.image, [by_id[c] for c in present], i)
            right["attention"] += int((ids[maps.argmax(0)][fg] == truth).sum())
            latents, _ = image_latents(pipe, s.image, cfg.size)
            texts = torch.cat([pipe.encode_prompt(fill_template(cfg.template, by_id[c].word),
                                                  latents.device, 1, False)[0]
                               for c in present]).to(pipe.unet.dtype)
            gen = torch.Generator().manual_seed(sample_seed(cfg.tune_seed, i))
            err = caption_errors(pipe, latents.to(pipe.unet.dtype), texts,
                                 cfg.error_probe_levels, cfg.error_probe_draws, gen)
            err = F.interpolate(err[None], size=s.label.shape, mode="bilinear",
                                align_corners=False)[0].cpu().numpy()
            right["denoising_error"] += int((ids[err.argmin(0)][fg] == truth).sum())
            chance += int(fg.sum()) / len(present)
            pixels += int(fg.sum())
            scenes += 1
    out = {k: v / pixels if pixels else None for k, v in right.items()}
    return out | {"scenes": scenes, "chance": chance / pixels if pixels else None,
                  "levels": list(cfg.error_probe_levels), "draws": cfg.error_probe_draws}


def _layers_label(layers: tuple) -> str:
    strides, blocks = layers
    return f"{'+'.join(blocks)} at stride {','.join(map(str, strides))}"


def localisation_by_layers(pipe, cfg: ToyBenchConfig, levels, val, test, classes) -> dict:
    """The layer choice among `layer_candidates` that localises best on `val`: its
    localisation and pseudo-mask mIoU (default preset, every seed) on `test`."""
    on_val = {_layers_label(c): two_object_localisation(pipe, cfg, levels, val, classes, c)
              ["word_peaks_on_own_object"] or 0.0 for c in cfg.layer_candidates}
    best = max(cfg.layer_candidates, key=lambda c: on_val[_layers_label(c)])
    return {"val_localisation": on_val, "chosen": _layers_label(best),
            "strides": list(best[0]), "blocks": list(best[1]),
            "test": two_object_localisation(pipe, cfg, levels, test, classes, best),
            "test_mIoU": _mean_spread([_pseudo_miou(pipe, "attnseg", levels, cfg, s, test,
                                                    classes, layers=best)
                                       for s in cfg.seeds])}


def _short_layer(name: str) -> str:
    """A UNet attention module's name without its fixed tail: "up_blocks.1.attentions.0"."""
    return name.split(".transformer_blocks.")[0]


def _heads_of(picked: list[tuple[str, int]]) -> dict[str, tuple[int, ...]]:
    """(layer, head) pairs as `HarvestConfig.heads`."""
    heads: dict[str, tuple[int, ...]] = {}
    for name, h in picked:
        heads[name] = (*heads.get(name, ()), h)
    return heads


def localisation_by_heads(pipe, cfg: ToyBenchConfig, levels, val, test, classes) -> dict:
    """Each cross-attention head of the model alone, ranked by localisation on `val`; then
    the best k together for k = 1 .. `head_candidates`, the k that localises best on `val`
    (the fewest on a tie): its localisation and pseudo-mask mIoU (default preset, every
    seed) on `test`, and the `harvest.heads` setting that gives it."""
    def on(source, heads):
        return two_object_localisation(pipe, cfg, levels, source, classes, heads=heads)

    alone = {(name, h): on(val, {name: (h,)})["word_peaks_on_own_object"] or 0.0
             for name, n in cross_attention_heads(pipe.unet).items() for h in range(n)}
    ranked = sorted(alone, key=lambda k: -alone[k])  # stable: the model's order on a tie
    by_k = {k: on(val, _heads_of(ranked[:k]))["word_peaks_on_own_object"] or 0.0
            for k in range(1, min(cfg.head_candidates, len(ranked)) + 1)}
    best = max(by_k, key=lambda k: (by_k[k], -k))
    heads = _heads_of(ranked[:best])
    # The labeller's noise draw moves a peak now and then: the test figure on every seed.
    by_seed = {s: two_object_localisation(pipe, cfg, levels, test, classes, heads=heads,
                                          seed=s) for s in dict.fromkeys((cfg.tune_seed,
                                                                          *cfg.seeds))}
    return {"val_alone": [{"layer": n, "head": h, "localisation": alone[(n, h)]}
                          for n, h in ranked],
            "val_by_count": {str(k): v for k, v in by_k.items()}, "chosen": best,
            "heads": {n: list(h) for n, h in heads.items()},
            "test": by_seed[cfg.tune_seed],
            "test_by_seed": _mean_spread([by_seed[s]["word_peaks_on_own_object"] or 0.0
                                          for s in cfg.seeds]),
            "test_mIoU": _mean_spread([_pseudo_miou(pipe, "attnseg", levels, cfg, s, test,
                                                    classes, heads=heads)
                                       for s in cfg.seeds])}


def _mean_spread(values: list[float]) -> dict:
    a = np.array(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "values": [float(v) for v in a]}
