"""The student trainer: the whole curriculum in one Ray Train V2 run (`TorchTrainer`), DDP | FSDP2 | DeepSpeed.

Each worker holds the student and, for the ``full`` objective, the frozen reference (the initial
student); teachers never enter the trainer, their top-k log-probs come with the stage records.
The workers go through the stages in plan order. A stage's records come from the driver, which
generates them ahead of the trainer: a `cluster.curriculum.StageHandoff` says when a stage's directory
is written.
Workers read the stage's Parquet files, take their deterministic shard (:class:`ShardPlan`), and
make one optimizer update per batch of `train.questions_per_batch` questions, accumulating
`train.grad_accum_steps` micro-batches. The loss is :func:`masters.student_loss.student_loss`, the
same code the single-process baseline in ``benchmarks/train.py`` runs. One optimizer runs through
all stages, as in one long training run whose data changes at the stage boundaries.

One `fit()` for the curriculum, not one per stage: a `fit()` costs tens of seconds of start-up
(worker processes, imports, model loading, process group) that a stage of a few updates would pay
again and again (docs/benchmarks.md).

Checkpoints (weights + optimizer state + position) are reported every `train.checkpoint_every_steps`
updates and at the end of every stage; a stage's last one also holds the gathered student in
Hugging Face format (``student/``), which rank 0 then publishes to the stage's `out_dir` with the
stage's metrics (`masters.run_layout.STAGE_RESULT`) and tells the `StageHandoff`. Re-running with the same `run_name` and `storage_path`
resumes from the run's latest checkpoint (Ray Train V2 restores it): finished stages are skipped,
an interrupted stage goes on from its last checkpoint, and a finished stage whose outputs were not
published yet (the driver died in between) is published from its checkpoint.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import ray
import torch

from masters.config import MastersConfig, TrainConfig
from masters.io import atomic_directory, atomic_write_json
from masters.run_layout import STAGE_RESULT, STAGE_STUDENT, checkpoint_name

# Inside a trainer checkpoint, next to the stage's student (STAGE_STUDENT) at a stage's end.
TRAIN_STATE_FILE = "train_state.pt"  # ddp / fsdp2: full model + optimizer state, written by rank 0
DEEPSPEED_SUBDIR = "deepspeed"  # deepspeed: one partition per rank, merged by Ray into one directory
PROGRESS_FILE = "progress.json"  # `TrainerProgress`: which stages are done, where the current one is


@dataclass(frozen=True)
class TrainingStage:
    """One stage as the trainer sees it."""

    stage_id: str  # e.g. `teacher-l/2`
    steps: int  # optimizer updates
    out_dir: str  # where the stage's student and metrics are published


@dataclass
class StageTrainResult:
    """A finished stage, read back from its `out_dir`."""

    stage_id: str
    metrics: list[dict[str, float]]  # one entry per optimizer step of the stage
    student_dir: Path  # loadable with AutoModelForImageTextToText + AutoProcessor
    steps: int
    checkpoint: str | None  # the stage's end checkpoint in the Ray run's storage (weights and optimizer state)

    @classmethod
    def read(cls, out_dir: str | Path) -> StageTrainResult | None:
        """The published result in `out_dir`, or None while the stage is not finished."""
        path = Path(out_dir) / STAGE_RESULT
        if not path.is_file():
            return None
        result = json.loads(path.read_text())
        return cls(result["stage_id"], result["metrics"], Path(out_dir) / STAGE_STUDENT, result["steps"], result.get("checkpoint"))


@dataclass
class TrainerProgress:
    """Where the trainer is, saved in every checkpoint: the stages finished, and the stage under way
    with its updates so far and their metrics."""

    completed: list[str] = field(default_factory=list)
    stage_id: str | None = None  # the stage under way; None between stages
    step: int = 0  # updates of `stage_id` done
    metrics: list[dict[str, float]] = field(default_factory=list)  # one entry per update of the stage

    @classmethod
    def load(cls, directory: Path) -> TrainerProgress:
        return cls(**json.loads((directory / PROGRESS_FILE).read_text()))

    def save(self, directory: Path) -> None:
        (directory / PROGRESS_FILE).write_text(json.dumps(asdict(self)))

    def after(self, stage_id: str, metrics: list[dict[str, float]], finished: bool) -> TrainerProgress:
        """The progress once the stage's latest update (the last of `metrics`) is done."""
        if finished:
            return TrainerProgress(self.completed + [stage_id], None, 0, metrics)
        return TrainerProgress(self.completed, stage_id, metrics[-1]["step"], metrics)


