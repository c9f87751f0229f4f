"""`attnseg synth`, `attnseg demo`, `attnseg launch` and `attnseg presets`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .. import cli_args
from ..errors import UserError
from . import prompts as prompts_cli


def _add_synth_args(p: argparse.ArgumentParser) -> None:
    cli_args.add_config(p, "synth")
    cli_args.add_model(p)
    cli_args.add_classes(p)
    p.add_argument("--num-per-class", type=int, help="images per class; a larger count on an "
                   "existing --out grows it (default: 1)")
    p.add_argument("--out", help="output folder (default: out/synth)")
    p.add_argument("--preset", help="harvesting recipe, see `attnseg presets` (default: attnseg)")
    p.add_argument("--prompts", help="prompts JSONL file (prompt + labelled class words; default: "
                   "template prompts per class)")
    p.add_argument("--batch-size", type=int, help="images per generation call (default: 4)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the preset's, else 20)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale "
                   "(default: the preset's, else 7.5; <= 1: no guidance, the batch is not "
                   "doubled)")
    cli_args.add_scheduler(p)
    cli_args.add_size(p)
    p.add_argument("--seed", type=int, help="base seed; sample i's seed depends on (seed, i) "
                   "(default: 0)")
    cli_args.add_device(p)
    cli_args.add_dtype(p)
    p.add_argument("--format", help="voc (default: files + manifest) or webdataset "
                   "(tar chunks + parquet, for millions of samples)")
    p.add_argument("--samples-per-tar", type=int, help="WebDataset chunk size, a multiple of "
                   "--batch-size (default: 1000)")
    p.add_argument("--shard", help="do part i/n of the job (0-based), or 'auto' for the "
                   "launcher's rank (torchrun/accelerate RANK/WORLD_SIZE, Slurm array; default: "
                   "the whole job)")
    cli_args.add_set(p, "harvest.strides=[16,32] --set mask.bg_const=0.4",
                     sections="harvest, mask (the preset's settings)", sections_only=True)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="fuse a LoRA (folder or .safetensors file) into the model before "
                   "generating; repeat for several, each with its own scale (default: none)")
    p.add_argument("--lora-scale", type=float,
                   help="scale of the LoRAs given without one (default: 1.0)")
    cli_args.add_backend(p, extra="engines are built once and cached (see `attnseg engine "
                         "build`)")
    p.add_argument("--engine", help="a folder from `attnseg engine build` to generate with "
                   "(default: none)")
    p.add_argument("--write-workers", type=int, help="threads that encode and write samples "
                   "while the next batch generates; 0 writes inline (default: 2)")
    cli_args.add_allow_pickle(p)
    cli_args.add_no_progress(p)


def _synth_config(args):
    from ..config import synth_config_from
    from ..settings import apply_set, config_values

    values = config_values(args, (
        "model", "classes", "num_per_class", "out", "preset", "prompts", "batch_size", "steps",
        "guidance", "scheduler", "height", "width", "seed", "device", "dtype", "shard", "format",
        "samples_per_tar", "lora_scale", "backend", "engine", "allow_pickle", "write_workers"))
    if args.lora:
        values["loras"] = list(args.lora)
    sets: dict = {}
    apply_set(sets, args.set, sections_only=True)
    if sets:
        merged = dict(values.get("overrides", {}))
        for section, kv in sets.items():
            merged[section] = {**merged.get(section, {}), **kv}
        values["overrides"] = merged
    return synth_config_from(values)


def _print_summary(summary: dict, random_notice: str | None) -> None:
    rate = summary["images_per_s"]
    part = "" if summary["shard"] == "0/1" else f" (shard {summary['shard']})"
    print(
        f"wrote {summary['samples']} samples{part} to {summary['out']} "
        f"({summary['new']} new, {summary['already_present']} already present) in "
        f"{summary['seconds']:.1f} s" + (f", {rate:.2f} images/s" if rate else "")
    )
    print(f"model {summary['model']}, preset {summary['preset']}, {summary['steps']} steps, "
          f"{summary['size'][0]}x{summary['size'][1]}, {summary['device']} {summary['dtype']}, "
          f"backend {summary['backend']}")
    if random_notice:  # a built-in random model's (any family): its outputs mean nothing
        print(f"note: {random_notice}")


def check_synth_job(cfg) -> None:
    """The checks of a synth job that need no model and no torch, run before either loads, so
    bad arguments are refused within about a second (run_synth makes them again)."""
    from ..config import parse_shard
    from ..files import check_output_dir
    from ..models.loading import RANDOM_MODELS, check_model_path, default_size, latent_stride
    from ..prompts import default_prompts, load_classes, load_prompt_file
    from ..toy.world import check_toy_words

    cfg.validate()
    parse_shard(cfg.shard)
    if cfg.model not in RANDOM_MODELS:
        check_model_path(cfg.model, cfg.allow_pickle)
    preset = cfg.resolve_preset(latent_stride(cfg.model))
    from ..models.loading import scheduler_note  # with run_synth's guidance: flag, preset, 7.5

    note = scheduler_note(cfg.scheduler, cfg.guidance if cfg.guidance is not None else
                          (preset.guidance or 7.5), cfg.model, cfg.loras)
    if note:
        print(f"note: {note}", file=sys.stderr)
    classes = load_classes(cfg.classes)
    prompts = load_prompt_file(cfg.prompts, classes) if cfg.prompts else default_prompts(classes)
    check_toy_words(cfg.model, prompts)
    check_output_dir(Path(cfg.out))
    if cfg.format == "webdataset":
        from ..synth.webdataset import require_pyarrow

        require_pyarrow()
    if cfg.engine:
        from ...engines.cache import check_engine_job

        size = default_size(cfg.model)
        check_engine_job(cfg.engine, cfg.backend, cfg.height or size, cfg.width or size,
                         cfg.batch_size)
    if cfg.loras:
        from ..models.lora import check_loras, parse_lora_spec

        check_loras([parse_lora_spec(s, cfg.lora_scale) for s in cfg.loras])


def cmd_synth(args) -> int:
    cfg = _synth_config(args)
    check_synth_job(cfg)
    from ..models.loading import random_model_notice
    from ..synth.job import run_synth

    summary = run_synth(cfg, progress=not args.no_progress,
                        engine_harvester=_engine_harvester(cfg))
    _print_summary(summary, random_model_notice(cfg.model))
    return 0


def _engine_harvester(cfg):
    """The engines' harvester factory when the job runs on one (the command line is the one
    place where the pipeline meets the engines package)."""
    if cfg.backend == "torch" and not cfg.engine:
        return None
    from ...engines.harvest import engine_harvester

    return engine_harvester


# The toy demo's rendered test scenes: a seed apart from the toy model's training scenes
# (1000) and from the toy benchmark's validation seed (101).
DEMO_TEST_SEED = 102


def cmd_demo(args) -> int:
    from ..config import SynthConfig
    from ..models.loading import random_model_notice
    from ..synth.job import run_synth
    from ..synth.report import write_report

    t0 = time.perf_counter()
    toy = args.model == "toy"
    if args.model not in ("tiny", "toy"):
        raise UserError(f"the demo runs --model tiny or toy, not {args.model!r}")
    classes, per_class = ("toy", 12) if toy else ("voc", 2)
    prompts, augmentation = prompts_cli.write_demo_prompts(args.out, classes=classes,
                                                           num_per_class=per_class,
                                                           model=args.model)
    if toy:
        cfg = SynthConfig(model="toy", classes="toy", num_per_class=per_class, out=args.out,
                          batch_size=24, steps=15, guidance=4.0, height=64, width=64, seed=0,
                          device="cpu", prompts=prompts)
        notice = ("the toy world's model: 64x64 shapes, trained on rendered scenes (no real "
                  "weights can be downloaded here); see `attnseg bench toy` for its quality")
    else:
        cfg = SynthConfig(model="tiny", classes="voc", num_per_class=per_class, out=args.out,
                          batch_size=8, steps=10, height=128, width=128, seed=0, device="cpu",
                          prompts=prompts)
        notice = "tiny random model: images are noise, masks carry no meaning"
    summary = run_synth(cfg, progress=not args.no_progress)
    page = write_report(cfg.out, notice=notice)
    _print_summary(summary, random_model_notice(cfg.model))
    print(augmentation)
    print(f"report: {page} and {page.parent / 'contact_sheet.png'}")
    from .train import demo_train_eval  # train + eval stages on the demo dataset

    if toy:
        from ..toy.world import ToyRenderConfig, render_dataset

        test = Path(args.out) / "test"
        render_dataset(ToyRenderConfig(out=str(test), num_images=DEMO_TEST_SCENES,
                                       seed=DEMO_TEST_SEED),
                       progress=False)
        report = demo_train_eval(cfg.out, test, steps=300, progress=not args.no_progress)
        pseudo = demo_pseudo_mask_miou(test)
        print(f"\nwhat to look at: {page.parent / 'contact_sheet.png'} (every shape tinted "
              "and outlined in its class colour) and the per-class table in "
              f"{page.name}\npseudo-masks of the {DEMO_TEST_SCENES} rendered scenes (the "
              f"harvester labelling real images): mIoU {100 * pseudo:.1f} % against their exact "
              "labels (expect about 67; a colour threshold scores about 40: bench/toy/README.md)"
              f"\nsegmenter trained 300 steps on the {summary['samples']} demo images: "
              f"mIoU {100 * report['mIoU']:.1f} % on the same scenes (a short run; see the "
              "toy study for the full protocol)")
    else:
        demo_train_eval(cfg.out, progress=not args.no_progress)
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0


# The toy bench's validation choice for labelling rendered scenes (bench/results/toy.json):
# latents noised to 10 % of the schedule, one UNet call, the benchmark's prompt template.
DEMO_NOISE_LEVELS = (0.1,)
DEMO_TEST_SCENES = 100


def demo_pseudo_mask_miou(test: Path) -> float:
    """mIoU of the default preset's pseudo-masks of the rendered test scenes (the toy model
    labelling images it did not generate) against their exact labels."""
    import torch

    from ...bench.quality import score_real_pseudo_masks
    from ..config import get_preset
    from ..harvest.real_images import RealImageConfig, RealImageLabeller
    from ..models.loading import load_pipeline
    from ..prompts import load_classes
    from ..train.sources import open_source

    pipe = load_pipeline("toy", torch.device("cpu"), torch.float32)
    real = RealImageConfig(noise_levels=DEMO_NOISE_LEVELS, template="a photo of a {}",
                           size=64, seed=0)
    with RealImageLabeller(pipe, get_preset("attnseg", pipe.vae_scale_factor), real) as lab:
        return score_real_pseudo_masks(lab, load_classes("toy"),
                                       open_source(test, "synthetic", "train"))["mIoU"]


def _synth_config_from_argv(argv: list[str]):
    """A SynthConfig from `attnseg synth` arguments given after `--` to a launcher."""
    parser = argparse.ArgumentParser(prog="attnseg synth", add_help=False)
    _add_synth_args(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        raise UserError(f"cannot parse the synth arguments {' '.join(argv)!r}") from None
    return _synth_config(args)


def cmd_launch_slurm(args) -> int:
    from ..files import atomic_write_bytes
    from ..synth.launch import slurm_script

    _synth_config_from_argv(args.synth_args).validate()  # fail now, not on the cluster
    script = slurm_script(args.synth_args, args.array, job_name=args.job_name,
                          partition=args.partition, gpus_per_task=args.gpus_per_task,
                          cpus_per_task=args.cpus_per_task, time=args.time)
    if args.script:
        atomic_write_bytes(Path(args.script), script.encode())
        print(f"wrote {args.script}; submit it with: sbatch {args.script}")
    else:
        print(script, end="")
    return 0


def cmd_launch_ray(args) -> int:
    from ..synth.launch import run_ray

    cfg = _synth_config_from_argv(args.synth_args)
    cfg.validate()
    result = run_ray(cfg, args.workers, args.gpus_per_worker, args.shards, args.address,
                     args.cpus_per_worker, engine_harvester=_engine_harvester(cfg))
    print(f"ray: {result['shards']} shards on {result['workers']} workers, "
          f"{result['new']} new samples in {cfg.out}")
    return 0


# What backs each preset: its pseudo-mask mIoU on the toy world (%, mean ± std over three
# test renders of 500 scenes), with its settings of today and with its dense CRF switched; and
# the best recipe tried on validation. Made by `attnseg bench toy-downstream --config
# bench/configs/toy_downstream.toml` (before the default preset's CRF: there its CRF-on row is
# the switched one); a test holds these to its result file.
TOY_RESULT = "bench/results/toy_downstream.md"
TOY_FIGURES = {
    "attnseg": ((66.7, 1.7), (48.7, 1.2)),
    "diffumask": ((45.5, 2.4), (32.4, 0.3)),
    "dataset-diffusion": ((10.5, 0.3), (10.3, 0.3)),
    "daam": ((48.9, 1.2), (70.7, 1.2)),
    "attn2mask": ((66.6, 1.7), (48.5, 1.2)),
}
TOY_BEST_RECIPE = ("daam-crf-bg0.3", "--preset daam --set mask.crf_iterations=10 --set "
                   "mask.bg_const=0.3", (71.3, 1.3))
# The instrument's downstream arms on generated images for the dense CRF and the best recipe
# (a gain's mean and standard deviation over the seeds, in mIoU points, paired by seed with
# the default preset's masks without the CRF): neither beyond its interval.
TOY_DOWNSTREAM_GAINS = {"crf": (-0.9, 7.1), f"recipe:{TOY_BEST_RECIPE[0]}": (-3.9, 7.2)}
# What backs the default preset's dense CRF: the segmenter trained on the exact arm's rendered
# scenes labelled by the default's masks with the CRF against without (no image gap: only
# the masks differ), paired by seed (mean, standard deviation and 95 % interval of the gain).
TOY_RENDERS_RESULT = "bench/results/toy_downstream_renders.md"
TOY_RENDERS_CRF_GAIN = ("renders:crf", 13.9, 1.0, (12.7, 15.2))
# Why the best recipe is not the default: on the same scenes, a segmenter trained on its masks
# against the default's (with the CRF), paired by seed (mean, standard deviation and 95 %
# interval of the gain, in mIoU points): not beyond its interval.
TOY_RENDERS_RECIPE_RESULT = "bench/results/toy_downstream_renders_recipe.md"
TOY_RENDERS_RECIPE_GAIN = (-0.6, 2.1, (-3.3, 2.0))
# What backs the default loss (`attnseg train --loss`): the robust losses at their defaults on
# the same scenes labelled by the default preset's masks as they are now (with its CRF), each
# paired by seed with CE on those masks (mean, standard deviation and 95 % interval of the
# gain, in mIoU points). The default is the loss whose interval lies above 0 with the largest
# gain, and CE when none does; a test holds these to the result file and to that rule.
TOY_RENDERS_LOSS_RESULT = "bench/results/toy_downstream_renders_loss.md"
TOY_LOSS_GAINS = {"reliability-weighted": (-1.2, 3.2, (-5.2, 2.7)),
                  "ignore-band": (0.1, 1.0, (-1.1, 1.3)),
                  "cotrain": (-7.9, 1.1, (-9.2, -6.5))}
# What backs the default prompts (`attnseg prompts --classes-per-prompt`'s default): the
# instrument's arm on augmented prompts naming one to three classes against synth's plain
# template prompts, one class each (mean, standard deviation and 95 % interval of the gain
# over the seeds, in mIoU points). It holds the synonyms too.
TOY_PROMPT_GAIN = ("prompts:several-classes", 9.6, 4.9, (3.5, 15.7))
# The built-in lexicon (`attnseg prompts`' synonyms and hyponyms, on by default): the arm on
# the augmented set against the same set without the lexicon (the toy templates with the class
# word), one class each, with the default preset's masks as they are now (mean, standard
# deviation and 95 % interval of the gain, in mIoU points; an end that one decimal would
# print as 0 to two). It stays on unless it loses beyond its interval: the default prompts'
# own figure (TOY_PROMPT_GAIN) was measured with it, and those prompts without it are not.
TOY_LEXICON_RESULT = "bench/results/toy_downstream_lexicon.md"
TOY_LEXICON_GAIN = (0.2, 7.1, (-8.6, 9.0))
# The same two sets against synth's plain prompts (four fixed templates, one class each).
TOY_PROMPTS_RESULT = "bench/results/toy_downstream_prompts.md"
TOY_PROMPTS_GAINS = {"prompts:templates": (5.9, 11.0, (-7.7, 19.6)),
                     "prompts:augmented": (6.1, 4.9, (0.03, 12.1))}


def _interval(lo: float, hi: float) -> str:
    """A 95 % interval as printed: one decimal, two where one would read as 0."""
    ends = [f"{x:+.2f}" if round(x, 1) == 0 else f"{x:+.1f}" for x in (lo, hi)]
    return f"[{ends[0]}, {ends[1]}]"


def cmd_presets(args) -> int:
    from dataclasses import asdict

    from ..config import PRESETS, get_preset
    from ..train.losses import LossConfig

    for name in PRESETS:
        p = get_preset(name)
        print(f"{name}: {p.source}")
        if name in TOY_FIGURES:
            (mean, std), (crf_mean, crf_std) = TOY_FIGURES[name]
            switched = "off" if p.mask.crf_iterations else "on"
            print(f"  toy world: {mean:.1f} ± {std:.1f} mIoU; {crf_mean:.1f} ± {crf_std:.1f} "
                  f"with the dense CRF {switched}")
        if args.verbose:
            print(json.dumps({"harvest": asdict(p.harvest), "mask": asdict(p.mask),
                              "steps": p.steps, "guidance": p.guidance}, indent=1))
    _, mean, std, (lo, hi) = TOY_RENDERS_CRF_GAIN
    crf, (recipe_name, flags, (rmean, rstd)) = TOY_DOWNSTREAM_GAINS["crf"], TOY_BEST_RECIPE
    recipe = TOY_DOWNSTREAM_GAINS[f"recipe:{recipe_name}"]
    print(f"Default refinement (attnseg's dense CRF, 10 iterations): a segmenter trained on the "
          f"toy world's scenes labelled by the default's masks gains {mean:+.1f} ± {std:.1f} "
          f"mIoU from the CRF, 95 % interval {_interval(lo, hi)} (5 seeds; "
          f"{TOY_RENDERS_RESULT}); trained on generated images, {crf[0]:+.1f} ± {crf[1]:.1f} "
          f"(not resolved; {TOY_RESULT}).")
    rgain, rgstd, (rlo, rhi) = TOY_RENDERS_RECIPE_GAIN
    print(f"Best recipe measured ({recipe_name}: {flags}): {rmean:.1f} ± {rstd:.1f} on the toy "
          f"world, where unsure pixels count as wrong (it leaves none; the default's ignore "
          f"band does). A segmenter trained on the toy world's scenes labelled by it gains "
          f"{rgain:+.1f} ± {rgstd:.1f} mIoU over the default's masks, 95 % interval "
          f"{_interval(rlo, rhi)} (5 seeds; {TOY_RENDERS_RECIPE_RESULT}); trained on "
          f"generated images, {recipe[0]:+.1f} ± {recipe[1]:.1f} over the default's without the "
          "CRF (not resolved): not the default.")
    gains = "; ".join(f"{name} {mean:+.1f} ± {std:.1f} {_interval(lo, hi)}"
                      for name, (mean, std, (lo, hi)) in TOY_LOSS_GAINS.items())
    resolved = [name for name, (_, _, (lo, _)) in TOY_LOSS_GAINS.items() if lo > 0]
    print(f"Default loss (attnseg train --loss): {LossConfig().name}. Over CE, a segmenter "
          f"trained on the toy world's scenes labelled by the default's masks gains: {gains} "
          f"mIoU (95 % intervals, 5 seeds; {TOY_RENDERS_LOSS_RESULT}): "
          + (f"a gain beyond the interval for {', '.join(resolved)}." if resolved else
             "none gains beyond its interval."))
    _, mean, std, (lo, hi) = TOY_PROMPT_GAIN
    print(f"Default prompts (attnseg prompts, the demo): a template prompt names one to three "
          f"classes (--classes-per-prompt 0.4,0.35,0.25): {mean:+.1f} ± {std:.1f} mIoU "
          f"downstream over synth's plain prompts (one class each, no synonyms), 95 % "
          f"interval {_interval(lo, hi)} (5 seeds; {TOY_RESULT}).")
    mean, std, (lo, hi) = TOY_LEXICON_GAIN
    plain = "; ".join(f"{arm.partition(':')[2]} {m:+.1f} {_interval(a, b)}"
                      for arm, (m, _, (a, b)) in TOY_PROMPTS_GAINS.items())
    print(f"Default lexicon (attnseg prompts, --no-builtin-lexicon to leave it out): the "
          f"synonyms and hyponyms over the same templates without them, one class per prompt, "
          f"{mean:+.1f} ± {std:.1f} mIoU downstream, 95 % interval {_interval(lo, hi)} "
          f"(5 seeds; {TOY_LEXICON_RESULT}): "
          + ("beyond it." if lo > 0 else "worse beyond it." if hi < 0 else
             "not resolved either way; on, as part of the default prompts measured above.")
          + f" Over synth's plain prompts: {plain} ({TOY_PROMPTS_RESULT}).")
    return 0


def register(sub) -> None:
    """Add this module's subcommands (synth, demo, presets) to the `attnseg` parser."""
    p = sub.add_parser("synth", help="generate images with pseudo-masks into a VOC-layout folder",
                       description="Generate images with a text-to-image model and label each "
                       "with a pseudo-mask made from its cross-attention (plus a reliability "
                       "map), into a VOC-layout folder (or WebDataset shards). A killed job "
                       "resumes; a larger --num-per-class grows a finished one.")
    _add_synth_args(p)
    p.set_defaults(func=cmd_synth)
    p = sub.add_parser("demo", help="offline demo: synthesis, report, training, evaluation "
                       "(toy: about a minute on 2 idle CPU cores; tiny: ~20 s)",
                       description="The whole path offline, on a built-in model: augmented "
                       "prompts, synthesis with pseudo-masks, the dataset report, a short "
                       "segmenter training and its evaluation, all under --out.")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--model", default="toy", help="toy (the toy world's trained model: shapes "
                   "with their masks, the segmenter scored against rendered scenes with exact "
                   "labels) or tiny (the random model: shows the path, its images are noise) "
                   "(default: toy)")
    cli_args.add_no_progress(p, "no progress bars")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("launch", help="run synth at scale: Slurm array script or Ray Data "
                       "(torchrun/accelerate: use `synth --shard auto`)",
                       description="Run one `attnseg synth` job at scale, its shards spread over "
                       "a cluster: `launch slurm` writes an sbatch array script, `launch ray` "
                       "maps the shards over Ray actors. Under torchrun or accelerate, run "
                       "`attnseg synth --shard auto` instead.")
    lsub = p.add_subparsers(dest="launcher", required=True)
    q = lsub.add_parser("slurm", help="write an sbatch array script; task k runs shard k/N",
                        description="Write (or print) an sbatch script for a Slurm job array: "
                        "array task k runs `attnseg synth ... --shard k/N` with the synth "
                        "arguments given after --. The arguments are checked now, not on the "
                        "cluster.")
    q.add_argument("--array", type=int, required=True,
                   help="number of array tasks (shards); required")
    q.add_argument("--script", help="write the script here (default: print it)")
    q.add_argument("--job-name", default="attnseg-synth",
                   help="Slurm job name (default: attnseg-synth)")
    q.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    q.add_argument("--gpus-per-task", type=int, default=1,
                   help="GPUs per array task, 0 for none (default: 1)")
    q.add_argument("--cpus-per-task", type=int, default=8,
                   help="CPUs per array task (default: 8)")
    q.add_argument("--time", default="24:00:00",
                   help="time limit per array task (default: 24:00:00)")
    q.add_argument("synth_args", nargs=argparse.REMAINDER,
                   help="-- then the `attnseg synth` arguments")
    q.set_defaults(func=cmd_launch_slurm)
    q = lsub.add_parser("ray", help="Ray Data: shards mapped over a pool of GPU actors",
                        description="Run the synth job given after -- as --shards pieces mapped "
                        "over --workers Ray actors (each holds one copy of the model), on a "
                        "local Ray or the cluster at --address.")
    q.add_argument("--workers", type=int, required=True, help="actors (model copies); required")
    q.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per actor, fractions allowed (default: 0)")
    q.add_argument("--cpus-per-worker", type=int, default=1,
                   help="CPU threads per actor (default: 1)")
    q.add_argument("--shards", type=int, help="pieces of work (default: 4 per worker)")
    q.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    q.add_argument("synth_args", nargs=argparse.REMAINDER,
                   help="-- then the `attnseg synth` arguments")
    q.set_defaults(func=cmd_launch_ray)
    p = sub.add_parser("presets", help="list the harvesting recipes and their sources",
                       description="List the harvesting recipes `--preset` names (the papers "
                       "they follow); -v prints every setting, which `--set harvest.NAME=...` "
                       "and `--set mask.NAME=...` override.")
    p.add_argument("-v", "--verbose", action="store_true", help="print every setting")
    p.set_defaults(func=cmd_presets)
