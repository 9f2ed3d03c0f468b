"""The Masters training loss (docs/method.md §4): token-level JSD to the stored teacher top-k, plus GRPO.

Targets layout (:class:`LossTargets`) for B responses, T positions and k teacher ids per position.
Groups are flat: each response names its group, so groups may be ragged.

==========================  ============  =====================================================
field                       shape, dtype  meaning
==========================  ============  =====================================================
``target_ids``              [B, T] long   The token the student's logits at position t predict. A model
                                          fed ``input_ids`` [B, L] (prompt + response, padded) gives
                                          ``logits[:, :-1]`` and ``target_ids = input_ids[:, 1:]``.
``response_mask``           [B, T] bool   True where ``target_ids`` is a response token (EOS included);
                                          prompt and padding are False. Every row needs ≥ 1 True.
``teacher_topk_ids``        [B, T, k]     The teacher's top-k token ids at the same positions.
``teacher_topk_logprobs``   [B, T, k]     Their log-probs; the tail bucket is 1 − Σ exp(log-probs).
``group_index``             [B] long      Which question each response answers (any integer ids).
                                          Groups must be complete in the batch. ``full`` only.
``accuracy_reward``         [B] float     R_acc from the judge. ``full`` only.
==========================  ============  =====================================================

Values at masked positions are never read (padding such as -100 is fine). ``full`` also takes
``ref_logprobs`` [B, T]: the frozen reference's :func:`token_logprobs` of ``target_ids``, computed
under ``torch.no_grad``. ``vocab_size`` (the shared tokenizer's size) truncates padded logit rows.

Two entry points compute the same loss: :func:`masters_loss` takes the student's logits [B, T, V];
:func:`chunked_masters_loss` takes the final hidden states [B, T, H] and the LM head, and runs head,
log-softmax and the per-token terms over at most ``chunk_tokens`` response tokens at a time (each chunk
recomputed in backward), so no [tokens, vocab] tensor of the whole batch ever exists.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from masters.config import LossConfig, RewardConfig
from masters.rewards import distill_reward, grpo_advantages, total_reward

# Log-probs are clamped here before exponentiating: exp() underflows to exactly 0 long before, and a
# finite floor keeps 0 · (log p − log m) from becoming 0 · (−inf) = NaN.
_LOG_PROB_FLOOR = -1e4
# exp(ref − logp) in the k3 estimator overflows float32 past ~88; one token that far off the
# reference would make the whole loss infinite (ours).
_MAX_KL_LOG_RATIO = 20.0


@dataclass
class LossTargets:
    """What the loss compares the student with, per response token: the targets, the teacher's top-k, the
    groups and rewards (the module docstring gives the layout)."""

    target_ids: torch.Tensor
    response_mask: torch.Tensor
    teacher_topk_ids: torch.Tensor
    teacher_topk_logprobs: torch.Tensor
    group_index: torch.Tensor | None = None
    accuracy_reward: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> LossTargets:
        return LossTargets(
            **{f.name: None if (v := getattr(self, f.name)) is None else v.to(device) for f in dataclasses.fields(self)}
        )


@dataclass
class MastersLossOutput:
    """The loss to backpropagate and its parts, detached, for logging."""

    loss: torch.Tensor  # scalar, differentiable
    jsd: torch.Tensor  # L_JSD: mean token JSD over all response tokens
    divergence: torch.Tensor  # [B] D_j: mean token JSD of each response
    grpo: torch.Tensor | None = None  # L_GRPO, β·KL included (full only)
    kl: torch.Tensor | None = None  # mean per-token k3 KL to the reference (full only)
    accuracy_reward: torch.Tensor | None = None  # [B]
    distill_reward: torch.Tensor | None = None  # [B], None when rewards.use_distill is off
    reward: torch.Tensor | None = None  # [B] R
    advantages: torch.Tensor | None = None  # [B] A_j
    # The weighted terms whose sum is `loss`, still differentiable (full only): what
    # `masters.student_loss.term_gradients` compares.
    terms: dict[str, torch.Tensor] | None = None
    term_gradients: dict[str, float] | None = None  # set by student_loss(diagnose=True)

    def metrics(self) -> dict[str, float]:
        """Scalars for the logger (one device sync per value)."""
        values = {
            "loss": self.loss.detach(),
            "jsd": self.jsd,
            "divergence": self.divergence.mean(),
            "grpo": self.grpo,
            "kl": self.kl,
            "accuracy_reward": None if self.accuracy_reward is None else self.accuracy_reward.mean(),
            "distill_reward": None if self.distill_reward is None else self.distill_reward.mean(),
            "reward": None if self.reward is None else self.reward.mean(),
            "advantage_abs": None if self.advantages is None else self.advantages.abs().mean(),
        }
        return {name: float(value) for name, value in values.items() if value is not None} | (self.term_gradients or {})


def _truncate_vocab(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    if vocab_size is None:
        return logits
    if not 0 < vocab_size <= logits.shape[-1]:
        raise ValueError(
            f"vocab_size ({vocab_size}) must be in 1..{logits.shape[-1]} (the student's logit width); "
            "pass the shared tokenizer's size"
        )
    return logits[..., :vocab_size]


def _check_ids(ids: torch.Tensor, vocab_size: int, name: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} holds ids outside 0..{vocab_size - 1} at response positions "
            f"(min {int(ids.min())}, max {int(ids.max())}): teacher and student must share the tokenizer"
        )


def token_logprobs(
    logits: torch.Tensor, target_ids: torch.Tensor, response_mask: torch.Tensor, vocab_size: int | None = None
) -> torch.Tensor:
    """log π(target_t | ·) per position [B, T] in float32; 0 where ``response_mask`` is False."""
    logits = _truncate_vocab(logits, vocab_size).float()
    mask = response_mask.bool()
    targets = torch.where(mask, target_ids, 0)
    _check_ids(targets, logits.shape[-1], "target_ids")
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    # gather − logsumexp avoids materialising a second [B, T, V] log-softmax.
    return torch.where(mask, picked - logits.logsumexp(-1), 0.0)


def topk_jsd(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Symmetric JSD (mixture weight 0.5, nats) per position [B, T] between the teacher and the
    student, both collapsed onto the teacher's k ids plus one tail bucket holding the rest of the
    mass. Equals the full-vocabulary JSD when the k ids cover the vocabulary.

    Only the student's logits are scaled by ``temperature``; the teacher's log-probs are used as stored.
    """
    logits = _truncate_vocab(student_logits, vocab_size).float() / temperature
    _check_ids(teacher_topk_ids, logits.shape[-1], "teacher_topk_ids")
    student_top = logits.gather(-1, teacher_topk_ids) - logits.logsumexp(-1, keepdim=True)
    return _collapsed_jsd(student_top, teacher_topk_logprobs)