# --------------------------------------------------------------------------- strategies


class TrainingStrategy(Protocol):
    """How the student is wrapped, updated and checkpointed (DDP, FSDP2, DeepSpeed).

    One optimizer step is `train.grad_accum_steps` micro-batches, each `accumulate`d under
    `sync_context(last)` and `forward_context()`, then `update()`.
    """

    model: torch.nn.Module  # the wrapped model the loss is computed with

    def forward_context(self): ...

    def sync_context(self, last_micro_batch: bool): ...

    def accumulate(self, loss: torch.Tensor) -> None:
        """Add one micro-batch's gradients."""

    def update(self) -> float:
        """End the optimizer step: clip, step, zero the gradients; returns the gradient norm."""

    def save_state(self, directory: Path, rank: int) -> bool:
        """Write the training state; True when this rank's directory must be reported."""

    def load_state(self, directory: Path) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded weights on CPU (complete on rank 0; collective, so every rank calls it)."""


class _TorchStrategy:
    """What DDP and FSDP2 share: torch AdamW and clipping, full-state checkpoints written by rank 0."""

    model: torch.nn.Module  # the wrapped model the loss is computed with

    def __init__(self, model: torch.nn.Module, train: TrainConfig):
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        self.grad_clip = train.grad_clip
        self.accum = train.grad_accum_steps

    def forward_context(self):
        return contextlib.nullcontext()

    def accumulate(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def update(self) -> float:
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

    def accumulate(self, loss: torch.Tensor) -> None:
        # DeepSpeed's engine wants `step()` after every micro-batch: it divides by the accumulation
        # steps, counts the micro-batches and updates (clip, step, zero) on the last one itself.
        self.model.backward(loss)
        self.model.step()

    def update(self) -> float:
        # The engine has updated in the last `accumulate`; what is left is its gradient norm.
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


STRATEGIES: dict[str, type[TrainingStrategy]] = {"ddp": DDPStrategy, "fsdp2": FSDP2Strategy, "deepspeed": DeepSpeedStrategy}


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
        save_model(model, processor, directory / STAGE_STUDENT)


def _publish_stage(checkpoint_dir: Path, stage: TrainingStage, metrics: list[dict[str, float]], persisted: Path) -> None:
    """Copy a stage-end checkpoint's student to the stage's out_dir, then its metrics and where Ray persisted
    the checkpoint (the 'done' signal)."""
    out_dir = Path(stage.out_dir)
    with atomic_directory(out_dir / STAGE_STUDENT) as tmp:
        shutil.copytree(checkpoint_dir / STAGE_STUDENT, tmp, dirs_exist_ok=True)
    atomic_write_json(
        out_dir / STAGE_RESULT,
        {"stage_id": stage.stage_id, "steps": stage.steps, "metrics": metrics, "checkpoint": str(persisted)},
    )


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train V2 per-worker loop over the curriculum's stages."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    config = MastersConfig.model_validate(loop_config["config"])
    train = config.train
    if not train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

    from masters.batching import ShardPlan, StageTable, collate_records
    from masters.families import VLMFamily
    from masters.models import load_model
    from masters.student_loss import needs_reference, step_metrics, student_loss

    stages = [TrainingStage(**stage) for stage in loop_config["stages"]]
    handoff = loop_config["handoff"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if train.use_gpu else torch.device("cpu")
    _seed_everything(train.seed)

    student_in = Path(loop_config["student_in"])
    student, processor = load_model(student_in, device, dtype="float32")  # float32 master weights
    student.train()
    family = VLMFamily(student, processor)
    reference = None
    if needs_reference(config.loss):
        reference, _ = load_model(loop_config["reference"], device, dtype=config.models.dtype)
        reference.requires_grad_(False)
    vocab_size = len(processor.tokenizer)
    pixel_dtype = torch.float32 if not train.use_gpu else torch.bfloat16
    strategy = STRATEGIES[train.strategy](student, train, device)

    progress = TrainerProgress()

    def restore(directory: Path) -> TrainerProgress:
        strategy.load_state(directory)
        return TrainerProgress.load(directory)

    def publish(stage: TrainingStage, checkpoint_dir: Path, metrics: list[dict[str, float]], persisted: Path) -> None:
        _publish_stage(checkpoint_dir, stage, metrics, persisted)
        ray.get(handoff.trained.remote(stage.stage_id))  # delivered before this worker can be torn down

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            progress = restore(Path(directory))
            last_done = next((s for s in stages if progress.completed and s.stage_id == progress.completed[-1]), None)
            if rank == 0 and progress.stage_id is None and last_done and StageTrainResult.read(last_done.out_dir) is None:
                publish(last_done, Path(directory), progress.metrics, Path(checkpoint.path))
    finished = StageTrainResult.read(loop_config["finished_stage_dir"]) if loop_config["finished_stage_dir"] else None
    if finished is not None and finished.stage_id not in progress.completed:
        # Ray's latest checkpoint predates the stage the driver already took as finished (a kill between
        # the stage's publication and Ray recording its checkpoint), or Ray's run is gone: continue from
        # that stage's own end checkpoint, weights and optimizer state, as the uninterrupted run does.
        if finished.checkpoint is not None and Path(finished.checkpoint).is_dir():
            progress = restore(Path(finished.checkpoint))
        elif checkpoint is not None:
            raise RuntimeError(
                f"the trainer's latest checkpoint predates stage {finished.stage_id}, whose own end checkpoint "
                f"{finished.checkpoint!r} is gone; restore it, or start a new run (--set name=...)"
            )
        # No checkpoint at all (the run's ray_train directory was removed): from the stage's student, fresh AdamW.

    def report(metrics: dict[str, float], stage: TrainingStage, stage_metrics: list, final: bool) -> TrainerProgress:
        directory = Path(tempfile.mkdtemp(prefix=f"masters-ckpt-{rank}-"))
        try:
            position = progress.after(stage.stage_id, stage_metrics, final)
            position.save(directory)
            keep = strategy.save_state(directory, rank)
            if final:
                _save_student(strategy, student_in, processor, directory, rank)
            name = checkpoint_name(stage.stage_id, None if final else position.step)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory) if keep else None, checkpoint_dir_name=name)
            # Published only once the checkpoint is persisted, so a published stage is never trained again.
            if final and rank == 0:
                publish(stage, directory, stage_metrics, Path(loop_config["checkpoint_root"]) / name)
            return position
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    for stage in stages:
        if stage.stage_id in progress.completed:
            continue
        resuming = stage.stage_id == progress.stage_id
        first_step, stage_metrics = (progress.step, list(progress.metrics)) if resuming else (0, [])
        table = StageTable(ray.get(handoff.records.remote(stage.stage_id)))
        plan = ShardPlan(len(table), train.questions_per_batch, world_size, train.grad_accum_steps, train.seed)
        for step in range(first_step, stage.steps):
            started = time.perf_counter()
            micro_batches = plan.worker_micro_batches(step, rank)
            done = step + 1 == stage.steps
            periodic = train.checkpoint_every_steps and (step + 1) % train.checkpoint_every_steps == 0
            logged = done or periodic or (step + 1) % config.logging.log_every_steps == 0
            sums: dict[str, float] = {}
            for index, questions in enumerate(micro_batches):
                batch = collate_records(table.records(questions), family).to(device, pixel_dtype)
                last = index == len(micro_batches) - 1
                with strategy.sync_context(last):  # DDP reads it in forward and backward
                    with strategy.forward_context():
                        # A step that is reported also measures how the loss terms pull the student.
                        output = student_loss(
                            strategy.model, reference, batch, config.loss, config.rewards, vocab_size, diagnose=logged
                        )
                    strategy.accumulate(output.loss)
                for name, value in step_metrics(output, batch).items():
                    sums[name] = sums.get(name, 0.0) + value
            grad_norm = strategy.update()
            local = {n: v if n == "tokens" else v / len(micro_batches) for n, v in sums.items()}
            local.update(grad_norm=grad_norm, peak_rss_mb=_peak_rss_mb())
            metrics = _mean_over_workers(local, device)
            seconds = time.perf_counter() - started
            metrics.update(step=step + 1, epoch=step // plan.steps_per_epoch, seconds=seconds,
                           tokens_per_s=metrics["tokens"] / seconds)  # fmt: skip
            stage_metrics.append(metrics)

            if done or periodic:
                progress = report(metrics, stage, stage_metrics, final=done)
            elif logged:
                ray.train.report(metrics)


# --------------------------------------------------------------------------- the driver side


def train_curriculum(
    config: MastersConfig,
    stages: list[TrainingStage],
    handoff: ray.actor.ActorHandle,
    student_in: str | Path,
    reference: str | Path,
    run_name: str,
    storage_path: str | None = None,
    finished_stage_dir: str | Path | None = None,
) -> list[StageTrainResult]:
    """Train the student through `stages` in order in one `fit()`; returns every stage's published result.

    `student_in` is where training starts (the initial student, or the last finished stage's output
    when the run's checkpoints are gone); `reference` stays the initial student for the whole run.
    Stage records come through `handoff` (a `cluster.curriculum.StageHandoff`), which also hears of each published stage. Re-running with the same `run_name` and
    `storage_path` (default `config.storage_path`) continues from the run's latest checkpoint, or,
    when that predates the stage published in `finished_stage_dir` (the last stage the caller already
    took as finished), from that stage's own end checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    for name, path in (("student_in", student_in), ("reference", reference)):
        if not Path(path).exists():
            raise FileNotFoundError(f"{name} {str(path)!r} does not exist")
    for stage in stages:
        if stage.steps < 1:
            raise ValueError(f"stage {stage.stage_id!r} has {stage.steps} optimizer steps; it needs at least 1")
    train = config.train
    storage = Path(storage_path or config.storage_path).resolve()  # Ray wants it absolute
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            # Absolute: the workers' working directory is not the driver's.
            "stages": [{**asdict(stage), "out_dir": str(Path(stage.out_dir).resolve())} for stage in stages],
            "handoff": handoff,
            "student_in": str(Path(student_in).resolve()),
            "reference": str(Path(reference).resolve()),
            "finished_stage_dir": str(Path(finished_stage_dir).resolve()) if finished_stage_dir else None,
            "checkpoint_root": str(storage / run_name),  # where Ray persists this run's checkpoints
        },
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={
                "CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {}), **train.resources_per_worker
            },
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),  # the latest is what a resume needs
            # A dead worker restarts the group from the latest checkpoint: nothing trained twice.
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
    )
    trainer.fit()
    results = [StageTrainResult.read(stage.out_dir) for stage in stages]
    missing = [stage.stage_id for stage, result in zip(stages, results) if result is None]
    if missing:
        raise RuntimeError(f"training run {run_name!r} finished without publishing stages {missing}")
    return results
