"""The toy benchmark's report: markdown tables, the JSON and markdown files, the plot."""

from __future__ import annotations

import json
from pathlib import Path

from attnseg.pipeline.adapt.lora_train import LORA_TARGETS
from attnseg.pipeline.config import get_preset

from ..common import pct, with_suffix, write_json_and_markdown
from .pseudo_masks import _short_layer


def _seconds(seconds: float | None) -> str:
    """'51 s of training; ' (nothing for runs trained before the time was kept)."""
    return "" if seconds is None else f"{seconds:.0f} s of training; "


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
        f"{cfg['seeds']} (the labeller's noise). Where it is lost: the foreground IoU (any "
        "object against background) and the class accuracy on pixels that are an object in "
        "both truth and prediction (the right word on the right object), in %.", "",
        "| method | test mIoU | foreground IoU | class accuracy on foreground |",
        "|---|---|---|---|",
        f"| all background | {pct(b['all_background'])} | — | — |",
        f"| colour threshold + image labels (threshold "
        f"{b['colour_threshold_tuned']['threshold']}, tuned on validation) | "
        f"{pct(b['colour_threshold'])} | — | — |",
    ]
    for name, r in report["pseudo_masks"].items():
        lines.append(f"| preset `{name}` | {pct(r['mean'])} ± {pct(r['std'])} | "
                     f"{_split(r)} |")
    t = report["tuned_threshold"]
    lines.append(f"| preset `attnseg`, background threshold {t['bg_const']} (tuned on "
                 f"validation, no ignore band) | {pct(t['test']['mean'])} ± "
                 f"{pct(t['test']['std'])} | — | — |")
    crf = report.get("crf")
    loc = report["localisation"]
    lines += ["", f"Localisation, {loc['scenes']} two-object test scenes: each class word's "
              f"map peaks on its own object in {pct(loc['word_peaks_on_own_object'])} % of "
              f"(scene, word) pairs; both words in {pct(loc['both_words'])} % of scenes.", ""]
    by_layers = report.get("localisation_by_layers")
    if by_layers:
        t = by_layers["test"]
        lines += [f"The preset's maps from one layer choice, the one that localises best on "
                  f"validation ({by_layers['chosen']}; the model's own strides; validation: "
                  + ", ".join(f"{k} {pct(v)}" for k, v in by_layers["val_localisation"].items())
                  + f"): each word's map peaks on its own object in "
                  f"{pct(t['word_peaks_on_own_object'])} % of the test pairs, both words in "
                  f"{pct(t['both_words'])} % of scenes; pseudo-mask mIoU "
                  f"{_ms(by_layers['test_mIoU'])}.", ""]
    by_heads = report.get("localisation_by_heads")
    if by_heads:
        t = by_heads["test"]
        best = by_heads["val_alone"][0]
        per_seed = by_heads.get("test_by_seed")
        lines += [f"The preset's maps from the {by_heads['chosen']} cross-attention head(s) "
                  f"that localise best on validation (each of the model's "
                  f"{len(by_heads['val_alone'])} heads ranked alone, best "
                  f"{_short_layer(best['layer'])} head {best['head']} at "
                  f"{pct(best['localisation'])} %; the best k together, validation: "
                  + ", ".join(f"k={k} {pct(v)}" for k, v in by_heads["val_by_count"].items())
                  + f"): each word's map peaks on its own object in "
                  f"{pct(t['word_peaks_on_own_object'])} % of the test pairs"
                  + (f" (labeller seeds {', '.join(pct(v) for v in per_seed['values'])}: "
                     f"{_ms(per_seed)})" if per_seed else "")
                  + f", both words in {pct(t['both_words'])} % of scenes; pseudo-mask mIoU "
                  f"{_ms(by_heads['test_mIoU'])}. As a setting: `--set 'harvest.heads="
                  f"{json.dumps(by_heads['heads'], separators=(',', ':'))}'`.", ""]
    w = report.get("which_object")
    if w:
        lines += [f"Which object is which, on the object pixels of the {w['scenes']} test scenes "
                  f"with two or more objects (chance {pct(w['chance'])} %): the preset's maps "
                  f"rank the right present class first on {pct(w['attention'])} %; the model's "
                  "noise-prediction error with one-word captions (\"a photo of a star\", levels "
                  f"{w['levels']}, {w['draws']} draws each), lowest for the right class on "
                  f"{pct(w['denoising_error'])} %. The gap between the two is what a "
                  "recipe on the attention could still win; the gap between the second and "
                  "100 % is the model's own.", ""]
    lines += [
              "Labeller tuning (validation mIoU, preset attnseg): " + ", ".join(
                  f"[{k}] {pct(v)}" for k, v in report["labeller"]
                  ["val_mIoU_by_noise_levels"].items()), ""]
    if crf:
        lines += ["Dense CRF (the lattice, pydensecrf's model; iterations as the preset says, "
                  f"else {cfg['crf_iterations']}), same seeds:", "",
                  "| preset | without CRF | with CRF | with CRF: foreground IoU | with CRF: "
                  "class accuracy on foreground |", "|---|---|---|---|---|"]
        for name, r in crf["by_preset"].items():
            lines.append(f"| `{name}` | {pct(r['without']['mean'])} ± "
                         f"{pct(r['without']['std'])} | {pct(r['with']['mean'])} ± "
                         f"{pct(r['with']['std'])} ({r['iterations']} it.) | "
                         f"{_split(r['with'])} |")
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
        protocol = report.get("protocol")
        if protocol:
            tried = ", ".join(f"{r['steps']} steps at lr {r['lr']:g}"
                              f"{_input_words(r.get('size'), cfg)}: {pct(r['mIoU'])}"
                              for r in protocol["val_mIoU"])
            lines += [f"Training protocol chosen on the validation set (the segmenter trained "
                      f"on seed {protocol['seed']}'s synthetic data; val mIoU in %): {tried}.",
                      ""]
        lines += [f"Downstream ({d['train_model']}, {d['train_steps']} steps, lr "
                  f"{d.get('train_lr', 2e-3):g}{_input_words(d.get('train_size'), cfg)}, "
                  f"{d['images']} training images, test mIoU in %):", "",
                  "| trained on | test mIoU |", "|---|---|",
                  f"| the model's images + pseudo-masks (`attnseg synth`) | "
                  f"{pct(d['synthetic']['mean'])} ± {pct(d['synthetic']['std'])} |",
                  f"| rendered scenes, exact labels (upper bound) | "
                  f"{pct(d['exact_labels']['mean'])} ± {pct(d['exact_labels']['std'])} |"]
        if d.get("rendered_pseudo_masks"):
            lines.append("| the same rendered scenes, the model's pseudo-masks (real-image "
                         f"labeller) | {_ms(d['rendered_pseudo_masks'])} |")
        lines += ["", f"Synthetic data reaches {pct(d['fraction_of_upper_bound'])} % of the "
                  "upper bound.", ""]
    lines += _ablation_lines(report)
    return "\n".join(lines)


