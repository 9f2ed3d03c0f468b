"""The run configuration: one pydantic model per part, loaded from YAML with dotted overrides.

Every default is the value in ``docs/method.md`` (the paper's where it states one, ours
otherwise), so ``MastersConfig()`` is the method as published, scaled to the embedded default.
Invalid input raises :class:`ConfigError` naming the field, the bad value and what is allowed,
before anything (Ray included) starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from masters.io import aligned_table


class ConfigError(ValueError):
    """A config that cannot run. The message names each bad field and how to fix it."""


class _Section(BaseModel):
    # Unknown keys are typos, not extensions: reject them so `lr: 1e-4` under the wrong
    # section does not silently fall back to the default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(_Section):
    name: str = Field(description="Short id used in model ids (`<name>@<ratio>`) and run paths.")
    model: str = Field(description="`zoo:<role>` for the embedded family, or a Hugging Face model directory.")
    iteration_weight: float = Field(
        1.0, gt=0, description="Share of the training iterations this teacher gets, relative to the others."
    )

    @field_validator("name")
    @classmethod
    def _name_is_an_id(cls, name: str) -> str:
        if not name or any(c in name for c in "@/ \t"):
            raise ValueError("must be non-empty and contain no '@', '/' or whitespace (it becomes part of model ids)")
        return name


class ModelsConfig(_Section):
    teachers: list[TeacherConfig] = Field(
        default_factory=lambda: [
            TeacherConfig(name="teacher-m", model="zoo:teacher-m"),
            TeacherConfig(name="teacher-l", model="zoo:teacher-l"),
        ],
        description="The teacher chain in training order: mid-size first, then the large one (paper).",
    )
    student: str = Field("zoo:student", description="The initial student: `zoo:<role>` or a Hugging Face directory.")
    zoo_dir: str = Field(
        ".cache/zoo", description="Where `zoo:` models are built and cached (relative paths are from the CWD)."
    )
    zoo_config: str | None = Field(
        None, description="YAML file of the zoo to build/use for `zoo:` refs (jobs/build_zoo.py); None = the built-in default."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype: `auto` is float32 on CPU and bfloat16 on GPU."
    )

    @field_validator("teachers")
    @classmethod
    def _unique_teachers(cls, teachers: list[TeacherConfig]) -> list[TeacherConfig]:
        if not teachers:
            raise ValueError("needs at least one teacher")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        return teachers


class MaskConfig(_Section):
    max_mask_ratio: float = Field(
        0.2, ge=0, lt=1, description="r_max: fraction of each tensor zeroed in the first stage (paper: 0.2)."
    )
    mask_step: float = Field(0.05, gt=0, le=1, description="s: how much the ratio drops per stage (paper: 0.05).")
    scope: Literal["all_linear", "language_model", "vision_and_projector"] = Field(
        "all_linear",
        description="Which 2-D nn.Linear weights are masked; embeddings, LM head, norms and biases never are.",
    )

    @model_validator(mode="after")
    def _step_divides_ratio(self) -> MaskConfig:
        stages = self.max_mask_ratio / self.mask_step
        if self.max_mask_ratio > 0 and abs(stages - round(stages)) > 1e-6:
            raise ValueError(
                f"mask.max_mask_ratio ({self.max_mask_ratio}) must be a whole multiple of "
                f"mask.mask_step ({self.mask_step}) so the last stage is exactly 0"
            )
        return self

    @property
    def num_stages(self) -> int:
        """M = r_max / s + 1; a single unmasked stage when r_max is 0 (the naive baseline)."""
        return round(self.max_mask_ratio / self.mask_step) + 1

    @property
    def ratios(self) -> list[float]:
        """Stage k uses r_max - k*s, rounded so ids like `teacher-l@0.15` are stable; the last is 0."""
        # + 0.0 turns the -0.0 that float rounding leaves at the end (0.3 - 6 × 0.05) into 0.0 ("@0", not "@-0").
        return [round(self.max_mask_ratio - k * self.mask_step, 6) + 0.0 for k in range(self.num_stages)]


class SamplingConfig(_Section):
    temperature: float = Field(1.0, ge=0, description="0 means greedy.")
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(50, ge=0, description="0 disables top-k filtering.")
    repetition_penalty: float = Field(1.05, gt=0)
    max_new_tokens: int = Field(16, ge=1, description="Answers in the suite are short; real recipes raise this.")


class GenerationConfig(_Section):
    group_teacher: int = Field(
        4,
        ge=0,
        description="Teacher responses in a training group (paper: 4 of G=8); each masked teacher level samples exactly "
        "these per question: a response no group uses is not generated.",
    )
    group_student: int = Field(
        4,
        ge=0,
        description="Student responses in a training group (paper: 4 of G=8); the initial student pre-generates exactly "
        "these per question.",
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    seed: int = Field(0, description="Base seed; each request's seed is derived from it and the question id.")
    teacher_topk: int = Field(
        64, ge=1, description="k of the stored teacher top-k log-probs per token (plus one tail bucket)."
    )
    questions_per_task: int = Field(
        16,
        ge=1,
        description="Questions a sampling task of the pipeline reads and sends to the service at once (a Ray Data "
        "block); an execution knob, records do not depend on it.",
    )
    teacher_logprobs_dtype: Literal["float16", "float32"] = Field(
        "float16",
        description=(
            "How stage records store the teacher's top-k log-probs and tail mass. float16 (within 0.004 nats of "
            "float32 for log-probs above -16) halves them, and they are most of a stage's bytes at top-64 "
            "(docs/cluster.md, capacity); float32 keeps the engine's values exactly."
        ),
    )

    @model_validator(mode="after")
    def _group_fits(self) -> GenerationConfig:
        if self.group_teacher + self.group_student < 1:
            raise ValueError("generation.group_teacher + generation.group_student must be at least 1")
        return self

    @property
    def group_size(self) -> int:
        return self.group_teacher + self.group_student


class JudgeConfig(_Section):
    kind: Literal["rule", "llm"] = Field(
        "rule", description="`rule`: VQA-normalised exact match (short exact answers); `llm`: an OpenAI-compatible judge."
    )
    endpoint: str | None = Field(
        None, description="Base URL of the judge (…/v1). None with `llm` means our own unmasked teacher endpoint."
    )
    model: str | None = Field(None, description="Judge model id; None means the last teacher at ratio 0.")
    api_key_env: str | None = Field(None, description="Environment variable holding the judge's bearer token.")
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(3, ge=0, description="Retries with exponential backoff on timeouts and 5xx.")
    on_failure: Literal["fail_stage", "drop_group"] = Field(
        "fail_stage", description="What an unrecoverable judge failure does; failures are never scored 0."
    )
    numeric_tolerance: float = Field(1e-6, ge=0, description="Relative tolerance of the rule judge for numbers.")


class RewardConfig(_Section):
    use_accuracy: bool = Field(True, description="Add R_acc (paper).")
    use_distill: bool = Field(True, description="Add R_distill (paper).")
    normalize_distill: bool = Field(True, description="Reverse min-max inside the group (paper); off = raw -D.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    actors: int = Field(1, ge=1, description="Size of the reward actor pool.")
    actor_num_cpus: float = Field(0.25, gt=0, description="CPUs per reward actor (fractional keeps room for Train).")
    batch_size: int = Field(8, ge=1, description="Groups per reward-actor batch.")
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per reward actor, e.g. {reward_node: 1}."
    )


class LossConfig(_Section):
    objective: Literal["sft", "naive", "mask_progressive", "full"] = Field(
        "full",
        description="sft: next-token loss on the dataset answers (the supervised baseline, no teacher); naive: JSD "
        "on dataset answers from the unmasked teacher; mask_progressive: JSD on generated responses under the mask "
        "schedule; full: + GRPO with rewards (Masters).",
    )
    grpo_weight: float = Field(1.0, ge=0, description="Weight of L_GRPO (paper: 1).")
    jsd_weight: float = Field(1.0, ge=0, description="Weight of L_JSD (paper: 1).")
    kl_beta: float = Field(0.1, ge=0, description="β of the k3 KL to the frozen initial student (paper: 0.1).")
    advantage_eps: float = Field(1e-4, gt=0, description="ε in A = (R - mean) / (std + ε).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the JSD.")

    @property
    def on_dataset_responses(self) -> bool:
        """sft and naive train on the dataset's answers (one per question), the others on sampled responses."""
        return self.objective in ("sft", "naive")

    chunk_tokens: int | None = Field(
        1024,
        ge=1,
        description=(
            "Response tokens of a micro-batch whose vocabulary-sized logits exist at once: the LM head, log-softmax "
            "and per-token terms run a chunk at a time (recomputed in backward), so the loss's memory does not grow "
            "with responses x tokens x vocabulary. None computes all logits at once (same loss; docs/objective.md)."
        ),
    )