def _collapsed_jsd(student_top: torch.Tensor, teacher_topk_logprobs: torch.Tensor) -> torch.Tensor:
    """The JSD of :func:`topk_jsd` from both sides' log-probs [..., k] of the teacher's top-k ids."""
    student_top = student_top.clamp_min(_LOG_PROB_FLOOR)
    teacher_top = teacher_topk_logprobs.float().clamp_min(_LOG_PROB_FLOOR)

    log_mix_top = torch.logaddexp(teacher_top, student_top) - math.log(2.0)
    top = teacher_top.exp() * (teacher_top - log_mix_top) + student_top.exp() * (student_top - log_mix_top)

    # Tails by complement; rounding can push them slightly below 0 (k = vocabulary, or stored
    # log-probs summing past 1), hence the clamp. A zero tail contributes exactly 0.
    tiny = torch.finfo(torch.float32).tiny
    teacher_tail = (1.0 - teacher_top.exp().sum(-1)).clamp_min(0.0)
    student_tail = (1.0 - student_top.exp().sum(-1)).clamp_min(0.0)
    log_mix_tail = (0.5 * (teacher_tail + student_tail)).clamp_min(tiny).log()
    tail = teacher_tail * (teacher_tail.clamp_min(tiny).log() - log_mix_tail) + student_tail * (
        student_tail.clamp_min(tiny).log() - log_mix_tail
    )
    return 0.5 * (top.sum(-1) + tail)