def _split(r: dict) -> str:
    """The foreground IoU and class-accuracy cells of a pseudo-mask row."""
    return " | ".join(pct(r.get(k)) for k in ("foreground_iou", "class_accuracy_on_foreground"))


def _ms(r: dict) -> str:
    if len(r.get("values", ())) == 1:  # one seed: no spread to show
        return pct(r["mean"])
    return f"{pct(r['mean'])} ± {pct(r['std'])}"


def _num(r: dict) -> str:
    """A mean ± std of raw numbers (not fractions), one decimal."""
    return f"{r['mean']:.1f} ± {r['std']:.1f}"


def _gain(r: dict) -> str:
    g = r["gain"]
    return f"{100 * g['mean']:+.1f} ± {pct(g['std'])}"


def _input_words(size: int | None, cfg: dict) -> str:
    """" at 128x128 input" where the segmenter's inputs were resized, else nothing."""
    return f" at {size}x{size} input" if size and size != cfg["size"] else ""


def _ablation_lines(report: dict) -> list[str]:
    a, d, cfg = report.get("ablations"), report.get("downstream"), report["config"]
    if not a:
        return []
    lines = ["## Ablations (downstream, same images and training as above)", "",
             f"Each row trains {d['train_model']} for {d['train_steps']} steps"
             f"{_input_words(d.get('train_size'), cfg)} on {d['images']} synthetic images; "
             f"test mIoU in %, mean ± std over seeds {cfg['seeds']}; the gain is paired by "
             "seed (same synthetic data where the data is shared) and its ± is the spread of "
             "the per-seed gains.", "",
             "| technique | variant | test mIoU | gain |", "|---|---|---|---|",
             f"| loss | plain CE | {_ms(d['synthetic'])} | — |"]
    for name, r in a["losses"].items():
        lines.append(f"| loss | `{name}` | {_ms(r)} | {_gain(r)} |")
    after = []  # sentences under the table
    prompts = a.get("prompts")
    if prompts:
        lines.append(f"| prompts | plain (`attnseg synth`'s default templates, class word) | "
                     f"{_ms(d['synthetic'])} | — |")
        weights = cfg.get("classes_per_prompt", [1.0])  # reports from before it: [1.0]
        shares = " / ".join(f"{100 * w / sum(weights):.0f} %" for w in weights)
        names = {"templates": "the toy templates, class word only",
                 "augmented": "augmented (`attnseg prompts`: toy templates, synonyms and "
                              "hyponyms)",
                 "several-classes": "augmented, naming several classes (`attnseg prompts "
                                    "--classes-per-prompt`: 1 / 2 / 3 classes in "
                                    f"{shares} of prompts)"}
        for name, r in prompts.items():
            lines.append(f"| prompts | {names[name]} | {_ms(r)} | {_gain(r)} |")
        exact = d["exact_labels"]["mean"]
        if exact:
            fractions = ", ".join(f"{name} {100 * r['mean'] / exact:.1f} %"
                                  for name, r in prompts.items())
            after.append(f"Of the upper bound ({pct(exact)}), the prompt arms reach: "
                          f"{fractions}; the plain prompts "
                          f"{100 * d['synthetic']['mean'] / exact:.1f} %.")
    r = a.get("crf")
    if r:
        variant = (f"dense CRF ({r['iterations']} iterations) on the default preset's masks"
                   if r["iterations"] else "the default preset's masks without its CRF")
        lines.append(f"| mask refinement | {variant} | {_ms(r)} | {_gain(r)} |")
    lines.append("")
    if after:
        lines += [*after, ""]
    t = a.get("lora")
    if t:
        lo = t["lora"]
        lines += [f"Target domain (other backgrounds, palette and scale; {t['test_images']} "
                  f"target test scenes, seed {cfg['test_seed']}): a rank-{lo['rank']} LoRA "
                  f"on {', '.join(lo.get('targets', LORA_TARGETS))} "
                  f"trained by `attnseg lora train` for {lo['steps']} steps on {lo['images']} "
                  f"unlabelled target renders (lr {lo['lr']:g}, noise offset "
                  f"{lo.get('noise_offset', 0.0):g}; {_seconds(lo['seconds'])}probe loss "
                  f"{lo['probe_loss_start']:.4f} -> {lo['probe_loss_end']:.4f}), fused at "
                  f"scale {lo.get('scale', 1.0):g}."
                  + ("" if t.get("prompt_arm", "plain") == "plain" else
                     f" Both synthetic rows: prompts of the `{t['prompt_arm']}` arm."), "",
                  "| trained on | target test mIoU | gain |", "|---|---|---|"]
        tb = t.get("baselines")
        if tb:  # reports written before these rows existed lack them
            lines += [f"| (all background) | {pct(tb['all_background'])} | — |",
                      f"| (colour threshold + image labels, threshold "
                      f"{tb['colour_threshold_tuned']['threshold']} tuned on target "
                      f"validation seed {cfg['val_seed']}) | {pct(tb['colour_threshold'])} | — |",
                      f"| (no training: the labeller's pseudo-masks, no LoRA) | "
                      f"{_ms(t['pseudo_masks_without_lora'])} | — |",
                      f"| (no training: the labeller's pseudo-masks, with the LoRA) | "
                      f"{_ms(t['pseudo_masks_with_lora'])} | "
                      f"{_gain(t['pseudo_masks_with_lora'])} |"]
        lines += [f"| source renders, exact labels | {_ms(t['exact_labels_source'])} | — |",
                  f"| target renders, exact labels (upper bound) | "
                  f"{_ms(t['exact_labels_target'])} | — |",
                  f"| synthetic, no LoRA | {_ms(t['without_lora'])} | — |",
                  f"| synthetic, with the target LoRA | {_ms(t['with_lora'])} | "
                  f"{_gain(t['with_lora'])} |", ""]
        if "colour_distance_with_lora" in t:
            lines += ["Domain gap in colour: the distance (RGB, 0-255) between the mean colour "
                      "of the synthetic images and of the target test renders: "
                      f"{_num(t['colour_distance_without_lora'])} without the LoRA, "
                      f"{_num(t['colour_distance_with_lora'])} with it.", ""]
    rows = report.get("scaling")
    if rows:
        lines += ["Scaling (same training steps at every count; every count on seeds "
                  f"{rows[-1]['seeds']}):", "",
                  "| images | synthetic | exact labels | fraction |", "|---|---|---|---|"]
        for r in rows:
            frac = r["synthetic"]["mean"] / r["exact_labels"]["mean"]
            lines.append(f"| {r['images']} | {_ms(r['synthetic'])} | "
                         f"{_ms(r['exact_labels'])} | {pct(frac)} % |")
        lines.append("")
    return lines


