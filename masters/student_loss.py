"""The student's loss on one micro-batch: the single code path of the Ray trainer and the plain baseline.

Forward the student (and, for the ``full`` objective with β > 0, the frozen reference under no_grad)
over prompt + response, keep only the final hidden states of the positions that predict response
tokens, and hand them with the model's LM head to :func:`masters.losses.chunked_masters_loss`, which
runs head, log-softmax and the per-token terms a chunk of tokens at a time (``loss.chunk_tokens``), so the
[responses, tokens, vocab] logits never exist whole. ``chunk_tokens: null`` takes the unchunked path
(:func:`response_logits` + :func:`masters.losses.masters_loss`); both give the same loss. No teacher
weights are involved: the teacher's top-k log-probs come with the batch.
"""

from __future__ import annotations

import torch

from masters.batching import ResponseBatch
from masters.config import LossConfig, RewardConfig
from masters.losses import (
    MastersLossOutput,
    chunked_masters_loss,
    chunked_token_logprobs,
    masters_loss,
    token_logprobs,
)


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


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DDP or DeepSpeed wrapper (FSDP2 does not wrap)."""
    while not hasattr(model, "get_output_embeddings") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def response_hidden_states(model: torch.nn.Module, batch: ResponseBatch) -> tuple[torch.Tensor, torch.nn.Module]:
    """The final hidden states [B, T, H] whose position t predicts response token t, and the LM head
    that maps them to the logits of :func:`response_logits`.

    The model's own forward runs, through any DDP / FSDP2 / DeepSpeed wrapper, with `logits_to_keep`
    as in :func:`response_logits`. Two hooks on the LM head turn it into a pass-through for that call:
    it runs on zero positions (no logits are computed) and hands back the hidden states it was given,
    which come out as the output's ``logits``. The loss must read them from the forward's output, not
    from a side channel: DDP with ``find_unused_parameters`` leaves parameters unreduced when the loss
    bypasses the outputs (tests/test_train.py failed that way). The empty head output is kept in the
    graph (times 0), so an untied head's weight counts as used in this forward, as DDP requires.

    Assumes ``logits = lm_head(hidden_states[:, kept])`` with nothing after the head, true of every
    supported family (Gemma 3's final soft-capping exists only in its text-only model, not the VLM);
    tests/test_losses.py checks the chunked loss against the full logits on each.
    """
    inner = _unwrapped(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        raise ValueError(
            f"{type(inner).__name__} has no LM head module (get_output_embeddings()); set loss.chunk_tokens to null "
            "(the unchunked loss on full logits)"
        )
    captured: list[torch.Tensor] = []

    def run_on_no_position(module: torch.nn.Module, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        captured.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    def hand_back_hidden_states(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not captured or not isinstance(output, torch.Tensor):
            return None
        return captured[-1] + 0.0 * output.sum()

    pre = head.register_forward_pre_hook(run_on_no_position)
    post = head.register_forward_hook(hand_back_hidden_states)
    try:
        output = model(**batch.inputs, logits_to_keep=batch.response_length + 1, use_cache=False)
    finally:
        pre.remove()
        post.remove()
    expected = (batch.inputs["input_ids"].shape[0], batch.response_length + 1)
    hidden = output.logits
    if len(captured) != 1 or captured[0].dim() != 3 or tuple(captured[0].shape[:2]) != expected or (
        hidden.shape != captured[0].shape
    ):
        raise ValueError(
            f"{type(inner).__name__}'s forward did not call its LM head once on the kept hidden states "
            f"[{expected[0]}, {expected[1]}, H] and return its output as the logits (head inputs: "
            f"{[tuple(t.shape) for t in captured]}, logits: {tuple(hidden.shape)}); set loss.chunk_tokens to null"
        )
    return hidden[:, :-1], head


def student_loss(
    student: torch.nn.Module,
    reference: torch.nn.Module | None,
    batch: ResponseBatch,
    loss_config: LossConfig,
    reward_config: RewardConfig,
    vocab_size: int,
    *,
    diagnose: bool = False,
) -> MastersLossOutput:
    """The Masters loss of `batch` (`reference` is required exactly when :func:`needs_reference`).

    `diagnose`: for the full objective, also measure how its terms pull the student (:func:`term_gradients`)
    on a detached copy of the loss's input, at the price of one more forward and two backward passes
    through the loss (not through the model); the training step is untouched.

    `loss_config.chunk_tokens`: response tokens (over the whole micro-batch) whose logits exist at once,
    in the student's loss and in the reference's log-probs; None materialises all [B, T, V] logits (same
    loss). Memory of the loss's vocabulary-sized tensors scales with it, not with B × T.
    """
    if needs_reference(loss_config) != (reference is not None):
        raise ValueError(
            "pass the frozen reference model exactly when loss.objective is 'full' and loss.kl_beta > 0 "
            f"(objective={loss_config.objective!r}, kl_beta={loss_config.kl_beta}, reference given: {reference is not None})"
        )
    targets, chunk_tokens = batch.targets, loss_config.chunk_tokens
    if chunk_tokens is None:
        ref_logprobs = None
        if reference is not None:
            with torch.no_grad():
                ref_logits = response_logits(reference, batch)
                ref_logprobs = token_logprobs(ref_logits, targets.target_ids, targets.response_mask, vocab_size)
            del ref_logits
        logits = response_logits(student, batch)
        output = masters_loss(logits, targets, loss_config, reward_config, ref_logprobs, vocab_size)
        if diagnose and output.terms is not None:
            # On a detached copy: the training graph (and DDP's hooks on it) never sees the probe.
            probe = logits.detach().requires_grad_()
            terms = masters_loss(probe, targets, loss_config, reward_config, ref_logprobs, vocab_size).terms
            output.term_gradients = term_gradients(terms, probe)
        return output

    ref_logprobs = None
    if reference is not None:
        with torch.no_grad():
            hidden, head = response_hidden_states(reference, batch)
            ref_logprobs = chunked_token_logprobs(
                hidden, head, targets.target_ids, targets.response_mask, vocab_size, chunk_tokens=chunk_tokens
            )
        del hidden
    hidden, head = response_hidden_states(student, batch)
    output = chunked_masters_loss(
        hidden, head, targets, loss_config, reward_config, ref_logprobs, vocab_size, chunk_tokens=chunk_tokens
    )
    if diagnose and output.terms is not None:
        # On a detached copy: the training graph (and DDP's hooks on it) never sees the probe.
        probe = hidden.detach().requires_grad_()
        terms = chunked_masters_loss(
            probe, head, targets, loss_config, reward_config, ref_logprobs, vocab_size, chunk_tokens=chunk_tokens
        ).terms
        output.term_gradients = term_gradients(terms, probe)
    return output


def term_gradients(terms: dict[str, torch.Tensor], at: torch.Tensor) -> dict[str, float]:
    """Gradient norms of the weighted GRPO and JSD terms at `at` (the student's final hidden states, or
    its logits for the unchunked loss) and the cosine between the two gradients: which term drives an
    update, and whether they pull the same way (cosine < 0: against each other)."""
    grpo, jsd = (
        torch.autograd.grad(terms[name], at, retain_graph=True)[0].flatten().double() for name in ("grpo", "jsd")
    )
    grpo_norm, jsd_norm = grpo.norm(), jsd.norm()
    cosine = (grpo @ jsd) / (grpo_norm * jsd_norm).clamp_min(1e-30)
    return {"grad_norm_grpo": float(grpo_norm), "grad_norm_jsd": float(jsd_norm), "grad_cosine_grpo_jsd": float(cosine)}


def step_metrics(output: MastersLossOutput, batch: ResponseBatch) -> dict[str, float]:
    """Logged scalars of one micro-batch: every loss term, mean R_acc (also for JSD-only objectives),
    mean D, KL, the number of response tokens, and the correlation of R_distill with response length."""
    metrics = output.metrics()
    metrics.setdefault("accuracy_reward", float(batch.targets.accuracy_reward.mean()))
    metrics["tokens"] = float(batch.num_response_tokens)
    if output.distill_reward is not None:
        # Does R_distill rank responses by what they say, or by how long they are?
        lengths = batch.targets.response_mask.sum(dim=1).to(output.distill_reward.dtype)
        metrics["distill_reward_length_corr"] = _correlation(output.distill_reward, lengths)
    return metrics


def _correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; 0 when either side is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    scale = float(x.norm() * y.norm())
    return float(x @ y) / scale if scale > 0 else 0.0
