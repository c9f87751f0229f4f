"""Dataset synthesis: load a Stable Diffusion pipeline, generate with harvesting, write masks.

The seed of sample i depends only on (base seed, i), never on batch size or on which samples
were already written, so a resumed or differently batched run yields the same samples.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import Preset, SynthConfig, parse_shard
from ..device import resolve_device, resolve_dtype
from ..errors import UserError
from ..files import check_output_dir
from ..harvest.harvester import AttentionHarvester
from ..harvest.masks import mask_steps
from ..models.loading import (
    check_image_size,
    class_weights,
    default_size,
    denoiser,
    generation_kwargs,
    initial_latents,
    latent_stride,
    load_pipeline,
    model_fingerprint,
    set_scheduler,
)
from ..models.lora import check_loras, parse_lora_spec
from ..prompts import ClassInfo, PromptSpec, default_prompts, load_classes, load_prompt_file
from ..seeds import sample_seed
from ..toy.world import check_toy_words
from .webdataset import TarChunkWriter, finished_chunks, require_pyarrow
from .writer import (
    DatasetWriter,
    check_job,
    open_job,
    read_manifest_records,
    stored_model_hash,
    write_split,
)


@dataclass
class Sample:
    """One planned sample: its global index, prompt and seed."""

    index: int
    spec: PromptSpec
    seed: int

    @property
    def name(self) -> str:
        return f"{self.index:08d}"


class SamplePlan:
    """Every sample of a job, planned lazily: sample i is class i // N, that class's prompt
    (i % N) modulo its prompt count, and seed `sample_seed(base, i)`. Nothing is built per
    sample up front, so start-up time and memory do not depend on the job's size.

    A folder grown from N0 to N per class (`grown_from`: the earlier counts, ascending) keeps
    its N0 * C samples and plans the new ones after them, class by class: sample i >= N0 * C
    is class (i - N0 * C) // (N - N0), prompt N0 + its remainder (modulo the prompt count),
    seed `sample_seed(base, i)`. With one class this is the plan of N; with several, a grown
    folder is not the folder a run of N from scratch makes (there, sample i's class depends on
    N), but the same growth steps always make the same folder."""

    def __init__(self, classes: list[ClassInfo], prompts: dict[str, list[PromptSpec]],
                 num_per_class: int, base_seed: int, grown_from: tuple[int, ...] = ()):
        self.classes = classes
        self.prompts = prompts
        self.num_per_class = num_per_class
        self.base_seed = base_seed
        self.counts = (*grown_from, num_per_class)

    def __len__(self) -> int:
        return len(self.classes) * self.num_per_class

    def sample(self, i: int) -> Sample:
        start = before = 0  # the growth step's first index, and the count before it
        for step, count in enumerate(self.counts):
            size = len(self.classes) * (count - before)
            if i < start + size or step == len(self.counts) - 1:
                break
            start, before = start + size, count
        ci, k = divmod(i - start, count - before)
        options = self.prompts[self.classes[ci].name]
        return Sample(i, options[(before + k) % len(options)], sample_seed(self.base_seed, i))

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self.sample(i) for i in range(len(self))[key]]
        if not -len(self) <= key < len(self):
            raise IndexError(key)
        return self.sample(key % len(self))

    def specs(self) -> list[PromptSpec]:
        """The distinct prompts the job uses (at most num_per_class per class)."""
        used = []
        for cls in self.classes:
            used += self.prompts[cls.name][: self.num_per_class]
        return list({id(s): s for s in used}.values())


def plan_samples(classes: list[ClassInfo], prompts: dict[str, list[PromptSpec]],
                 num_per_class: int, base_seed: int,
                 grown_from: tuple[int, ...] = ()) -> SamplePlan:
    """The job's samples (a lazy sequence, see `SamplePlan`)."""
    return SamplePlan(classes, prompts, num_per_class, base_seed, grown_from)