def write_report(report: dict, base: Path) -> list[str]:
    files = write_json_and_markdown(report, base, markdown(report))
    png = with_suffix(base, ".png")
    if plot(report, png):
        files.append(str(png))
    return files


def _downstream_bars(report: dict) -> list[tuple]:
    """(label, mean, std, colour) of every downstream row: source test, then target test."""
    d, a = report["downstream"], report.get("ablations") or {}
    bars = [("synthetic (CE, plain)", d["synthetic"]["mean"], d["synthetic"]["std"], "C0")]
    for name, r in a.get("losses", {}).items():
        bars.append((name, r["mean"], r["std"], "C1"))
    for name, r in (a.get("prompts") or {}).items():
        bars.append((f"prompts: {name}", r["mean"], r["std"], "C2"))
    r = a.get("crf")
    if r:
        bars.append(("CRF-refined masks" if r["iterations"] else "masks without CRF",
                     r["mean"], r["std"], "C4"))
    r = d.get("rendered_pseudo_masks")
    if r:
        bars.append(("renders + pseudo-masks", r["mean"], r["std"], "C5"))
    bars.append(("exact labels", d["exact_labels"]["mean"], d["exact_labels"]["std"], "0.6"))
    t = a.get("lora")
    if t:
        for label, r, colour in (("target: no LoRA", t["without_lora"], "C3"),
                                 ("target: LoRA", t["with_lora"], "C3"),
                                 ("target: exact labels", t["exact_labels_target"], "0.6")):
            bars.append((label, r["mean"], r["std"], colour))
    return bars


