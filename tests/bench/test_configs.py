"""Every published result in bench/results/ can be made again from the repository: it has a
settings file in bench/configs/ named for it, the index (bench/results/README.md) gives the
command that reads that file, the command's own code builds the file into its config without
an error, and the file holds the settings the result's JSON records.

No benchmark runs: each command of the index is parsed by `attnseg`'s own parser and run up to
the call that would start the work (that call is replaced by one that hands back the config
it was given). No model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest

from attnseg.pipeline.settings import config_from

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
CONFIGS = ROOT / "bench" / "configs"
INDEX = RESULTS / "README.md"

# Files in bench/results/ that are not NAME.json / NAME.md / NAME.png of a result NAME.json,
# and the result whose command writes them.
COVERED_BY = {
    # `attnseg toy train-model` draws OUT/samples.png beside OUT/loss.json and loss.png.
    "toy_model_samples.png": "toy_model_loss",
}

# Settings a config leaves to the machine it runs on (never compared with the JSON).
MACHINE_FIELDS = {"device", "progress"}

# JSON keys renamed since the run, and the value each new field takes from the old one.
RENAMES = {
    # ae4a0c4: prompt_arms replaced prompt_augment (true: the two arms there were then).
    "prompt_augment": {"prompt_arms": lambda v: ["templates", "augmented"] if v else []},
    # throughput and quality: one square `size` became height and width.
    "size": {"height": lambda v: v, "width": lambda v: v},
}

# Where a recorded value is a path on the machine that ran it, or a name that meant another
# model then, and what the config holds instead (result -> field -> (recorded, config, why)).
OLD_MODEL = "attnseg-bench/toy-8k-model"  # fetched by the command from commit 3e6e48c
_OLD = ("toy", OLD_MODEL, "`toy` was then the model shipped up to 3e6e48c (3,000 VAE + 8,000 "
        "UNet steps); the command fetches it from git history into this folder")
REPLACED = {
    "toy_steps_val_11k": {"model": _OLD},
    "toy_steps_val_20k": {"model": ("/work/toytrain/model-20k", "toy",
                                    "that training run's model at 17,000 UNet steps, shipped "
                                    "as `toy`")},
    "quality_tiny": {"labelled": ("/tmp/q/labelled", "attnseg-bench/quality_tiny_labelled",
                                  "the folder the index's setup step (attnseg synth) writes")},
    **{f"toy-8k/{name}": {"model": _OLD} for name in (
        "toy", "toy_protocol", "toy_protocol_ablations", "toy_protocol_losses",
        "toy_protocol_rest", "toy_pseudo")},
}

# Results whose JSON records no `config`: where in the JSON each setting is recorded.
RECORDED_ELSEWHERE = {
    # made before `attnseg bench prompts-lora` existed
    "prompts_lora": {("fused_vs_unfused", "size"): "height",
                     ("fused_vs_unfused", "steps"): "steps",
                     ("fused_vs_unfused", "repeats"): "repeats",
                     ("fused_vs_unfused", "rank"): "rank",
                     ("training", "resolution"): "height",
                     ("training", "steps_timed"): "train_steps"},
    # made as `python -m attnseg.bench.robust_training`, before the subcommand
    "robust_training": {("model",): "model", ("steps",): "steps", ("n_train",): "train",
                        ("n_val",): "val", ("data_seed",): "data_seed"},
    # the loss curves of `attnseg toy train-model`: its settings are the shipped model's card
    "toy_model_loss": {},
}

# The function each command hands its finished config to (replaced here), by its argv head.
STARTS = {
    ("bench", "throughput"): ("attnseg.bench.throughput", "run_throughput"),
    ("bench", "quality"): ("attnseg.bench.quality", "run_quality"),
    ("bench", "toy"): ("attnseg.bench.toy.run", "run_toy_bench"),
    ("bench", "toy-downstream"): ("attnseg.bench.toy.instrument", "run_toy_downstream"),
    ("bench", "writing"): ("attnseg.bench.writing", "run_writing_bench"),
    ("bench", "crf"): ("attnseg.bench.crf", "run_crf_bench"),
    ("bench", "robust-training"): ("attnseg.bench.robust_training", "run_robust_training"),
    ("bench", "prompts-lora"): ("attnseg.bench.prompts_lora", "run_prompts_lora"),
    ("synth",): ("attnseg.pipeline.synth.job", "run_synth"),
    ("toy", "train-model"): ("attnseg.pipeline.toy.model", "ToyModelTrainer"),
}


def result_names() -> list[str]:
    """Every result: the path of each JSON under bench/results/, relative, without .json."""
    return sorted(str(p.relative_to(RESULTS))[:-len(".json")] for p in RESULTS.rglob("*.json")
                  if not any(part.endswith(".work") for part in p.relative_to(RESULTS).parts))


def recorded(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def index_commands() -> list[str]:
    """Each command in the index's tables that reads a config (one backticked span each)."""
    rows = "\n".join(line for line in INDEX.read_text().splitlines() if line.startswith("| "))
    return re.findall(r"`([^`]*--config bench/configs/[^`]*)`", rows)