class Synthesizer:
    """Generates images, label maps and reliability maps for batches of samples."""

    def __init__(self, pipe, preset: Preset, height: int, width: int, steps: int,
                 guidance: float, harvester=None):
        self.pipe = pipe
        self.preset = preset
        self.size = (height, width)
        self.steps = steps
        self.guidance = guidance
        # An engine backend passes its own harvester (attnseg.engines.harvest.EngineHarvester).
        self.harvester = harvester or AttentionHarvester(denoiser(pipe), preset.harvest)
        self.timings = {"generate": 0.0, "masks": 0.0}
        self._timings_lock = threading.Lock()
        self._primed = None  # (samples' key, generate_float's result), see `prime`

    def initial_latents(self, seeds: list[int]) -> torch.Tensor:
        """Per-sample Gaussian latents (`models.initial_latents`)."""
        return initial_latents(self.pipe, self.size, seeds)

    def check_prompts(self, specs: list[PromptSpec]) -> None:
        """Fail early, naming the prompt, if any class word does not survive tokenisation."""
        for spec in specs:
            class_weights(self.pipe, [spec], self.preset.harvest.token_merge)

    @staticmethod
    def _key(samples: list[Sample]) -> tuple:
        return tuple((s.index, s.seed, s.spec.text) for s in samples)

    def prime(self, samples: list[Sample]) -> None:
        """Generate `samples` now, and hand the result to the `generate_float` call that asks
        for the same samples: a job generates its first batch before it creates its folder, so
        settings that fail only when the model runs fail with nothing written."""
        self._primed = (self._key(samples), self.generate_float(samples))

    @torch.no_grad()
    def generate_float(self, samples: list[Sample]):
        """Images float [B, H, W, 3] in [0, 1] as the pipeline returns them, labels uint8
        [B, H, W], reliability uint8 [B, H, W], and the HarvestResult they came from."""
        if self._primed is not None and self._primed[0] == self._key(samples):
            result, self._primed = self._primed[1], None
            return result
        images, finish, result = self._generate(samples)
        labels, reliability = finish()
        return images, labels, reliability, result

    @torch.no_grad()
    def generate_deferred(self, samples: list[Sample]):
        """Images uint8 [B, H, W, 3], and a function returning labels and reliability (uint8
        [B, H, W] each) that may run on another thread: when the preset refines with a CRF,
        the CRF and what follows it run there (the masks are those of `generate`)."""
        if self._primed is not None and self._primed[0] == self._key(samples):
            images, labels, reliability, _ = self.generate_float(samples)
            return _to_uint8(images), lambda: (labels, reliability)
        images, finish, _ = self._generate(samples)
        return _to_uint8(images), finish

    def _generate(self, samples: list[Sample]):
        """Images float, a function finishing the masks (as numpy), the HarvestResult."""
        specs = [s.spec for s in samples]
        weights, class_ids = class_weights(self.pipe, specs, self.preset.harvest.token_merge)
        latents = self.initial_latents([s.seed for s in samples])
        generators = [torch.Generator().manual_seed(s.seed + 1) for s in samples]
        t0 = time.perf_counter()
        with self.harvester.capture(weights, self.size, self.steps) as cap:
            images = self.pipe(
                [s.text for s in specs], height=self.size[0], width=self.size[1],
                num_inference_steps=self.steps, guidance_scale=self.guidance, latents=latents,
                generator=generators, output_type="np", **generation_kwargs(self.pipe),
            ).images
        t1 = time.perf_counter()
        rest = mask_steps(
            cap.result, class_ids, self.preset.harvest, self.preset.mask,
            images=torch.from_numpy(np.clip(images, 0.0, 1.0) * 255.0)
            if self.preset.mask.crf_iterations else None)
        t2 = time.perf_counter()
        self.timings["generate"] += t1 - t0
        self.timings["masks"] += t2 - t1

        def finish():
            t3 = time.perf_counter()
            with torch.no_grad():  # grad mode is per thread
                labels, reliability = rest()
            with self._timings_lock:  # may run on a write-pool thread
                self.timings["masks"] += time.perf_counter() - t3
            return labels.cpu().numpy(), reliability.cpu().numpy()

        return images, finish, cap.result

    def generate(self, samples: list[Sample]):
        """Images uint8 [B, H, W, 3], labels uint8 [B, H, W], reliability uint8 [B, H, W]."""
        images, labels, reliability, _ = self.generate_float(samples)
        return _to_uint8(images), labels, reliability


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


class _Once:
    """A function's result, computed by the first caller (on any thread) and shared."""

    def __init__(self, fn):
        self._fn = fn
        self._lock = threading.Lock()
        self._result = None

    def __call__(self):
        with self._lock:
            if self._result is None:
                self._result = self._fn()
                self._fn = None
            return self._result