def plot(report: dict, path: Path) -> bool:
    """Test mIoU of every row (mean and seed spread) as bars, trivial baselines in grey; the
    downstream rows and ablations; the scaling curve; False (nothing written) without
    matplotlib."""
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
    down = _downstream_bars(report) if d else []
    scale = report.get("scaling") or []
    panels = 1 + bool(down) + bool(len(scale) > 1)
    fig, axes = plt.subplots(1, panels, figsize=(6 + 4 * panels, 4.4), squeeze=False,
                             gridspec_kw={"width_ratios": [3] + [2] * (panels - 1)})
    ax = axes[0][0]
    ax.bar(range(len(rows)), [100 * r[1] for r in rows], yerr=[100 * r[2] for r in rows],
           color=[r[3] for r in rows], capsize=2)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("test mIoU (%)")
    ax.set_title(f"pseudo-masks on rendered test scenes, model {report['model']}", fontsize=9)
    if down:
        ax = axes[0][1]
        ax.bar(range(len(down)), [100 * r[1] for r in down], yerr=[100 * r[2] for r in down],
               color=[r[3] for r in down], capsize=2)
        ax.set_xticks(range(len(down)), [r[0] for r in down], rotation=60, ha="right",
                      fontsize=7)
        ax.set_title(f"downstream {d['train_model']}, {d['images']} images", fontsize=9)
    if len(scale) > 1:
        ax = axes[0][-1]
        n = [r["images"] for r in scale]
        for key, label, colour in (("synthetic", "synthetic", "C0"),
                                   ("exact_labels", "exact labels", "0.5")):
            ax.errorbar(n, [100 * r[key]["mean"] for r in scale],
                        yerr=[100 * r[key]["std"] for r in scale], marker="o", color=colour,
                        label=label, capsize=2)
        ax.set_xscale("log")
        ax.minorticks_off()  # the log axis's minor labels overlap at these few counts
        ax.set_xticks(n, [str(x) for x in n])
        ax.set_xlabel("training images")
        ax.set_title("scaling (source test)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
