"""The student trainer: one curriculum stage on Ray Train V2 (`TorchTrainer`), DDP | FSDP2 | DeepSpeed.

Each worker holds the student and, for the ``full`` objective, the frozen reference (the initial
student); teachers never enter the trainer, their top-k log-probs come with the stage records.
Workers read the stage's Parquet files, take their deterministic shard (:class:`ShardPlan`), and
make one optimizer update per batch of `train.questions_per_batch` questions, accumulating
`train.grad_accum_steps` micro-batches. The loss is :func:`masters.student_step.student_loss`, the
same code the single-process baseline in ``benchmarks/train.py`` runs.

Checkpoints (weights + optimizer state + step) are reported every `train.checkpoint_every_steps`
updates and at the end of the stage; the final one also holds the gathered student in Hugging Face
format (``student/``), which :func:`train_stage` copies to `out_dir`. Re-running with the same
`run_name` and `storage_path` resumes from the latest checkpoint of that run (Ray Train V2 restores
it; `resume_from_checkpoint` is not supported in V2).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from masters.config import MastersConfig, TrainConfig
from masters.io import atomic_directory

STUDENT_SUBDIR = "student"
TRAIN_STATE_FILE = "train_state.pt"  # ddp / fsdp2: full model + optimizer state, written by rank 0
DEEPSPEED_SUBDIR = "deepspeed"  # deepspeed: one partition per rank, merged by Ray into one directory
PROGRESS_FILE = "progress.json"


@dataclass
class StageTrainResult:
    """What one stage's training returns to the driver."""

    metrics: list[dict[str, float]]  # one entry per optimizer step run by this call (a resume starts later)
    student_dir: Path  # the trained student, loadable with AutoModelForImageTextToText + AutoProcessor
    checkpoint_path: str  # the final Ray checkpoint (weights, optimizer state, student/)
    steps: int  # optimizer steps of the whole stage, counting those done before a resume


# --------------------------------------------------------------------------- strategies


