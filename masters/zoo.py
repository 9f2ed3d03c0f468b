"""The tiny VLM family ("zoo"): a large teacher, a mid teacher and a weaker initial student, trained on the suite.

Builds are cached under `<zoo_dir>/<key>/<role>/` in Hugging Face format, where `key` hashes the zoo
config and the suite version. The whole `<key>/` directory (roles + manifest) is written to a temp
directory and renamed into place at the end, so an interrupted build leaves nothing a reader uses.
The rest of the system names models `zoo:<role>` (see `resolve_model`) or by any HF directory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from masters.config import ConfigError, format_validation_error, read_yaml_mapping
from masters.data import CAPTION_QUESTION, SUITE_VERSION, describe, make_split, text_corpus
from masters.eval import evaluate
from masters.families import VLMFamily, model_parts
from masters.io import atomic_directory, atomic_write_json, json_digest
from masters.models import parameter_count, save_model
from masters.sft import encode_examples, train_sft
from masters.tiny_vlms import Architecture, ModelSize, build_model, build_processor, train_tokenizer

ROLES = ("teacher-l", "teacher-m", "student")
MANIFEST = "manifest.json"
ZOO_PREFIX = "zoo:"


class RoleConfig(BaseModel):
    """One model of the zoo: its shape and its training recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: ModelSize
    steps: int = Field(ge=1, description="AdamW updates.")
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0, description="Peak learning rate (linear warm-up, then cosine to 10%).")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = Field(0, description="Initialisation and batch-order seed.")
    freeze_vision: bool = Field(
        True,
        description=(
            "Keep the vision tower and projector at their random initialisation and train the language model "
            "to read them. Trained jointly from scratch, the tower's output collapses within a few steps to an "
            "image-independent constant (random image features are noise to an untrained language model, and "
            "the gradient removes them), and the model never looks at the image again; fixed random features "
            "keep the image's content, so the language model learns to use them (docs/zoo.md)."
        ),
    )


def _default_roles() -> dict[str, RoleConfig]:
    # Chosen on 2 CPU cores (docs/zoo.md) for a ladder teacher-l > teacher-m > student within a
    # 20-minute build: teacher-m stops gaining after ~300 steps, teacher-l still gains at 900. 48-pixel images in 8-pixel patches (36 image
    # tokens) read the scenes about as well as 64-pixel ones (64 tokens) at 60% of the cost.
    vision = dict(vision_layers=2, image_size=48, patch_size=8)
    sizes = {
        "teacher-l": ModelSize(text_hidden_size=256, text_layers=4, text_heads=4, text_intermediate_size=704,
                               vision_hidden_size=128, vision_heads=4, vision_intermediate_size=256, **vision),
        "teacher-m": ModelSize(text_hidden_size=128, text_layers=3, text_heads=4, text_intermediate_size=352,
                               vision_hidden_size=96, vision_heads=4, vision_intermediate_size=192, **vision),
        "student": ModelSize(text_hidden_size=96, text_layers=2, text_heads=4, text_intermediate_size=256,
                             vision_hidden_size=64, vision_heads=2, vision_intermediate_size=128, **vision),
    }  # fmt: skip
    recipes = {
        "teacher-l": dict(steps=900, lr=1e-3, warmup_steps=30),
        "teacher-m": dict(steps=300, lr=2e-3, warmup_steps=30),
        "student": dict(steps=120, lr=2e-3, warmup_steps=15),
    }
    return {role: RoleConfig(size=sizes[role], batch_size=32, **recipes[role]) for role in ROLES}


