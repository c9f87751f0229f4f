"""`attnseg prompts`: augmented prompt sets (synonyms, hyponyms, templates, captions)."""

from __future__ import annotations

import math
from collections import Counter

from .. import cli_args
from ..errors import UserError


def _config(args):
    from ..adapt.prompt_augment import PromptsConfig
    from ..settings import config_from, config_values

    values = config_values(args, ("classes", "num_per_class", "seed", "out", "templates",
                                  "captions", "model", "wordnet_max"))
    if args.classes_per_prompt is not None:
        try:
            weights = tuple(float(w) for w in args.classes_per_prompt.split(","))
            if not all(math.isfinite(w) for w in weights):  # float() takes inf and nan
                raise ValueError
        except ValueError:  # the weights' own check comes with the config
            raise UserError(f"--classes-per-prompt {args.classes_per_prompt!r} is not a comma "
                            "list of finite weights, such as 0.4,0.35,0.25") from None
        values["classes_per_prompt"] = weights
    if args.lexicon:
        values["lexicons"] = list(values.get("lexicons", [])) + list(args.lexicon)
    for flag, name, value in ((args.no_builtin_lexicon, "builtin_lexicon", False),
                              (args.wordnet, "wordnet", True), (args.strict, "strict", True)):
        if flag:
            values[name] = value
    return config_from(PromptsConfig, values, "prompts")


def cmd_prompts(args) -> int:
    from ..adapt.prompt_augment import build_prompt_set, write_prompt_file

    cfg = _config(args)
    result = build_prompt_set(cfg)
    records = result.records()
    write_prompt_file(cfg.out, records)
    words = list(result.words_per_class.values())
    sources = Counter(r["source"] for r in records)
    named = Counter(len(r["labels"]) for r in records)
    print(f"wrote {len(records)} prompts ({len(result.classes)} classes x {cfg.num_per_class}) "
          f"to {cfg.out}")
    print(f"words per class: {sum(words) / len(words):.1f} on average (from {min(words)} to "
          f"{max(words)}); prompts by source: "
          + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())))
    if len(named) > 1 or len(cfg.classes_per_prompt) > 1:
        print("prompts naming " + ", ".join(f"{k} class{'es' if k > 1 else ''}: {v}"
                                           for k, v in sorted(named.items())))
    if result.checked:
        print(f"checked against the tokenizer of model {cfg.model!r}: every kept prompt's class "
              "words are found in its tokens")
    else:
        print("not checked against a tokenizer (give --model to check every prompt)")
    if result.issues:
        print(f"{len(result.issues)} word(s) or caption(s) left out:")
        for issue in result.issues:
            print(f"  {issue.describe()}")
    return 0


def register(sub) -> None:
    """Add `attnseg prompts` to the `attnseg` parser."""
    p = sub.add_parser(
        "prompts", help="augmented prompt set (synonyms, hyponyms, templates, captions) as JSONL",
        description="Write a prompts file for `attnseg synth --prompts`: per class, templates "
        "filled with the class word and its synonyms and hyponyms, plus captions that mention "
        "the class; deterministic given --seed, de-duplicated, --num-per-class prompts per class.",
    )
    cli_args.add_config(p, "prompts")
    cli_args.add_classes(p)
    p.add_argument("--num-per-class", type=int, help="prompts per class (default: 20)")
    p.add_argument("--seed", type=int, help="selection seed (default: 0)")
    p.add_argument("--out", help="output JSONL file (default: prompts.jsonl)")
    p.add_argument("--lexicon", action="append", default=[], metavar="FILE",
                   help="extra lexicon, lines 'class name: word, word' (repeatable; "
                   "default: none)")
    p.add_argument("--no-builtin-lexicon", action="store_true",
                   help="use only the --lexicon files")
    p.add_argument("--templates", help="templates file, one per line with {} for the word "
                   "(default: the class set's built-in templates)")
    p.add_argument("--captions", help="captions file, one per line; captions that mention a "
                   "class word or one of its lexicon words become prompts (default: none)")
    p.add_argument("--wordnet", action="store_true",
                   help="add WordNet synonyms and hyponyms (needs nltk and its corpus)")
    p.add_argument("--wordnet-max", type=int, help="WordNet words per class (default: 20)")
    p.add_argument("--model", help="check every prompt against this model's tokenizer "
                   "('tiny', hub id, folder or .safetensors); failures are reported "
                   "(default: no check)")
    p.add_argument("--classes-per-prompt", metavar="W1,W2,...",
                   help="weights of a template prompt naming 1, 2, ... classes, the others "
                   "drawn from the set: 0.4,0.35,0.25 names two in 35 %% and three in 25 %% "
                   "of prompts; 1 names one class (default: 0.4,0.35,0.25, the best prompt "
                   "arm downstream in the toy world: bench/results/toy_downstream.md)")
    p.add_argument("--strict", action="store_true",
                   help="fail instead of leaving out words or captions")
    p.set_defaults(func=cmd_prompts)




def write_demo_prompts(out: str, classes: str = "voc", num_per_class: int = 2,
                       model: str = "tiny") -> tuple[str, str]:
    """The demo's augmented prompt set (checked against `model`'s tokenizer), written to
    OUT/prompts.jsonl; returns its path and a line describing it with examples."""
    from pathlib import Path

    from ..adapt.prompt_augment import (
        PromptsConfig,
        build_prompt_set,
        prompt_file_bytes,
        write_prompt_file,
    )

    result = build_prompt_set(PromptsConfig(classes=classes, num_per_class=num_per_class,
                                            model=model))
    path = Path(out) / "prompts.jsonl"
    if path.exists():  # a rerun of the same demo finds its own file; anything else is the user's
        try:
            ours = path.read_bytes() == prompt_file_bytes(result.records())
        except OSError:
            ours = False
        if not ours:
            raise UserError(f"{path} is not this demo's prompt set, and the demo does not "
                            "overwrite it: give the demo another --out")
    write_prompt_file(path, result.records())
    replaced = [r for r in result.records() if r["source"] != "class word"]
    examples = "; ".join(f"{r['labels'][0]['class']} -> {r['prompt']!r}" for r in replaced[:3])
    several = sum(len(r["labels"]) > 1 for r in result.records())
    line = (f"prompt augmentation: {path} ({len(replaced)} of {len(result.records())} prompts "
            f"use a synonym or hyponym, e.g. {examples}; {several} name several classes)")
    return str(path), line