class _Started(Exception):
    def __init__(self, cfg):
        super().__init__("the command reached its work")
        self.cfg = cfg


def _start(cfg, *args, **kwargs):
    if hasattr(cfg, "validate"):
        cfg.validate()  # what the work checks first
    raise _Started(cfg)


def build(argv: list[str], monkeypatch) -> tuple[str, object]:
    """(config file, config) that `attnseg ARGV` builds and would start its work with."""
    from attnseg.pipeline.cli import build_parser

    head = next(h for h in STARTS if tuple(argv[:len(h)]) == h)
    module, name = STARTS[head]
    monkeypatch.setattr(f"{module}.{name}", _start)
    config = argv[argv.index("--config") + 1]
    argv = [str(ROOT / a) if a == config else a for a in argv]  # run from anywhere
    args = build_parser().parse_args(argv)
    with pytest.raises(_Started) as started:
        args.func(args)
    return config, started.value.cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, list]:
    """Config file (relative to the repository) -> [(command, config)] of every index command
    that reads it; a setup step's config is keyed by its own file."""
    out: dict[str, list] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))  # nothing is written, and not in the repo
        for command in index_commands():
            for part in command.split("&&"):
                words = shlex.split(part)
                if words[:1] != ["attnseg"]:
                    continue  # git archive, cp: not an attnseg command
                config, cfg = build(words[1:], mp)
                out.setdefault(config, []).append((command, cfg))
                if words[1] == "synth":  # a setup step: the next step checks its output is there
                    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return out


def built_for(built, name: str):
    entries = built[f"bench/configs/{name}.toml"]
    assert len({json.dumps(dataclasses.asdict(c), default=str, sort_keys=True)
                for _, c in entries}) == 1, f"{name}: index commands build it differently"
    return entries[0][1]


# (a) -----------------------------------------------------------------------------------


def test_every_result_has_a_config_named_for_it():
    names = result_names()
    assert len(names) >= 20
    missing = [n for n in names if not (CONFIGS / f"{n}.toml").is_file()]
    assert not missing, f"results without bench/configs/NAME.toml: {missing}"


def test_every_file_in_results_belongs_to_a_result():
    names = set(result_names())
    stray = []
    for p in RESULTS.rglob("*"):
        rel = p.relative_to(RESULTS)
        if p.is_dir() or rel.name == "README.md" or any(s.endswith(".work") for s in rel.parts):
            continue
        stem = str(rel)[:-len(p.suffix)] if p.suffix in (".json", ".md", ".png") else None
        if stem not in names and COVERED_BY.get(str(rel)) not in names:
            stray.append(str(rel))
    assert not stray, f"files of no result (no JSON, no config, no command): {stray}"


# (b) -----------------------------------------------------------------------------------


def test_every_config_builds_through_its_commands_typed_path(built):
    files = sorted(str(p.relative_to(ROOT)) for p in CONFIGS.rglob("*.toml"))
    assert files
    unread = [f for f in files if f not in built]
    assert not unread, f"configs no index command reads: {unread}"
    for config, entries in built.items():
        assert (ROOT / config).is_file(), f"the index names a missing config {config}"
        for command, cfg in entries:
            assert dataclasses.is_dataclass(cfg), (command, cfg)