class TrainConfig(_Section):
    strategy: Literal["ddp", "fsdp2", "deepspeed"] = Field("ddp", description="How Ray Train shards the student.")
    zero_stage: Literal[2, 3] = Field(3, description="DeepSpeed ZeRO stage when strategy is deepspeed.")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = Field(False, description="GPU workers with NCCL and bf16; CPU workers use gloo and float32.")
    cpus_per_worker: float = Field(
        0.25, gt=0, description="Logical CPUs per worker; small by default so Serve, rewards and Train fit on 2 cores."
    )
    lr: float = Field(1e-6, gt=0, description="AdamW constant learning rate (paper: 1e-6 at 2B-8B; tiny models need more).")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0, description="Set explicitly: DeepSpeed would otherwise apply its own default.")
    questions_per_batch: int = Field(4, ge=1, description="Questions (groups) per optimizer update across all workers.")
    grad_accum_steps: int = Field(1, ge=1)
    epochs: int = Field(1, ge=1, description="Passes over each stage's chunk.")
    iterations: int | None = Field(
        None, ge=1, description="Total optimizer updates over the whole chain; None = one pass over the train split."
    )
    checkpoint_every_steps: int = Field(0, ge=0, description="0 = only at the end of each stage.")
    max_failures: int = Field(
        2, ge=0, description="Times Ray Train restarts the workers from the latest checkpoint after one dies."
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per training worker, e.g. {trainer_node: 1}."
    )
    seed: int = Field(0)


