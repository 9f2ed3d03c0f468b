"""The Ray Train student trainer on 2 CPU workers: pinned losses, resume equivalence, strategies agree.

Each `TorchTrainer.fit` costs seconds (worker start-up and imports), so the runs are module-scoped
and shared: one 4-step DDP run is the reference for every comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_batching import synthetic_records, write_stage
from transformers import AutoModelForImageTextToText, AutoProcessor

from cluster.train import PROGRESS_FILE, TRAIN_STATE_FILE, train_stage
from masters.config import MastersConfig
from masters.models import load_model

STEPS = 4
# Observed with the micro model and the records below (2 workers, 4 questions per update, 2 micro-batches).
PINNED_LOSS = [0.5172986, 0.5319923, 0.5184702, 0.5356612]
PINNED_LAST_STEP = {"jsd": 0.5319469, "grpo": 0.0037143, "kl": 0.0329638, "divergence": 0.5396663}
PINNED_TOLERANCE = 1e-4  # float32 reduction order may differ across torch builds, not more
# FSDP2 and DeepSpeed reduce gradients in a different order than DDP: float32 rounding, nothing more.
STRATEGY_TOLERANCE = 1e-5


def trainer_config(strategy: str = "ddp", **train) -> MastersConfig:
    return MastersConfig(
        train={
            "strategy": strategy,
            "num_workers": 2,
            "cpus_per_worker": 0.5,
            "lr": 1e-3,  # large enough that four steps move a random micro model measurably
            "questions_per_batch": 4,
            "grad_accum_steps": 2,
            "seed": 0,
            **train,
        },
        logging={"wandb_project": None},
    )


@pytest.fixture(scope="module")
def stage(micro_model_dir, tmp_path_factory) -> Path:
    _, processor = load_model(micro_model_dir)
    stage_dir = tmp_path_factory.mktemp("stage") / "teacher-l" / "1"
    write_stage(synthetic_records(processor, num_questions=8, group_size=4, topk=8, seed=0), stage_dir)
    return stage_dir


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def run(config, stage, micro_model_dir, storage, name, max_steps):
    return train_stage(
        config, stage, micro_model_dir, micro_model_dir, storage / "out" / name, name, str(storage), max_steps=max_steps
    )


@pytest.fixture(scope="module")
def ddp_run(ray_session, stage, micro_model_dir, storage):
    return run(trainer_config("ddp"), stage, micro_model_dir, storage, "ddp-straight", STEPS)


def weights(student_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(student_dir / "model.safetensors")


def test_ddp_losses_are_pinned(ddp_run, micro_model_dir):
    metrics = ddp_run.metrics
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for name in ("loss", "jsd", "grpo", "kl", "divergence", "accuracy_reward", "distill_reward", "tokens_per_s"):
        assert all(name in m for m in metrics), name
    assert [m["loss"] for m in metrics] == pytest.approx(PINNED_LOSS, abs=PINNED_TOLERANCE)
    for name, value in PINNED_LAST_STEP.items():
        assert metrics[-1][name] == pytest.approx(value, abs=PINNED_TOLERANCE), name
    assert metrics[0]["kl"] == 0.0 and metrics[-1]["kl"] > 0  # the student leaves the reference

    # The stage's student: Hugging Face format, loadable as is, and trained.
    assert ddp_run.steps == STEPS
    model = AutoModelForImageTextToText.from_pretrained(ddp_run.student_dir)
    AutoProcessor.from_pretrained(ddp_run.student_dir)
    trained, initial = weights(ddp_run.student_dir), weights(micro_model_dir)
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
    assert sum(p.numel() for p in model.parameters()) > 0
    checkpoint = Path(ddp_run.checkpoint_path)
    assert (checkpoint / TRAIN_STATE_FILE).is_file() and (checkpoint / "student" / "config.json").is_file()
    assert json.loads((checkpoint / PROGRESS_FILE).read_text())["step"] == STEPS


def assert_same_run(result, reference, tolerance: float) -> None:
    for name in ("loss", "jsd", "grpo", "kl", "divergence", "grad_norm"):
        assert [m[name] for m in result.metrics] == pytest.approx(
            [m[name] for m in reference.metrics[-len(result.metrics) :]], abs=tolerance
        ), name
    expected, obtained = weights(reference.student_dir), weights(result.student_dir)
    assert obtained.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(obtained[name], expected[name], atol=tolerance, rtol=0, msg=name)


def test_resumed_fsdp2_run_matches_uninterrupted_ddp_run(ddp_run, stage, micro_model_dir, storage):
    """Stop after 2 of 4 steps, re-run under the same name: the last 2 steps and the final weights
    equal the uninterrupted run's. FSDP2 (sharded state, gathered to save) is the hardest case for
    resume, and it doubles as the FSDP2-vs-DDP check; DDP resumes through the same code."""
    config = trainer_config("fsdp2", checkpoint_every_steps=1)
    first = run(config, stage, micro_model_dir, storage, "fsdp2-resumed", max_steps=2)
    assert [m["step"] for m in first.metrics] == [1, 2]
    # Same run name and storage: Ray Train V2 hands the workers the step-2 checkpoint.
    resumed = run(config, stage, micro_model_dir, storage, "fsdp2-resumed", max_steps=STEPS)
    assert [m["step"] for m in resumed.metrics] == [3, 4]
    assert resumed.steps == STEPS
    assert_same_run(resumed, ddp_run, STRATEGY_TOLERANCE)


def test_deepspeed_zero3_matches_ddp(ddp_run, stage, micro_model_dir, storage):
    # Its first run on a machine JIT-builds DeepSpeed's shared-memory comm op (~40 s, cached afterwards).
    config = trainer_config("deepspeed", zero_stage=3, checkpoint_every_steps=2)
    result = run(config, stage, micro_model_dir, storage, "deepspeed-straight", STEPS)
    assert [m["step"] for m in result.metrics] == [1, 2, 3, 4]
    assert_same_run(result, ddp_run, STRATEGY_TOLERANCE)
