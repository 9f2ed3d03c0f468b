"""Group-wise reward arithmetic of the Masters objective on torch tensors (docs/method.md §3).

:func:`reverse_min_max`, :func:`distill_reward`, :func:`total_reward`, :func:`grpo_advantages`.
R_acc itself, the judging of a response's text, is `masters.judging` (no torch: Ray workers import it).

Group tensors have the group on the last dimension: ``[G]`` for one group or ``[groups, G]`` for many,
with an optional boolean ``mask`` of the same shape marking real responses when groups are ragged.
Masked entries come back as 0.
"""

from __future__ import annotations

import math

import torch

from masters.config import RewardConfig

#: Divergences this close (nats) count as equal: identical responses differ only by float noise,
#: which min-max would blow up to a full 0/1 spread.
EQUAL_DIVERGENCE_ATOL = 1e-6


def _valid(values: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    if values.dim() == 0:
        raise ValueError(f"{name} must have a group dimension ([G] or [groups, G]), got a scalar")
    if mask is None:
        return torch.ones_like(values, dtype=torch.bool)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal {name} shape {tuple(values.shape)}")
    return mask.bool()


def reverse_min_max(divergences: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """R_distill_j = (max D − D_j) / (max D − min D) within each group (last dimension).

    The closest response to the teacher gets 1, the farthest 0. Groups whose valid divergences are
    all equal (within :data:`EQUAL_DIVERGENCE_ATOL`), including single-response groups, get zeros.
    """
    valid = _valid(divergences, mask, "divergences")
    highest = torch.where(valid, divergences, -math.inf).amax(-1, keepdim=True)
    lowest = torch.where(valid, divergences, math.inf).amin(-1, keepdim=True)
    spread = highest - lowest
    spread_ok = spread > EQUAL_DIVERGENCE_ATOL  # false for empty groups too (spread = -inf)
    rewards = (highest - divergences) / torch.where(spread_ok, spread, 1.0)
    return torch.where(valid & spread_ok, rewards, 0.0)


def distill_reward(divergences: torch.Tensor, normalize: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """R_distill: reverse min-max inside the group (paper), or the raw −D (the unnormalised ablation)."""
    if normalize:
        return reverse_min_max(divergences, mask)
    return torch.where(_valid(divergences, mask, "divergences"), -divergences, 0.0)


def total_reward(
    accuracy: torch.Tensor,
    divergences: torch.Tensor,
    config: RewardConfig,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """R = R_acc + R_distill, each switched by ``config.use_accuracy`` / ``config.use_distill``
    (the paper's reward ablation: acc only, distill only, both, both unnormalised)."""
    if not (config.use_accuracy or config.use_distill):
        raise ValueError("rewards.use_accuracy and rewards.use_distill are both false: enable at least one")
    if accuracy.shape != divergences.shape:
        raise ValueError(
            f"accuracy shape {tuple(accuracy.shape)} must equal divergences shape {tuple(divergences.shape)}"
        )
    valid = _valid(accuracy, mask, "accuracy")
    reward = torch.zeros_like(divergences)
    if config.use_accuracy:
        reward = reward + accuracy.to(divergences.dtype)
    if config.use_distill:
        reward = reward + distill_reward(divergences, config.normalize_distill, valid)
    return torch.where(valid, reward, 0.0)


def grpo_advantages(rewards: torch.Tensor, eps: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A_j = (R_j − mean R) / (std R + eps) within each group (last dimension).

    std is the population std (divide by the group size, not size − 1): it is defined for a
    single-response group, whose advantage is then 0. Advantages of a group sum to zero.
    """
    valid = _valid(rewards, mask, "rewards")
    count = valid.sum(-1, keepdim=True).clamp_min(1)
    mean = torch.where(valid, rewards, 0.0).sum(-1, keepdim=True) / count
    centered = torch.where(valid, rewards - mean, 0.0)
    std = (centered.square().sum(-1, keepdim=True) / count).sqrt()
    return centered / (std + eps)