def plan_batches(total: int, batch_size: int, shard: tuple[int, int]) -> range:
    """This shard's batches, as a range of batch numbers (batch b holds the global indices
    [b * batch_size, (b + 1) * batch_size)). Batches are fixed runs of consecutive indices
    dealt round-robin to shards, so every batch is generated with the same companions under
    any sharding and on any resume: batched kernels round alike, samples are identical."""
    index, count = shard
    return range(index, -(-total // batch_size), count)


def unit_indices(unit: int, unit_size: int, total: int) -> range:
    """The global sample indices of batch (or chunk) number `unit`."""
    return range(unit * unit_size, min((unit + 1) * unit_size, total))


def shard_sample_count(units: range, unit_size: int, total: int) -> int:
    """How many samples the units `units` (ascending; only the job's last may be short) hold."""
    if not units:
        return 0
    return (len(units) - 1) * unit_size + len(unit_indices(units[-1], unit_size, total))


class WritePool:
    """Encodes and writes samples on worker threads while the next batch generates.

    JPEG/PNG encoding and fsync release the GIL, so at few-step rates the generator does not
    wait on the disk. Each job may have a `then` step that runs on the calling thread, in
    submission order, once the job is done (the manifest line: the manifest stays in sample
    order). At most `max_pending` jobs are in flight (memory stays bounded; the generator
    waits when the disk falls behind). A failed job is raised on a later submit or at `drain`;
    samples whose line was not written are absent from the manifest, so a resumed run
    regenerates them. workers=0 runs every job inline.
    """

    def __init__(self, workers: int, max_pending: int):
        self.workers = workers
        self.max_pending = max(1, max_pending)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="attnseg-write") \
            if workers > 0 else None
        self._pending: deque = deque()

    def submit(self, fn, *args, then=None) -> None:
        if self._pool is None:
            fn(*args)
            if then is not None:
                then()
            return
        while len(self._pending) >= self.max_pending:
            self._finish_oldest()
        self._pending.append((self._pool.submit(fn, *args), then))

    def _finish_oldest(self) -> None:
        future, then = self._pending.popleft()
        future.result()
        if then is not None:
            then()

    def drain(self) -> None:
        """Finish every submitted job in order; after a failure the later jobs still finish
        (nothing is left running) but their `then` steps are skipped; the failure is raised."""
        error = None
        while self._pending:
            if error is None:
                try:
                    self._finish_oldest()
                except BaseException as e:
                    error = e
            else:
                future, _ = self._pending.popleft()
                future.exception()  # wait; its own error, if any, is secondary
        if error is not None:
            raise error

    def close(self) -> None:
        try:
            self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


def _write_unit(synth: Synthesizer, unit: list[Sample], sink, done: set[int], batch_size: int,
                bar, pool: WritePool) -> int:
    """Generate a unit's batches and hand its samples that are not done to `pool` (files on
    its threads, manifest lines in order; a sink without `write_files` writes on one thread);
    returns how many. The caller drains the pool."""
    written = 0
    # A preset that refines with a CRF finishes its masks on the pool's threads, beside the
    # next batch's generation: the batch's first job to start runs the CRF, the others wait.
    defer = pool.workers > 0 and synth.preset.mask.crf_iterations > 0
    for start in range(0, len(unit), batch_size):
        batch = unit[start : start + batch_size]
        if defer:
            images, finish = synth.generate_deferred(batch)
            masks = _Once(finish)
        else:
            images, labels, reliability = synth.generate(batch)
            masks = None
        for j, s in enumerate(batch):
            if s.index in done:
                continue  # written before an interruption: generated only as a companion
            record = {
                "prompt": s.spec.text,
                "classes": [{"id": c.id, "name": c.name, "word": w} for c, w in s.spec.labels],
                "seed": s.seed,
            }
            if masks is not None:
                write = getattr(sink, "write_files", None)

                def job(j=j, s=s, record=record, write=write, masks=masks, images=images):
                    labels, reliability = masks()
                    if write is not None:
                        write(s.name, images[j], labels[j], reliability[j])
                    else:
                        sink.write(s.index, s.name, images[j], labels[j], reliability[j], record)

                pool.submit(job, then=None if write is None else
                            lambda s=s, record=record: sink.record(s.index, s.name, record))
            elif hasattr(sink, "write_files"):
                pool.submit(sink.write_files, s.name, images[j], labels[j], reliability[j],
                            then=lambda s=s, record=record: sink.record(s.index, s.name, record))
            else:
                pool.submit(sink.write, s.index, s.name, images[j], labels[j], reliability[j],
                            record)
            written += 1
        if bar is not None:
            bar.update(len(batch))
    return written


def run_synth(cfg: SynthConfig, progress: bool = True, pipe=None,
              engine_harvester=None) -> dict:
    """Run a synthesis job (or one shard of it) end to end; returns a summary dict.

    Resumes an interrupted job; a shard whose samples are all written returns at once (after
    refreshing the split file, which a shard finishing alongside another may have missed).
    `pipe`: an already loaded pipeline for `cfg.model` (launchers reuse one per worker).
    `engine_harvester(cfg, pipe, preset, log)`: makes the harvester for `--backend` other
    than torch or `--engine` (the command line passes `attnseg.engines.harvest`'s; the
    pipeline package itself does not depend on the engines).
    """
    cfg.validate()
    cfg = replace(cfg, height=cfg.height or default_size(cfg.model),
                  width=cfg.width or default_size(cfg.model))
    shard = parse_shard(cfg.shard)
    stride = pipe.vae_scale_factor if pipe is not None else latent_stride(cfg.model)
    preset = cfg.resolve_preset(stride)
    steps = cfg.steps or preset.steps or 20
    guidance = cfg.guidance if cfg.guidance is not None else (preset.guidance or 7.5)
    classes = load_classes(cfg.classes)
    prompts = load_prompt_file(cfg.prompts, classes) if cfg.prompts else default_prompts(classes)
    check_toy_words(cfg.model, prompts)
    out = Path(cfg.out)
    check_output_dir(out)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cpu" and dtype == torch.float16:
        raise UserError("--dtype fp16 is not supported on CPU; use fp32 or bf16")
    webdataset = cfg.format == "webdataset"
    if webdataset:
        require_pyarrow()
    # The unit of work and of resume: one batch (VOC files) or one tar chunk (WebDataset).
    unit_size = cfg.samples_per_tar if webdataset else cfg.batch_size
    loras = [parse_lora_spec(s, cfg.lora_scale) for s in cfg.loras]
    lora_records = check_loras(loras)  # before anything is loaded or written
    job = {
        "model": cfg.model, "classes": cfg.classes,
        "class_names": [c.name for c in classes], "num_per_class": cfg.num_per_class,
        "preset": cfg.preset, "harvest": preset.harvest.job_record(),
        "mask": preset.mask.job_record(),
        "prompts": cfg.prompts, "steps": steps, "guidance": guidance,
        "size": [cfg.height, cfg.width], "seed": cfg.seed, "dtype": str(dtype),
        "batch_size": cfg.batch_size, "format": cfg.format,
    }
    if webdataset:
        job["samples_per_tar"] = cfg.samples_per_tar
    if cfg.scheduler:  # recorded only when set, as LoRAs: older job files stay valid
        job["scheduler"] = cfg.scheduler
    if lora_records:  # recorded only when used, so job files of runs without LoRA are unchanged
        job["loras"] = lora_records
    if cfg.backend != "torch" or cfg.engine:  # engines round differently from eager torch
        job["backend"] = cfg.backend if not cfg.engine else f"engine {Path(cfg.engine).name}"
    if shard[1] > 1 and not webdataset:  # VOC shards write manifests of their own; recorded
        job["shards"] = shard[1]  # only when sharded, so unsharded job files are unchanged
    # The folder's job, before the model loads: None (a new folder), or the per-class counts
    # its samples are planned with (several when it grows); a different job is refused here.
    counts = check_job(out, job, shard)
    samples = plan_samples(classes, prompts, cfg.num_per_class, cfg.seed,
                           tuple(counts[:-1]) if counts else ())
    units = plan_batches(len(samples), unit_size, shard)
    mine = shard_sample_count(units, unit_size, len(samples))
    t0 = time.perf_counter()

    def unit_done(u: int, done: set[int], chunks: set[int]) -> bool:
        if webdataset:
            return u in chunks
        return all(i in done for i in unit_indices(u, unit_size, len(samples)))

    def done_count(done: set[int], chunks: set[int]) -> int:
        """How many of this shard's samples are finished."""
        if webdataset:
            return sum(len(unit_indices(c, unit_size, len(samples))) for c in chunks
                       if c in units)
        return sum(1 for i in done if i < len(samples) and (i // unit_size) in units)

    chunks: set[int] = set()
    done: set[int] = set()
    if counts is not None and webdataset:
        chunks = finished_chunks(out)
    elif counts is not None:
        done = {rec["index"] for rec in read_manifest_records(out)}
    model_hash = model_fingerprint(pipe) if pipe is not None else None
    if model_hash is not None and counts is not None:
        # The job file matches without the weights' hash (so that a finished job returns
        # without loading the model); with the model at hand, other weights under the same
        # name (a retrained folder) are refused, not taken as this model's samples.
        stored = stored_model_hash(out)
        if stored is not None and stored != model_hash:
            raise UserError(f"output folder {out} holds samples of other weights of model "
                            f"{cfg.model!r} (hash {stored}); use another --out")
    synth = None
    written = 0
    if done_count(done, chunks) < mine:
        pipe = pipe or load_pipeline(cfg.model, device, dtype, loras, cfg.allow_pickle)
        set_scheduler(pipe, cfg.scheduler)
        if pipe.vae_scale_factor != stride:
            raise UserError(f"model {cfg.model}: its VAE downsamples {pipe.vae_scale_factor}x, "
                            f"not the {stride}x its config files say")
        check_image_size(pipe, cfg.height, cfg.width)
        harvester = None
        if cfg.backend != "torch" or cfg.engine:
            if engine_harvester is None:
                raise UserError("--backend and --engine run through the attnseg command (or "
                                "pass run_synth an engine_harvester)")
            harvester = engine_harvester(cfg, pipe, preset, log=print if progress else None)
        synth = Synthesizer(pipe, preset, cfg.height, cfg.width, steps, guidance, harvester)
        lock = bar = None
        # A tar is written in order: one writer thread for WebDataset chunks.
        pool = WritePool(min(cfg.write_workers, 1) if webdataset else cfg.write_workers,
                         max_pending=2 * cfg.batch_size)
        try:
            synth.check_prompts(samples.specs())
            job["model_hash"] = model_hash or model_fingerprint(pipe)
            first = next(u for u in units if not unit_done(u, done, chunks))
            # Its first batch before the folder is made: what fails only when the model runs
            # (harvest heads the strides leave out, ...) fails with nothing written.
            synth.prime(samples[first * unit_size : first * unit_size + cfg.batch_size])
            lock, job = open_job(out, job, classes, shard, counts)
            if webdataset:
                chunks = finished_chunks(out)  # read again under the lock
            else:
                writer = DatasetWriter(out, job, classes, shard=shard)
                done = writer.done
            if progress:
                from ..progress import progress_bar

                bar = progress_bar(total=mine, initial=done_count(done, chunks), unit="img",
                                   dynamic_ncols=True, desc="synth" if shard[1] == 1
                                   else f"synth {shard[0]}/{shard[1]}")
            for u in units:
                if unit_done(u, done, chunks):
                    continue
                unit = samples[u * unit_size : (u + 1) * unit_size]
                if webdataset:
                    chunk = TarChunkWriter(out, u, job)
                    try:
                        written += _write_unit(synth, unit, chunk, done, cfg.batch_size, bar,
                                               pool)
                        pool.drain()
                        chunk.close()
                    except BaseException:
                        pool.close()
                        chunk.abort()
                        raise
                else:
                    written += _write_unit(synth, unit, writer, done, cfg.batch_size, bar, pool)
            pool.drain()
            if not webdataset:
                writer.finish()
        finally:
            pool.close()  # every started write finishes (or fails) before the lock is let go
            synth.harvester.remove()  # the caller's pipeline is left as it was
            if bar is not None:
                bar.close()
            if lock is not None:
                lock.release()
    elif not webdataset and counts is not None:
        write_split(out)
    elapsed = time.perf_counter() - t0
    return {
        "out": str(out), "samples": mine, "new": written, "already_present": mine - written,
        "shard": f"{shard[0]}/{shard[1]}", "seconds": round(elapsed, 3),
        "images_per_s": round(written / elapsed, 3) if written and elapsed > 0 else None,
        "model": cfg.model, "preset": cfg.preset, "steps": steps, "size": [cfg.height, cfg.width],
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "loras": lora_records,
        "backend": getattr(synth.harvester, "backend", "torch") if synth else cfg.backend,
        "timings_s": {k: round(v, 3) for k, v in (synth.timings if synth else {}).items()},
    }