def test_each_config_says_its_command_first(built):
    for name in result_names():
        (command, _), *_ = built[f"bench/configs/{name}.toml"]
        first = (CONFIGS / f"{name}.toml").read_text().splitlines()[0]
        assert first == f"# {command}", f"{name}.toml's first line is not its index command"


# (c) -----------------------------------------------------------------------------------


def _as_field(cls, field: str, value):
    """`value` as field `field` of `cls` holds it, through the same typed path."""
    return getattr(config_from(cls, {field: value}, "recorded"), field)


def test_configs_hold_the_settings_their_json_records(built):
    checked = 0
    for name in result_names():
        doc = recorded(name)
        if "config" not in doc:
            assert name in RECORDED_ELSEWHERE, f"{name}.json has no config and no mapping here"
            continue
        cfg = built_for(built, name)
        cls = type(cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        replaced = REPLACED.get(name, {})
        for key, value in doc["config"].items():
            where = f"{name}: {key}"
            if key in MACHINE_FIELDS:
                continue
            if key in replaced:
                was, now, _why = replaced[key]
                assert value == was and getattr(cfg, key) == now, where
            elif key == "out":  # the run's own folder: the published file is here
                assert cfg.out == f"bench/results/{name}", where
            elif key == "work":
                # a folder on the machine that ran it is left out (OUT.work); one in the
                # repository (shared between runs) is kept
                expect = None if value is None or value.startswith("/") else value
                assert cfg.work == expect, where
            elif key in fields:
                assert getattr(cfg, key) == _as_field(cls, key, value), \
                    f"{where}: config {getattr(cfg, key)!r}, recorded {value!r}"
            else:
                assert key in RENAMES, f"{where}: neither a field of {cls.__name__} nor a rename"
                for new, convert in RENAMES[key].items():
                    assert new in fields, where
                    assert getattr(cfg, new) == _as_field(cls, new, convert(value)), \
                        f"{where} -> {new}"
            checked += 1
    assert checked > 500


def _at(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def test_configs_of_results_without_a_config_key(built):
    for name, where in RECORDED_ELSEWHERE.items():
        doc, cfg = recorded(name), built_for(built, name)
        assert "config" not in doc
        for path, field in where.items():
            assert getattr(cfg, field) == _as_field(type(cfg), field, _at(doc, path)), \
                f"{name}: {'.'.join(path)} -> {field}"
    robust = built_for(built, "robust_training")
    doc = recorded("robust_training")
    assert robust.seeds == len(doc["seeds"])
    assert robust.threads == int(re.search(r"(\d+) torch thread", doc["machine"]).group(1))
    # The toy model: the shipped model's card, but for the settings of one session.
    toy = built_for(built, "toy_model_loss")
    card = json.loads((ROOT / "pipeline/data/toy-model/attnseg_toy_model.json").read_text())
    for key, value in card["config"].items():
        if key not in ("out", "device", "threads", "time_limit_s"):
            assert getattr(toy, key) == _as_field(type(toy), key, value), f"toy model: {key}"
    losses = recorded("toy_model_loss")
    assert losses["vae"][-1][0] == toy.vae_steps
    assert losses["unet"][-1][0] == toy.vae_steps + toy.unet_steps == card["steps"]


def test_setup_step_writes_what_its_result_reads(built):
    (_, labelled), = built["bench/configs/quality_tiny_labelled.toml"]
    assert built_for(built, "quality_tiny").labelled == labelled.out


# (d) -----------------------------------------------------------------------------------


def test_the_index_names_each_results_config():
    rows = [line for line in INDEX.read_text().splitlines() if line.startswith("| ")]
    for name in result_names():
        linked = [r for r in rows
                  if any(f"]({name}{suffix})" in r for suffix in (".md", ".json", ".png"))]
        assert linked, f"no index row links {name}"
        assert any(f"--config bench/configs/{name}.toml" in r for r in linked), \
            f"{name}'s index row does not name bench/configs/{name}.toml"


def test_no_dead_relative_links_in_the_reports():
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "bench").rglob("*.md")]
    dead = []
    for doc in docs:
        if any(part.endswith(".work") for part in doc.parts):
            continue
        for link in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            path = link.split("#")[0]
            if path and not re.match(r"[a-z]+:", path) and not (doc.parent / path).exists():
                dead.append(f"{doc.relative_to(ROOT)}: {link}")
    assert not dead, dead