def response_divergence(token_divergence: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """D_j: the mean over each response's tokens [B]."""
    mask = response_mask.bool()
    return torch.where(mask, token_divergence, 0.0).sum(-1) / mask.sum(-1).clamp_min(1)


def policy_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    kl_beta: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """L_GRPO = −mean_j mean_t [ratio·A_j − β·KL_t] and the mean token KL (None without a reference).

    ratio = exp(logp − logp.detach()) is 1 in value (one update per batch) but carries ∇logp.
    KL_t = exp(ref − logp) − (ref − logp) − 1 (k3 estimator, ≥ 0).
    """
    mask = response_mask.bool()
    ratio = torch.exp(logprobs - logprobs.detach())
    per_token = ratio * advantages.unsqueeze(-1)
    mean_kl = None
    if ref_logprobs is not None:
        ref_logprobs = torch.where(mask, ref_logprobs, logprobs.detach())  # padding may hold anything
        log_ratio = (ref_logprobs - logprobs).clamp(-_MAX_KL_LOG_RATIO, _MAX_KL_LOG_RATIO)
        kl = torch.where(mask, torch.exp(log_ratio) - log_ratio - 1.0, 0.0)
        per_token = per_token - kl_beta * kl
        mean_kl = kl.detach().sum() / mask.sum()
    per_response = torch.where(mask, per_token, 0.0).sum(-1) / mask.sum(-1).clamp_min(1)
    return -per_response.mean(), mean_kl


def _group_slots(group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Each response's (group row, slot in the group) in a padded [groups, max group size] layout."""
    _, group, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    order = torch.argsort(group, stable=True)
    starts = counts.cumsum(0) - counts
    slot = torch.empty_like(group)
    slot[order] = torch.arange(group.numel(), device=group.device) - starts[group[order]]
    return group, slot, counts.numel(), int(counts.max())


def _check_shapes(rows: tuple[int, ...], batch: LossTargets, ref_logprobs: torch.Tensor | None, source: str) -> None:
    """`rows` = [B, T], the first two dims of `source` (the student's logits or hidden states)."""
    expected = {
        "target_ids": (batch.target_ids, rows),
        "response_mask": (batch.response_mask, rows),
        "teacher_topk_logprobs": (batch.teacher_topk_logprobs, tuple(batch.teacher_topk_ids.shape)),
        "group_index": (batch.group_index, rows[:1]),
        "accuracy_reward": (batch.accuracy_reward, rows[:1]),
        "ref_logprobs": (ref_logprobs, rows),
    }
    if batch.teacher_topk_ids.dim() != 3 or tuple(batch.teacher_topk_ids.shape[:2]) != rows:
        raise ValueError(
            f"teacher_topk_ids must be [B, T, k] with [B, T] = {list(rows)} (the {source}' first two dims), "
            f"got shape {tuple(batch.teacher_topk_ids.shape)}"
        )
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
    empty = (batch.response_mask.bool().sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"response_mask rows {empty} have no response tokens: every response needs at least one "
            "(include its EOS token)"
        )


def _check_objective_inputs(batch: LossTargets, config: LossConfig, ref_logprobs: torch.Tensor | None) -> None:
    if config.objective != "full":
        return
    for name in ("group_index", "accuracy_reward"):
        if getattr(batch, name) is None:
            raise ValueError(f"loss.objective 'full' needs batch.{name}; set it (see masters.losses for the layout)")
    if ref_logprobs is None and config.kl_beta > 0:
        raise ValueError(
            "loss.objective 'full' with loss.kl_beta > 0 needs ref_logprobs from the frozen reference "
            "(masters.losses.token_logprobs under torch.no_grad), or set loss.kl_beta=0"
        )


def masters_loss(
    student_logits: torch.Tensor,
    batch: LossTargets,
    config: LossConfig,
    reward_config: RewardConfig,
    ref_logprobs: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> MastersLossOutput:
    """The loss of ``config.objective``.

    * ``sft``: the mean next-token loss −log π(target) over the response tokens (the JSD is only reported).
    * ``naive`` / ``mask_progressive``: ``jsd_weight · L_JSD`` (no rewards, no reference).
    * ``full``: ``grpo_weight · L_GRPO + jsd_weight · L_JSD`` with R = R_acc + R_distill, where
      R_distill comes from the same forward pass, detached, normalised within each group.

    Holds the whole [B, T, V] logits (and float32 temporaries of that size); :func:`chunked_masters_loss`
    computes the same loss without them.
    """
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    _check_shapes(tuple(student_logits.shape[:2]), batch, ref_logprobs, "logits")
    _check_objective_inputs(batch, config, ref_logprobs)
    mask = batch.response_mask.bool()
    # Ignored positions get id 0 and a finite log-prob so garbage there cannot produce NaN.
    teacher_ids = torch.where(mask.unsqueeze(-1), batch.teacher_topk_ids, 0)
    teacher_logprobs = torch.where(mask.unsqueeze(-1), batch.teacher_topk_logprobs, 0.0)
    token_jsd = torch.where(
        mask, topk_jsd(student_logits, teacher_ids, teacher_logprobs, config.temperature, vocab_size), 0.0
    )
    logprobs = None
    if config.objective in ("full", "sft"):
        logprobs = token_logprobs(student_logits, batch.target_ids, mask, vocab_size)
    return _loss_from_token_terms(token_jsd, logprobs, batch, config, reward_config, ref_logprobs)


def _loss_from_token_terms(
    token_jsd: torch.Tensor,
    logprobs: torch.Tensor | None,
    batch: LossTargets,
    config: LossConfig,
    reward_config: RewardConfig,
    ref_logprobs: torch.Tensor | None,
) -> MastersLossOutput:
    """The group-level part of the loss from the per-position JSD and (``full``) student log-probs [B, T],
    both 0 outside the response mask."""
    mask = batch.response_mask.bool()
    jsd_loss = token_jsd.sum() / mask.sum()
    divergence = response_divergence(token_jsd.detach(), mask)
    if config.objective == "sft":
        return MastersLossOutput(loss=-logprobs.sum() / mask.sum(), jsd=jsd_loss.detach(), divergence=divergence)
    if config.objective != "full":
        return MastersLossOutput(loss=config.jsd_weight * jsd_loss, jsd=jsd_loss.detach(), divergence=divergence)

    group, slot, num_groups, group_size = _group_slots(batch.group_index)

    def grouped(values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(num_groups, group_size)
        out[group, slot] = values
        return out

    group_mask = grouped(torch.ones_like(divergence)).bool()
    accuracy = batch.accuracy_reward.to(divergence.dtype)
    grouped_divergence = grouped(divergence)
    reward = total_reward(grouped(accuracy), grouped_divergence, reward_config, group_mask)
    advantages = grpo_advantages(reward, config.advantage_eps, group_mask)[group, slot]
    distill = None
    if reward_config.use_distill:
        distill = distill_reward(grouped_divergence, reward_config.normalize_distill, group_mask)[group, slot]

    grpo_loss, mean_kl = policy_loss(logprobs, advantages, mask, ref_logprobs, config.kl_beta)
    terms = {"grpo": config.grpo_weight * grpo_loss, "jsd": config.jsd_weight * jsd_loss}
    return MastersLossOutput(
        loss=terms["grpo"] + terms["jsd"],
        terms=terms,
        jsd=jsd_loss.detach(),
        divergence=divergence,
        grpo=grpo_loss.detach(),
        kl=mean_kl,
        accuracy_reward=accuracy,
        distill_reward=distill,
        reward=reward[group, slot],
        advantages=advantages,
    )


# --------------------------------------------------------------------------- chunked over tokens

# The LM head, the log-softmax and the per-token terms run on at most `chunk_tokens` response tokens at a
# time (`loss.chunk_tokens`), so the loss's vocabulary-sized memory is a few [chunk_tokens, V] float32
# tensors (with a 151k vocabulary, 1024 tokens are 0.6 GB each) whatever the batch's token count.

Head = Callable[[torch.Tensor], torch.Tensor]


def _chunk_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, *, head: Head, vocab_size: int | None
) -> torch.Tensor:
    """log π(target) [C] of C tokens' hidden states [C, H] (temperature 1, vocabulary truncated)."""
    logits = _truncate_vocab(head(hidden), vocab_size).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _chunk_terms(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    head: Head,
    vocab_size: int | None,
    temperature: float,
    with_logprobs: bool,
) -> torch.Tensor:
    """[JSD, log π(target)] per token [2, C] (or [1, C], JSD only) of C tokens' hidden states [C, H]:
    the arithmetic of :func:`topk_jsd` and :func:`token_logprobs` on one chunk's logits."""
    logits = _truncate_vocab(head(hidden), vocab_size).float()
    log_norm = logits.logsumexp(-1, keepdim=True) if with_logprobs or temperature == 1.0 else None
    if temperature == 1.0:  # x / 1 == x exactly: skip the [C, V] copy and share the logsumexp
        student_top = logits.gather(-1, teacher_ids) - log_norm
    else:
        scaled = logits / temperature
        student_top = scaled.gather(-1, teacher_ids) - scaled.logsumexp(-1, keepdim=True)
    terms = [_collapsed_jsd(student_top, teacher_logprobs)]
    if with_logprobs:
        terms.append((logits.gather(-1, targets.unsqueeze(-1)) - log_norm).squeeze(-1))
    return torch.stack(terms)


def _over_chunks(function: Callable[..., torch.Tensor], chunk_tokens: int, *per_token: torch.Tensor) -> torch.Tensor:
    """`function` of each run of `chunk_tokens` rows of the `per_token` tensors, outputs concatenated on
    the last dim. With grad enabled each chunk is checkpointed: backward recomputes its logits instead
    of keeping them, so only one chunk's vocabulary-sized tensors are alive at a time."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer (response tokens per chunk), got {chunk_tokens!r}")
    outputs = []
    for start in range(0, per_token[0].shape[0], chunk_tokens):
        chunk = [tensor[start : start + chunk_tokens] for tensor in per_token]
        if torch.is_grad_enabled():
            # Non-reentrant: one backward through the original graph, so each parameter's gradient is
            # accumulated once (what DDP's reducer expects), and autocast state is replayed.
            outputs.append(checkpoint(function, *chunk, use_reentrant=False))
        else:
            outputs.append(function(*chunk))
    return torch.cat(outputs, dim=-1)


def _unflatten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] values of the mask's True positions → [B, T], 0 elsewhere (differentiable)."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def _head_width(head: Head, vocab_size: int | None) -> int | None:
    """The vocabulary the ids must fall in, when it is known without running the head."""
    if vocab_size is not None:
        return vocab_size
    width = getattr(head, "out_features", None)
    return width if isinstance(width, int) else None


def chunked_token_logprobs(
    hidden_states: torch.Tensor,
    head: Head,
    target_ids: torch.Tensor,
    response_mask: torch.Tensor,
    vocab_size: int | None = None,
    *,
    chunk_tokens: int,
) -> torch.Tensor:
    """:func:`token_logprobs` of ``head(hidden_states)`` [B, T], the head run on ``chunk_tokens``
    response tokens at a time (prompt and padding positions are skipped, and get 0)."""
    if hidden_states.dim() != 3 or tuple(target_ids.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(
            f"hidden_states must be [B, T, H] and target_ids [B, T], got {tuple(hidden_states.shape)} "
            f"and {tuple(target_ids.shape)}"
        )
    mask = response_mask.bool()
    targets = target_ids[mask]
    if (width := _head_width(head, vocab_size)) is not None:
        _check_ids(targets, width, "target_ids")
    function = functools.partial(_chunk_logprobs, head=head, vocab_size=vocab_size)
    return _unflatten(_over_chunks(function, chunk_tokens, hidden_states[mask], targets), mask)


def chunked_masters_loss(
    hidden_states: torch.Tensor,
    head: Head,
    batch: LossTargets,
    config: LossConfig,
    reward_config: RewardConfig,
    ref_logprobs: torch.Tensor | None = None,
    vocab_size: int | None = None,
    *,
    chunk_tokens: int,
) -> MastersLossOutput:
    """:func:`masters_loss` of ``student_logits = head(hidden_states)``, without ever holding them whole.

    ``hidden_states`` [B, T, H] are the student's final hidden states whose position t predicts
    ``batch.target_ids[:, t]``; ``head`` maps [C, H] to logits [C, V] (the model's LM head). The
    response tokens of the batch (prompt and padding skipped) are cut into chunks of ``chunk_tokens``;
    each chunk runs head → log-softmax → JSD and log π(target) and keeps only those per-token values
    (backward recomputes the chunk, :func:`torch.utils.checkpoint.checkpoint`). The group-level terms
    (D_j, rewards, advantages, GRPO, KL) then run on the [B, T] values exactly as in :func:`masters_loss`.
    Equal to it up to float32 rounding, for any chunk size.
    """
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be [B, T, H], got shape {tuple(hidden_states.shape)}")
    _check_shapes(tuple(hidden_states.shape[:2]), batch, ref_logprobs, "hidden states")
    _check_objective_inputs(batch, config, ref_logprobs)
    mask = batch.response_mask.bool()
    with_logprobs = config.objective in ("full", "sft")
    targets, teacher_ids = batch.target_ids[mask], batch.teacher_topk_ids[mask]
    if (width := _head_width(head, vocab_size)) is not None:
        _check_ids(teacher_ids, width, "teacher_topk_ids")
        if with_logprobs:
            _check_ids(targets, width, "target_ids")
    function = functools.partial(
        _chunk_terms, head=head, vocab_size=vocab_size, temperature=config.temperature, with_logprobs=with_logprobs
    )
    terms = _over_chunks(
        function, chunk_tokens, hidden_states[mask], targets, teacher_ids, batch.teacher_topk_logprobs[mask]
    )
    token_jsd = _unflatten(terms[0], mask)
    logprobs = _unflatten(terms[1], mask) if with_logprobs else None
    return _loss_from_token_terms(token_jsd, logprobs, batch, config, reward_config, ref_logprobs)
