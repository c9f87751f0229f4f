"""Scale-out synthesis on engines users already run: torchrun/accelerate, Slurm arrays, Ray Data.

All three split one job by `--shard i/n` (pipeline.synth.job): a sample's seed, file name and batch
companions depend only on its global index, so any split yields the same dataset, finished
shards are skipped, and shards can run in any order or again after a failure.

- torchrun / accelerate: `torchrun --nproc-per-node 8 -m attnseg.pipeline.cli synth ...
  --shard auto` (each process reads RANK/WORLD_SIZE and takes the GPU of its LOCAL_RANK).
- Slurm: `attnseg launch slurm --array 64 -- ARGS` writes an sbatch script whose array task k
  runs shard k/64.
- Ray Data: `attnseg launch ray --workers 8 --gpus-per-worker 1 -- ARGS` maps shards over a pool
  of actors, each holding one loaded pipeline.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import replace

from ..config import SynthConfig
from ..errors import UserError

_SBATCH_VALUE = re.compile(r"[A-Za-z0-9._\-:,+=]+")


def slurm_script(synth_argv: list[str], array: int, *, job_name: str = "attnseg-synth",
                 partition: str | None = None, gpus_per_task: int = 1, cpus_per_task: int = 8,
                 time: str = "24:00:00", python: str | None = None) -> str:
    """An sbatch script whose array task k runs `attnseg synth ARGS --shard k/array`."""
    if array < 1:
        raise UserError("--array must be >= 1")
    if any(a == "--shard" or a.startswith("--shard=") for a in synth_argv):
        raise UserError("leave --shard out: the array index chooses the shard")
    # #SBATCH lines take no shell quoting: a value with a line break or a quote would end
    # the directive and put its rest into the script as a command, so such values are refused.
    for flag, value in (("--job-name", job_name), ("--partition", partition), ("--time", time)):
        if value is not None and not _SBATCH_VALUE.fullmatch(str(value)):
            raise UserError(f"{flag} {value!r} may hold only letters, digits and . _ - : , + = "
                            "(it goes into an #SBATCH line)")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array=0-{array - 1}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --time={time}",
        "#SBATCH --output=%x-%A_%a.out",
    ]
    if gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={gpus_per_task}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    cmd = [python or sys.executable, "-m", "attnseg.pipeline.cli", "synth", *synth_argv]
    lines += [
        "set -euo pipefail",
        "# Shard k of the job; rerunning a task resumes it, finished shards return at once.",
        " ".join(shlex.quote(c) for c in cmd)
        + f' --shard "${{SLURM_ARRAY_TASK_ID}}/{array}" --no-progress',
        "",
    ]
    return "\n".join(lines)


class _ShardWorker:
    """A Ray actor: loads the pipeline once, then synthesises whole shards."""

    def __init__(self, cfg: SynthConfig, cpus: int, engine_harvester=None):
        import torch

        from ..device import resolve_device, resolve_dtype
        from ..models.loading import load_pipeline
        from ..models.lora import parse_lora_spec

        # Ray pins actors to one CPU thread by default; use the CPUs the actor reserved.
        torch.set_num_threads(cpus)
        device = resolve_device(cfg.device)
        loras = [parse_lora_spec(s, cfg.lora_scale) for s in cfg.loras]
        self.pipe = load_pipeline(cfg.model, device, resolve_dtype(cfg.dtype, device), loras,
                                  cfg.allow_pickle)
        self.cfg = cfg
        self.engine_harvester = engine_harvester

    def __call__(self, batch):
        from .job import run_synth

        new = []
        for shard in batch["shard"]:
            summary = run_synth(replace(self.cfg, shard=str(shard)), progress=False,
                                engine_harvester=self.engine_harvester,
                                pipe=self.pipe)
            new.append(summary["new"])
        return {"shard": batch["shard"], "new": new}


def run_ray(cfg: SynthConfig, workers: int, gpus_per_worker: float = 0.0,
            shards: int | None = None, address: str | None = None,
            cpus_per_worker: int = 1, engine_harvester=None) -> dict:
    """Run a synthesis job on Ray Data: `shards` pieces mapped over `workers` actors
    (`engine_harvester`: as for `run_synth`)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError("the Ray launcher needs Ray Data: pip install 'ray[data]'") from None
    if workers < 1 or cpus_per_worker < 1:
        raise UserError("--workers and --cpus-per-worker must be >= 1")
    if cfg.shard is not None:
        raise UserError("leave --shard out: the Ray launcher splits the job itself")
    shards = shards or 4 * workers  # a few pieces per worker keeps the pool busy to the end
    if cfg.format == "voc":  # its shards keep manifests of their own: one count per folder
        from .writer import folder_shard_count, read_job

        stored = read_job(cfg.out)
        count = folder_shard_count(cfg.out, stored) if stored is not None else shards
        if count != shards:
            raise UserError(f"output folder {cfg.out} is written in {count} shard(s); give "
                            f"--shards {count} to go on with it (this run would cut it in "
                            f"{shards}), or use another --out")
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # A local cluster: one logical CPU per worker plus room for Ray Data's own tasks.
            ray.init(num_cpus=workers * cpus_per_worker + 2, include_dashboard=False,
                     log_to_driver=False)
        started = True
    try:
        ds = ray.data.from_items([{"shard": f"{i}/{shards}"} for i in range(shards)])
        out = ds.map_batches(
            _ShardWorker, fn_constructor_args=(cfg, cpus_per_worker, engine_harvester),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker,
        ).take_all()
    finally:
        if started:
            ray.shutdown()
    if cfg.format == "voc":  # every shard ran: the split file from all shards' manifests
        from .writer import write_split

        write_split(cfg.out)
    return {"shards": shards, "workers": workers, "new": sum(r["new"] for r in out)}