class ServeConfig(_Section):
    engine: Literal["transformers", "vllm"] = Field("transformers", description="vLLM needs a GPU and the `gpu` extra.")
    host: str = Field("127.0.0.1", description="Bind address; loopback unless you mean to expose the teachers.")
    port: int = Field(8000, ge=1, le=65535)
    api_key_env: str | None = Field(None, description="Environment variable whose value clients must send as a bearer token.")
    replicas: int = Field(1, ge=1, description="Replicas per model (ignored when autoscaling is set).")
    min_replicas: int | None = Field(None, ge=0, description="Set both min and max to autoscale replicas.")
    max_replicas: int | None = Field(None, ge=1)
    num_cpus: float = Field(0.25, gt=0, description="Logical CPUs per replica (small so every part fits on 2 cores).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM only.")
    max_batch_size: int = Field(16, ge=1, description="Requests in one engine batch (in-cluster calls carry at most one).")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a batch waits to fill.")
    # Serve's options: one batch running and the next filling; then the autoscaling target.
    max_ongoing_requests: int = Field(32, ge=1, description="Requests a replica holds at once.")
    target_ongoing_requests: int = Field(16, ge=1, description="Autoscaling target per replica.")
    max_queued_requests: int = Field(64, ge=1, description="Beyond this the service answers 503 instead of queueing.")
    max_n: int = Field(16, ge=1, description="Largest `n` (samples) a chat request may ask for.")
    max_score_items: int = Field(16, ge=1, description="Most responses a request may score (/v1/score items, score_token_ids).")
    max_tokens_limit: int = Field(256, ge=1, description="Largest `max_tokens` a request may ask for.")
    max_image_bytes: int = Field(4_000_000, ge=1)
    max_image_pixels: int = Field(4_000_000, ge=1, description="Decompression-bomb guard.")
    allow_local_images: bool = Field(False, description="Accept image paths on the server's disk (trusted clients only).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per replica, e.g. {teacher_node: 1} to pin teachers to GPU nodes."
    )

    @model_validator(mode="after")
    def _autoscaling_pair(self) -> ServeConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"serve.max_ongoing_requests ({self.max_ongoing_requests}) must be at least serve.max_batch_size "
                f"({self.max_batch_size}), or a replica's batches never fill"
            )
        if self.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(
                f"serve.target_ongoing_requests ({self.target_ongoing_requests}) must be at most "
                f"serve.max_ongoing_requests ({self.max_ongoing_requests}), or autoscaling never reaches its target"
            )
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("serve.min_replicas and serve.max_replicas must be set together to autoscale")
        if self.min_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError("serve.max_replicas must be >= serve.min_replicas")
        return self