class _TorchStrategy:
    """What DDP and FSDP2 share: torch AdamW and clipping, full-state checkpoints written by rank 0."""

    model: torch.nn.Module  # the wrapped model the loss is computed with

    def __init__(self, model: torch.nn.Module, train: TrainConfig):
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        self.grad_clip = train.grad_clip
        self.accum = train.grad_accum_steps

    def forward_context(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor

    def save_state(self, directory: Path, rank: int) -> bool:
        """Write the training state; True when this rank's directory must be reported."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=options)
        if rank == 0:
            torch.save({"model": model_state, "optimizer": optimizer_state}, directory / TRAIN_STATE_FILE)
        return rank == 0

    def load_state(self, directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = torch.load(directory / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(full_state_dict=True))
        # Not strict: parameters that never get a gradient (LLaVA's unused last vision layer) have no
        # AdamW state when saved, and must have none after loading either.
        set_optimizer_state_dict(
            self.model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True, strict=False)
        )

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded weights on CPU (complete on rank 0; collective, so every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class DDPStrategy(_TorchStrategy):
    """Replicated student, gradients all-reduced by torch DDP."""

    def __init__(self, model: torch.nn.Module, train: TrainConfig, device: torch.device):
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(model, train)
        # LLaVA reads the second-to-last vision layer: the last layer and post_layernorm get no gradient.
        self.model = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True
        )
        self.autocast = device.type == "cuda"  # bf16 compute over float32 weights on GPU

    def forward_context(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def sync_context(self, last_micro_batch: bool):
        return contextlib.nullcontext() if last_micro_batch else self.model.no_sync()


class FSDP2Strategy(_TorchStrategy):
    """Parameters sharded over the workers with `fully_shard` (one unit per transformer layer + the root)."""

    def __init__(self, model: torch.nn.Module, train: TrainConfig, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        # bf16 compute on GPU, float32 everywhere on CPU; gradients are reduced in float32.
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if device.type == "cuda" else None, reduce_dtype=torch.float32
        )
        # The model's own list of layers that must not be split (decoder/encoder layers).
        layer_classes = set(model._no_split_modules or ())
        for module in model.modules():
            if type(module).__name__ in layer_classes and any(p.requires_grad for p in module.parameters()):
                fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self.model = model
        # After sharding: the optimizer must hold the sharded (DTensor) parameters.
        super().__init__(model, train)

    def sync_context(self, last_micro_batch: bool):
        self.model.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()


class DeepSpeedStrategy:
    """DeepSpeed ZeRO-2/3 over the existing process group; clipping from `train.grad_clip`, never DS's default."""

    def __init__(self, model: torch.nn.Module, train: TrainConfig, device: torch.device):
        import deepspeed

        per_worker = train.questions_per_batch // train.num_workers
        ds_config = {
            "train_batch_size": train.questions_per_batch,
            "train_micro_batch_size_per_gpu": per_worker // train.grad_accum_steps,
            "gradient_accumulation_steps": train.grad_accum_steps,
            "gradient_clipping": train.grad_clip,
            "zero_optimization": {"stage": train.zero_stage},
            "bf16": {"enabled": device.type == "cuda"},
            "zero_allow_untested_optimizer": True,  # torch's AdamW: same optimizer as the other strategies
            "steps_per_print": 2**31 - 1,
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
        )

    def forward_context(self):
        return contextlib.nullcontext()

    def sync_context(self, last_micro_batch: bool):
        return contextlib.nullcontext()  # the engine counts micro-batches itself

    def backward(self, loss: torch.Tensor) -> None:
        # The engine divides by gradient_accumulation_steps and steps the optimizer on the last micro-batch.
        self.model.backward(loss)
        self.model.step()

    def step(self) -> float:
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save_state(self, directory: Path, rank: int) -> bool:
        self.model.save_checkpoint(str(directory / DEEPSPEED_SUBDIR), tag="state")
        return True  # every rank holds a partition

    def load_state(self, directory: Path) -> None:
        path, _ = self.model.load_checkpoint(str(directory / DEEPSPEED_SUBDIR), tag="state")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {directory / DEEPSPEED_SUBDIR}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        import deepspeed

        # ZeRO-3 holds each parameter in pieces: gather them (collective; a no-op under ZeRO-2).
        module = self.model.module
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {name: tensor.detach().float().cpu().clone() for name, tensor in module.state_dict().items()}


STRATEGIES = {"ddp": DDPStrategy, "fsdp2": FSDP2Strategy, "deepspeed": DeepSpeedStrategy}


# --------------------------------------------------------------------------- the worker loop


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mean_over_workers(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average every metric over the workers (token counts are summed)."""
    names = sorted(metrics)
    values = torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    world = torch.distributed.get_world_size()
    return {n: float(v) if n == "tokens" else float(v) / world for n, v in zip(names, values.tolist())}


def _save_student(strategy, student_in: Path, processor, directory: Path, rank: int) -> None:
    """Gather the full weights and write them (rank 0) as a fresh model of `student_in`'s architecture."""
    from masters.models import load_model, save_model

    state = strategy.full_state_dict()
    if rank == 0:
        model, _ = load_model(student_in, dtype="float32")
        model.load_state_dict(state, strict=True)
        save_model(model, processor, directory / STUDENT_SUBDIR)


def train_worker(loop_config: dict[str, Any]) -> list[dict[str, float]]:
    """Ray Train V2 per-worker loop; returns the metrics of the steps it ran (rank 0's is returned by `fit`)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    config = MastersConfig.model_validate(loop_config["config"])
    train = config.train
    if not train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

    from masters.batching import ShardPlan, StageTable, collate_records
    from masters.models import load_model
    from masters.student_step import needs_reference, step_metrics, student_loss

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if train.use_gpu else torch.device("cpu")
    _seed_everything(train.seed)

    table = StageTable(loop_config["stage_dir"])
    plan = ShardPlan(len(table), train.questions_per_batch, world_size, train.grad_accum_steps, train.seed)
    total_steps = loop_config["max_steps"] or train.epochs * plan.steps_per_epoch

    student_in = Path(loop_config["student_in"])
    student, processor = load_model(student_in, device, dtype="float32")  # float32 master weights
    student.train()
    reference = None
    if needs_reference(config.loss):
        reference, _ = load_model(loop_config["reference"], device, dtype=config.models.dtype)
        reference.requires_grad_(False)
    vocab_size = len(processor.tokenizer)
    pixel_dtype = torch.float32 if not train.use_gpu else torch.bfloat16
    strategy = STRATEGIES[train.strategy](student, train, device)

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            strategy.load_state(Path(directory))
            start_step = json.loads((Path(directory) / PROGRESS_FILE).read_text())["step"]

    def report(step: int, metrics: dict[str, float], final: bool) -> None:
        directory = Path(tempfile.mkdtemp(prefix=f"masters-ckpt-{rank}-"))
        try:
            (directory / PROGRESS_FILE).write_text(json.dumps({"step": step, "total_steps": total_steps}))
            keep = strategy.save_state(directory, rank)
            if final:
                _save_student(strategy, student_in, processor, directory, rank)
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(directory) if keep else None,
                checkpoint_dir_name=f"step_{step:07d}",
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    history = []
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        micro_batches = plan.worker_micro_batches(step, rank)
        sums: dict[str, float] = {}
        for index, questions in enumerate(micro_batches):
            batch = collate_records(table.records(questions), processor).to(device, pixel_dtype)
            last = index == len(micro_batches) - 1
            with strategy.sync_context(last):  # DDP reads it in forward and backward
                with strategy.forward_context():
                    output = student_loss(strategy.model, reference, batch, config.loss, config.rewards, vocab_size)
                strategy.backward(output.loss)
            for name, value in step_metrics(output, batch).items():
                sums[name] = sums.get(name, 0.0) + value
        grad_norm = strategy.step()
        local = {n: v if n == "tokens" else v / len(micro_batches) for n, v in sums.items()}
        local.update(grad_norm=grad_norm, peak_rss_mb=_peak_rss_mb())
        metrics = _mean_over_workers(local, device)
        seconds = time.perf_counter() - started
        metrics.update(step=step + 1, epoch=step // plan.steps_per_epoch, seconds=seconds,
                       tokens_per_s=metrics["tokens"] / seconds)
        history.append(metrics)

        done = step + 1 == total_steps
        periodic = train.checkpoint_every_steps and (step + 1) % train.checkpoint_every_steps == 0
        if done or periodic:
            report(step + 1, metrics, final=done)
        elif (step + 1) % config.logging.log_every_steps == 0:
            ray.train.report(metrics)
    return history


# --------------------------------------------------------------------------- the driver side


def _absolute_storage(storage_path: str) -> str:
    # Ray needs an absolute local path; URIs (s3://, gs://, …) pass through.
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


def train_stage(
    config: MastersConfig,
    stage_dir: str | Path,
    student_in: str | Path,
    reference: str | Path,
    out_dir: str | Path,
    run_name: str,
    storage_path: str | None = None,
    max_steps: int | None = None,
) -> StageTrainResult:
    """Train the student on one stage's records and write it to `out_dir`.

    `student_in` is the previous stage's output (the initial student for the first stage);
    `reference` stays the initial student for the whole run. `max_steps` caps the optimizer steps
    (default: `train.epochs` passes over the stage). Re-running with the same `run_name` and
    `storage_path` (default `config.storage_path`) continues from the run's latest checkpoint.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    for name, path in (("stage_dir", stage_dir), ("student_in", student_in), ("reference", reference)):
        if not Path(path).exists():
            raise FileNotFoundError(f"{name} {str(path)!r} does not exist")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be at least 1 or None (one pass per epoch), got {max_steps}")
    train = config.train
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "stage_dir": str(Path(stage_dir).resolve()),
            "student_in": str(Path(student_in).resolve()),
            "reference": str(Path(reference).resolve()),
            "max_steps": max_steps,
        },
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=_absolute_storage(storage_path or config.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=2),  # the latest is what a resume needs
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        directory = Path(directory)
        steps = json.loads((directory / PROGRESS_FILE).read_text())["step"]
        with atomic_directory(out_dir) as tmp:
            shutil.copytree(directory / STUDENT_SUBDIR, tmp, dirs_exist_ok=True)
    return StageTrainResult(
        metrics=result.return_value or [],
        student_dir=Path(out_dir),
        checkpoint_path=result.checkpoint.path,
        steps=steps,
    )