class ZooConfig(BaseModel):
    """What `build_zoo` trains; its hash (with the suite version) is the cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Architecture = Field(
        "llava",
        description=(
            "The transformers family every role is built as (masters/tiny_vlms.py): llava, qwen2_5_vl, qwen3_vl, "
            "internvl, gemma3 or idefics3. The default zoo is LLaVA; the others run the same code paths as the "
            "real checkpoints of that family (docs/models.md)."
        ),
    )
    seed: int = Field(0, description="Seed of the generated suite splits and of the tokenizer corpus.")
    vocab_size: int = Field(512, ge=64, description="Size of the shared byte-level BPE vocabulary.")
    tokenizer_corpus_size: int = Field(2000, ge=1, description="Suite texts the tokenizer is trained on.")
    train_size: int = Field(4096, ge=1, description="Distinct training samples, rendered and tokenised once.")
    val_size: int = Field(128, ge=1, description="Validation samples scored after each role's training.")
    max_new_tokens: int = Field(
        48, ge=1, description="Response length limit of the validation scoring (a rationale, then the answer)."
    )
    captions: bool = Field(
        True,
        description=(
            "Also train on a description of every training image (`masters.data.describe`, asked as "
            "'describe the image.'): every token of it is about the image, so the model learns to read its "
            "image tokens far sooner than from one short answer per image. The tokenizer sees them too."
        ),
    )
    roles: dict[str, RoleConfig] = Field(default_factory=_default_roles)

    @field_validator("roles")
    @classmethod
    def _all_roles(cls, roles: dict[str, RoleConfig]) -> dict[str, RoleConfig]:
        if set(roles) != set(ROLES):
            missing, unknown = sorted(set(ROLES) - set(roles)), sorted(set(roles) - set(ROLES))
            raise ValueError(f"must define exactly the roles {list(ROLES)} (missing: {missing}, unknown: {unknown})")
        return roles


def load_zoo_config(path: str | Path | None = None) -> ZooConfig:
    """The zoo config from a YAML file (None: the built-in defaults, which configs/zoo/default.yaml spells out)."""
    if path is None:
        return ZooConfig()
    raw = read_yaml_mapping(path, "zoo config file")
    try:
        return ZooConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc).replace("invalid config", "invalid zoo config")) from None


def zoo_key(config: ZooConfig) -> str:
    """Hash of the config and the suite version: a change to either gives a new build directory."""
    return json_digest({"suite_version": SUITE_VERSION, "zoo": config.model_dump(mode="json")})


def zoo_build_dir(config: ZooConfig, zoo_dir: str | Path) -> Path:
    return Path(zoo_dir) / zoo_key(config)


def read_manifest(config: ZooConfig, zoo_dir: str | Path) -> dict | None:
    """The manifest of a complete build of `config`, or None when there is none."""
    path = zoo_build_dir(config, zoo_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def resolve_model(ref: str, zoo_dir: str | Path, zoo_config: ZooConfig | None = None) -> Path:
    """The directory of `zoo:<role>` (in the build of `zoo_config`, default: the built-in config) or of a HF model."""
    if not ref.startswith(ZOO_PREFIX):
        path = Path(ref)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model {ref!r} is neither `zoo:<role>` (roles: {', '.join(ROLES)}) "
                "nor a Hugging Face model directory (no config.json there)"
            )
        return path
    role = ref.removeprefix(ZOO_PREFIX)
    if role not in ROLES:
        raise ValueError(f"unknown zoo role {role!r} in {ref!r}; known roles: {', '.join(ZOO_PREFIX + r for r in ROLES)}")
    config = zoo_config or ZooConfig()
    if read_manifest(config, zoo_dir) is None:
        raise FileNotFoundError(
            f"the zoo is not built in {str(zoo_dir)!r} (no complete build {zoo_key(config)}); "
            f"run `python jobs/build_zoo.py --zoo-dir {zoo_dir}` (with the same --config) first"
        )
    return zoo_build_dir(config, zoo_dir) / role


def ensure_zoo(zoo_config: ZooConfig, zoo_dir: str | Path, force: bool = False, progress: bool = True) -> dict[str, Path]:
    """The role directories of the build of `zoo_config`, building it first when missing (or `force`)."""
    if force or read_manifest(zoo_config, zoo_dir) is None:
        build_zoo(zoo_config, zoo_dir, progress=progress)
    return {role: zoo_build_dir(zoo_config, zoo_dir) / role for role in ROLES}


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_zoo(
    config: ZooConfig,
    zoo_dir: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train every role on the suite and write `<zoo_dir>/<key>/` atomically; returns the manifest."""
    started = time.perf_counter()
    log(f"building zoo {zoo_key(config)} (suite {SUITE_VERSION}) in {zoo_dir}")
    corpus = text_corpus(seed=config.seed, size=config.tokenizer_corpus_size)
    if config.captions:
        corpus += [describe(s) for s in make_split("train", config.tokenizer_corpus_size, seed=config.seed)]
    tokenizer = train_tokenizer(corpus, config.vocab_size, config.architecture)
    train_samples = make_split("train", config.train_size, seed=config.seed)
    images = [s.image for s in train_samples]
    # Trained on the reference responses (a rationale, then the answer), as the method's teachers answer.
    questions, answers = [s.question for s in train_samples], [s.response for s in train_samples]
    if config.captions:
        images, questions = images + images, questions + [CAPTION_QUESTION] * len(train_samples)
        answers = answers + [describe(s) for s in train_samples]
    val_samples = make_split("val", config.val_size, seed=config.seed)
    encoded_by_image_size = {}  # roles of equal image size share the pre-processed training set
    summaries = {}
    with atomic_directory(zoo_build_dir(config, zoo_dir)) as tmp:
        # The student first: it is the quickest, so a broken setup shows early.
        for role in reversed(ROLES):
            role_config = config.roles[role]
            role_started = time.perf_counter()
            processor = build_processor(tokenizer, role_config.size, config.architecture)
            if role_config.size.image_size not in encoded_by_image_size:
                encoded_by_image_size[role_config.size.image_size] = encode_examples(processor, images, questions, answers)
            model = build_model(role_config.size, tokenizer, config.architecture, seed=role_config.seed)
            if role_config.freeze_vision:
                parts = model_parts(model)
                for module in (parts.vision_tower, *parts.projector):
                    module.requires_grad_(False)
            result = train_sft(
                model,
                encoded_by_image_size[role_config.size.image_size],
                VLMFamily(model, processor),
                steps=role_config.steps,
                batch_size=role_config.batch_size,
                lr=role_config.lr,
                warmup_steps=role_config.warmup_steps,
                weight_decay=role_config.weight_decay,
                seed=role_config.seed,
                description=f"train {role}",
                progress=progress,
            )
            val = evaluate(
                model,
                processor,
                val_samples,
                model_name=role,
                split="val",
                max_new_tokens=config.max_new_tokens,
                progress=progress,
            )
            summary = {
                "params": parameter_count(model),
                "steps": result.steps,
                "final_loss": round(result.final_loss, 4),
                "val_accuracy": round(val.accuracy, 4),
                "val_per_family": {family: round(score.accuracy, 4) for family, score in val.per_family.items()},
                "train_seconds": round(result.seconds, 1),
                "samples_per_second": round(result.samples_per_second, 1),
                "seconds": round(time.perf_counter() - role_started, 1),
            }
            save_model(model, processor, tmp / role, metadata={"role": role, "zoo_key": zoo_key(config), **summary})
            summaries[role] = summary
            log(
                f"{role:<9}  params {summary['params']:>10,}  steps {summary['steps']:>5}  "
                f"final loss {summary['final_loss']:.3f}  val acc {100 * summary['val_accuracy']:5.1f}%  "
                f"time {summary['seconds']:.0f} s ({summary['samples_per_second']:.0f} samples/s)"
            )
        manifest = {
            "key": zoo_key(config),
            "suite_version": SUITE_VERSION,
            "config": config.model_dump(mode="json"),
            "roles": {role: summaries[role] for role in ROLES},
            "torch_threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - started, 1),
            "disk_bytes": _directory_bytes(tmp),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    log(f"zoo built in {manifest['seconds']:.0f} s, {manifest['disk_bytes'] / 2**20:.1f} MiB on disk")
    return manifest


def resolve_model_paths(config, build_missing: bool = False) -> dict[str, Path]:
    """The directory of every teacher and of the student (`STUDENT`) of `config` (a `MastersConfig`);
    `zoo:` refs resolve inside `models.zoo_dir`, built first when `build_missing` and it is not there."""
    from masters.curriculum import STUDENT

    refs = {t.name: t.model for t in config.models.teachers} | {STUDENT: config.models.student}
    zoo_config = load_zoo_config(config.models.zoo_config)
    if build_missing and any(ref.startswith(ZOO_PREFIX) for ref in refs.values()):
        ensure_zoo(zoo_config, config.models.zoo_dir)
    return {name: resolve_model(ref, config.models.zoo_dir, zoo_config) for name, ref in refs.items()}