class DataConfig(_Section):
    dataset: str = Field("suite", description="`suite` (the generated VQA suite) or a Parquet file/directory of the same schema.")
    train_size: int = Field(512, ge=1, description="Questions drawn from the train split.")
    val_size: int = Field(128, ge=1)
    test_size: int = Field(256, ge=1)
    seed: int = Field(0, description="Seed of the generated suite and of the stage shuffle.")
    families: list[str] | None = Field(None, description="Restrict to these task families; None = all.")


class LoggingConfig(_Section):
    wandb_project: str | None = Field("masters", description="None disables wandb.")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="None: online when WANDB_API_KEY is set, offline otherwise."
    )
    log_every_steps: int = Field(
        10,
        ge=1,
        description=(
            "Report step metrics to Ray Train every this many updates (and with every checkpoint). Ray Train "
            "collects reports on a 2 s poll and a worker's next report waits for the previous one, so "
            "reporting faster than that slows fast steps down."
        ),
    )


class MastersConfig(_Section):
    name: str = Field("default", description="Run name: results land in `<storage_path>/<name>/`; rerun to resume.")
    storage_path: str = Field(
        "runs", description="Directory of the runs; on a cluster, a read-write file system every node mounts at this path."
    )
    records_path: str | None = Field(
        None,
        description=(
            "Where stage records and the initial student's responses are written; None = inside the run directory. "
            "A record's directory is named by what produced it, so runs given the same records_path share every "
            "record their configs would generate alike (jobs/ablate.py points all rungs of a ladder at one)."
        ),
    )
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    rewards: RewardConfig = Field(default_factory=RewardConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_dir(cls, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ValueError("must be a plain directory name (no '/', not starting with '.')")
        return name

    @field_validator("storage_path")
    @classmethod
    def _storage_is_a_path(cls, storage_path: str) -> str:
        # The driver, the reward pipeline and the trainer all read and write the run directory with
        # ordinary file I/O, so an object-store URI would silently become a local directory.
        if "://" in storage_path:
            raise ValueError(
                "must be a directory path, not a URI: mount the bucket or network file system on every node "
                "(NFS/EFS, FSx, a FUSE mount such as mountpoint-s3) and give its path, e.g. /mnt/runs"
            )
        return storage_path

    @model_validator(mode="after")
    def _dataset_responses_are_unmasked(self) -> MastersConfig:
        if self.loss.on_dataset_responses and self.mask.max_mask_ratio != 0:
            raise ValueError(
                f"loss.objective {self.loss.objective!r} trains on the dataset answers, scored by the unmasked "
                "teacher: set mask.max_mask_ratio=0 (or choose loss.objective=mask_progressive|full)"
            )
        return self

    @model_validator(mode="after")
    def _groups_fit_the_service(self) -> MastersConfig:
        # One chat request per question and model draws its group's samples, and the teacher's request
        # also scores the student's responses (score_token_ids): the service must allow both.
        generation, serve = self.generation, self.serve
        for field in ("group_teacher", "group_student"):
            if getattr(generation, field) > serve.max_n:
                raise ValueError(
                    f"generation.{field} ({getattr(generation, field)}) is more samples than one request may ask for "
                    f"(serve.max_n={serve.max_n}); raise serve.max_n"
                )
        if generation.group_teacher and generation.group_student > serve.max_score_items:
            raise ValueError(
                f"generation.group_student ({generation.group_student}) responses are scored in the teacher's request, "
                f"more than serve.max_score_items={serve.max_score_items} allows; raise serve.max_score_items"
            )
        return self


# --------------------------------------------------------------------------- loading


def format_validation_error(error: ValidationError, root: str = "") -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or root or "(config)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; check the spelling or the section it belongs to"
        elif item["type"] == "literal_error":
            message = f"{message}"
        got = item.get("input")
        shown = "" if isinstance(got, dict) or item["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  {where}: {message}{shown}")
    return "invalid config:\n" + "\n".join(lines) + "\nSee `--print-config` for the resolved config with every field."


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `a.b.c=value` strings into a nested dict; values are parsed as YAML (`1e-4`, `true`, `[a, b]`)."""
    nested: dict[str, Any] = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {override!r} must look like `section.field=value`, e.g. `train.lr=1e-4`")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r} sets a field inside {part!r}, which is not a section")
        node[leaf] = value
    return nested


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def relative_paths(config: MastersConfig) -> dict[str, str]:
    """The config's file-system paths that are relative, by field name (`suite` and `zoo:` refs are not paths).

    Every node reads and writes these; a relative one means "from this process's working directory",
    which is only the user's directory when the driver runs where they typed the command.
    """
    paths = {"storage_path": config.storage_path, "models.zoo_dir": config.models.zoo_dir}
    if config.records_path is not None:
        paths["records_path"] = config.records_path
    if config.data.dataset != "suite":
        paths["data.dataset"] = config.data.dataset
    for index, teacher in enumerate(config.models.teachers):
        paths[f"models.teachers[{index}].model"] = teacher.model
    paths["models.student"] = config.models.student
    return {field: path for field, path in paths.items() if not path.startswith("zoo:") and not Path(path).is_absolute()}


def load_config(
    paths: str | Path | Sequence[str | Path] | None = None, overrides: list[str] | None = None
) -> MastersConfig:
    """The run config from YAML files, each overriding the ones before it, plus `section.field=value` overrides.

    Layering is how an ablation is written: `--config configs/default.yaml --config configs/ablations/naive.yaml`
    is the embedded default with the naive objective (a list, such as `models.teachers`, is replaced whole).
    """
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    raw: dict[str, Any] = {}
    for path in paths:
        raw = _deep_merge(raw, read_yaml_mapping(path, "config file"))
    return validate_config(_deep_merge(raw, parse_overrides(overrides or [])))


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; `what` names it in errors ("config file", "zoo config file")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist; pass an existing YAML file to --config")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping, got {type(raw).__name__}")
    return raw


def validate_config(raw: dict[str, Any]) -> MastersConfig:
    try:
        return MastersConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def ratio_label(mask_ratio: float) -> str:
    """The text form of a ratio in directory names and model ids: 0.2 → '0.2', 0.15 → '0.15', 0 → '0'."""
    return f"{round(mask_ratio, 6):g}"


def isclose_ratio(a: float, b: float) -> bool:
    """Mask ratios arrive as floats from URLs and YAML; compare them at the precision ids use."""
    return math.isclose(a, b, abs_tol=1e-6)


def format_resources(config: MastersConfig) -> str:
    """What each part of a run asks Ray for (the autoscaler provides nodes to match), as a table."""
    serve, train, rewards = config.serve, config.train, config.rewards
    models = len(config.models.teachers) + 1
    replicas = serve.max_replicas if serve.max_replicas is not None else serve.replicas
    rows = [
        ("part", "count", "per unit", "custom resources"),
        (
            f"teacher service ({serve.engine})",
            f"{models} models x {replicas} replicas",
            f"{serve.num_cpus} CPU, {serve.num_gpus} GPU, TP {serve.tensor_parallel_size}",
            str(serve.resources or "-"),
        ),
        ("reward actors", str(rewards.actors), f"{rewards.actor_num_cpus} CPU", str(rewards.actor_resources or "-")),
        (
            f"trainer ({train.strategy}{'-zero' + str(train.zero_stage) if train.strategy == 'deepspeed' else ''})",
            f"{train.num_workers} workers",
            f"{train.cpus_per_worker} CPU, {1 if train.use_gpu else 0} GPU",
            str(train.resources_per_worker or "-"),
        ),
    ]
    return aligned_table(rows)
