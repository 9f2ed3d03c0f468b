"""The student's loss on one micro-batch: the single code path of the Ray trainer and the plain baseline.

Forward the student (and, for the ``full`` objective with β > 0, the frozen reference under no_grad)
over prompt + response, keep only the logits that predict response tokens, and hand them to
:func:`masters.losses.masters_loss`. No teacher weights are involved: the teacher's top-k log-probs
come with the batch.
"""

from __future__ import annotations

import torch

from masters.batching import ResponseBatch
from masters.config import LossConfig, RewardConfig
from masters.losses import MastersLossOutput, masters_loss, token_logprobs


def needs_reference(loss_config: LossConfig) -> bool:
    """Only GRPO's KL term reads the reference; the JSD-only objectives never load it."""
    return loss_config.objective == "full" and loss_config.kl_beta > 0


def response_logits(model: torch.nn.Module, batch: ResponseBatch) -> torch.Tensor:
    """Logits [B, T, V] whose position t predicts response token t.

    The response occupies the last T columns, so the logits at columns P - 1 … P + T - 2 are the last
    T + 1 positions minus the final one; `logits_to_keep` skips the LM head over the prompt.
    """
    output = model(**batch.inputs, logits_to_keep=batch.response_length + 1, use_cache=False)
    return output.logits[:, :-1]


def student_loss(
    student: torch.nn.Module,
    reference: torch.nn.Module | None,
    batch: ResponseBatch,
    loss_config: LossConfig,
    reward_config: RewardConfig,
    vocab_size: int,
) -> MastersLossOutput:
    """The Masters loss of `batch` (`reference` is required exactly when :func:`needs_reference`)."""
    if needs_reference(loss_config) != (reference is not None):
        raise ValueError(
            "pass the frozen reference model exactly when loss.objective is 'full' and loss.kl_beta > 0 "
            f"(objective={loss_config.objective!r}, kl_beta={loss_config.kl_beta}, reference given: {reference is not None})"
        )
    ref_logprobs = None
    if reference is not None:
        with torch.no_grad():
            ref_logits = response_logits(reference, batch)
            ref_logprobs = token_logprobs(
                ref_logits, batch.targets.target_ids, batch.targets.response_mask, vocab_size
            )
    logits = response_logits(student, batch)
    return masters_loss(logits, batch.targets, loss_config, reward_config, ref_logprobs, vocab_size)


def step_metrics(output: MastersLossOutput, batch: ResponseBatch) -> dict[str, float]:
    """Logged scalars of one micro-batch: every loss term, mean R_acc (also for JSD-only objectives),
    mean D, KL, and the number of response tokens."""
    metrics = output.metrics()
    metrics.setdefault("accuracy_reward", float(batch.targets.accuracy_reward.mean()))
    metrics["tokens"] = float(batch.num_response_tokens)
    return metrics
