"""The Masters loss: top-k JSD against direct computations, the policy term's gradient, the batch layout,
and the chunked loss against the unchunked one (values and gradients, every objective and family)."""

import math

import pytest
import torch

from family_models import build_tiny_vlm
from stage_records import synthetic_records

from masters.batching import collate_records
from masters.config import LossConfig, RewardConfig
from masters.families import VLMFamily
from masters.losses import (
    LossTargets,
    chunked_masters_loss,
    chunked_token_logprobs,
    masters_loss,
    policy_loss,
    response_divergence,
    token_logprobs,
    topk_jsd,
)
from masters.models import load_model
from masters.rewards import grpo_advantages, reverse_min_max
from masters.student_loss import needs_reference, step_metrics, student_loss
from masters.tiny_vlms import ARCHITECTURES


def full_jsd(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Direct full-vocabulary JSD (nats) per position, in float64."""
    p = teacher_logits.double().softmax(-1)
    q = student_logits.double().softmax(-1)
    m = 0.5 * (p + q)
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs, ids = teacher_logits.log_softmax(-1).topk(k, dim=-1)
    return ids, logprobs


def random_batch(generator, groups=(4, 3), length=6, vocab=11, k=4, student_vocab=None):
    """A batch of len(groups) groups with ragged response lengths and a left-over prompt region."""
    sizes = list(groups)
    size = sum(sizes)
    teacher_logits = torch.randn(size, length, vocab, generator=generator) * 2
    ids, logprobs = teacher_topk(teacher_logits, k)
    mask = torch.zeros(size, length, dtype=torch.bool)
    for row in range(size):
        start = int(torch.randint(0, 2, (1,), generator=generator))  # prompt positions
        end = int(torch.randint(start + 1, length + 1, (1,), generator=generator))  # padding after
        mask[row, start:end] = True
    # groups interleaved so the layout code has to sort them out
    group_index = torch.cat([torch.full((n,), 10 * g) for g, n in enumerate(sizes)])
    group_index = group_index[torch.randperm(size, generator=generator)]
    batch = LossTargets(
        target_ids=torch.randint(0, vocab, (size, length), generator=generator),
        response_mask=mask,
        teacher_topk_ids=ids,
        teacher_topk_logprobs=logprobs,
        group_index=group_index,
        accuracy_reward=torch.randint(0, 2, (size,), generator=generator).float(),
    )
    student_logits = torch.randn(size, length, student_vocab or vocab, generator=generator)
    return batch, student_logits


# --------------------------------------------------------------------------- token JSD


def test_topk_jsd_with_k_equal_vocab_is_the_full_jsd():
    generator = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(3, 5, 13, generator=generator) * 3
    student_logits = torch.randn(3, 5, 13, generator=generator) * 3
    ids, logprobs = teacher_topk(teacher_logits, 13)
    jsd = topk_jsd(student_logits, ids, logprobs)
    torch.testing.assert_close(jsd.double(), full_jsd(teacher_logits, student_logits), atol=2e-6, rtol=1e-5)


def test_topk_jsd_hand_computed_tail_bucket():
    # vocab of 4; teacher (0.5, 0.3, 0.1, 0.1) stores its top-2 ids {0, 1}; the student is uniform.
    ids = torch.tensor([[[0, 1]]])
    logprobs = torch.tensor([[[math.log(0.5), math.log(0.3)]]])
    student_logits = torch.zeros(1, 1, 4)
    p, q = (0.5, 0.3, 0.2), (0.25, 0.25, 0.5)  # collapsed: two ids + tail
    m = [(a + b) / 2 for a, b in zip(p, q)]
    expected = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m))
    expected += 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m))
    assert expected == pytest.approx(0.0556, abs=1e-4)  # by hand: (0.05802 + 0.05314) / 2
    torch.testing.assert_close(topk_jsd(student_logits, ids, logprobs), torch.tensor([[expected]]))


def test_topk_jsd_is_zero_for_equal_distributions():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 17, generator=generator) * 4
    for k in (1, 5, 17):
        ids, logprobs = teacher_topk(logits, k)
        torch.testing.assert_close(topk_jsd(logits, ids, logprobs), torch.zeros(2, 4), atol=1e-6, rtol=0)


def test_topk_jsd_is_symmetric():
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 9, generator=generator) * 2
    b = torch.randn(2, 3, 9, generator=generator) * 2
    ids = torch.randperm(9, generator=generator)[:4].expand(2, 3, 4).contiguous()  # same buckets both ways
    a_to_b = topk_jsd(b, ids, a.log_softmax(-1).gather(-1, ids))
    b_to_a = topk_jsd(a, ids, b.log_softmax(-1).gather(-1, ids))
    torch.testing.assert_close(a_to_b, b_to_a, atol=1e-6, rtol=1e-5)
    assert (a_to_b > 0).all() and (a_to_b <= math.log(2)).all()


def test_topk_jsd_temperature_scales_student_logits_only():
    generator = torch.Generator().manual_seed(3)
    teacher_logits = torch.randn(2, 3, 7, generator=generator)
    student_logits = torch.randn(2, 3, 7, generator=generator)
    ids, logprobs = teacher_topk(teacher_logits, 3)
    torch.testing.assert_close(
        topk_jsd(student_logits * 2.0, ids, logprobs, temperature=2.0), topk_jsd(student_logits, ids, logprobs)
    )
    hotter = topk_jsd(student_logits, ids, logprobs, temperature=2.0)
    assert not torch.allclose(hotter, topk_jsd(student_logits, ids, logprobs))


def test_topk_jsd_truncates_padded_student_vocab():
    generator = torch.Generator().manual_seed(4)
    teacher_logits = torch.randn(2, 3, 10, generator=generator)
    student_logits = torch.randn(2, 3, 10, generator=generator)
    padded = torch.cat([student_logits, torch.full((2, 3, 6), 5.0)], dim=-1)  # rows past the tokenizer
    ids, logprobs = teacher_topk(teacher_logits, 10)
    expected = full_jsd(teacher_logits, student_logits).float()
    torch.testing.assert_close(topk_jsd(padded, ids, logprobs, vocab_size=10), expected, atol=2e-6, rtol=1e-5)
    assert (topk_jsd(padded, ids, logprobs) - expected).abs().max() > 0.1
    with pytest.raises(ValueError, match="vocab_size"):
        topk_jsd(padded, ids, logprobs, vocab_size=17)
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        topk_jsd(padded, ids + 9, logprobs, vocab_size=10)


def test_topk_jsd_is_finite_at_extremes():
    logits = torch.tensor([[[60.0, -60.0, 0.0, -1e9]]], requires_grad=True)
    ids = torch.tensor([[[1, 3]]])
    logprobs = torch.tensor([[[-math.inf, math.log(0.999999)]]])  # stored -inf, tail ≈ 1e-6
    jsd = topk_jsd(logits, ids, logprobs)
    jsd.sum().backward()
    assert torch.isfinite(jsd).all() and torch.isfinite(logits.grad).all()
    assert 0 < float(jsd.detach()) <= math.log(2) + 1e-6
    bf16 = topk_jsd(logits.detach().bfloat16(), ids, logprobs)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()


def test_response_divergence_is_the_masked_token_mean():
    token_divergence = torch.tensor([[0.1, 0.2, 0.3, 9.0], [5.0, 0.4, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, False], [False, True, False, False]])
    torch.testing.assert_close(response_divergence(token_divergence, mask), torch.tensor([0.2, 0.4]))


# --------------------------------------------------------------------------- policy term


def test_policy_gradient_is_advantage_weighted_logprob_gradient():
    generator = torch.Generator().manual_seed(5)
    batch, logits = random_batch(generator, groups=(4, 3))
    logits.requires_grad_(True)
    config = LossConfig(jsd_weight=0.0, kl_beta=0.0)
    out = masters_loss(logits, batch, config, RewardConfig())
    out.loss.backward()
    # R_distill comes from the same logits but must not be differentiated
    assert not (out.divergence.requires_grad or out.reward.requires_grad or out.advantages.requires_grad)

    mask = batch.response_mask
    size = mask.shape[0]
    tokens = mask.sum(-1, keepdim=True)
    # ∂ log softmax(z)[y] / ∂z = onehot(y) − softmax(z)
    dlogp = torch.nn.functional.one_hot(batch.target_ids, logits.shape[-1]).float() - logits.detach().softmax(-1)
    weight = torch.where(mask, -out.advantages[:, None] / (tokens * size), 0.0)
    torch.testing.assert_close(logits.grad, weight[..., None] * dlogp)
    assert out.advantages.abs().sum() > 0  # the check is not vacuous
    # ratio is 1 in value, so the value is −mean_j A_j, which is 0 because each group sums to 0
    assert float(out.loss.detach()) == pytest.approx(0.0, abs=1e-6)


def test_kl_term_is_zero_with_zero_gradient_at_the_reference():
    generator = torch.Generator().manual_seed(6)
    logprobs = (-torch.rand(3, 5, generator=generator) * 4).requires_grad_(True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    loss, kl = policy_loss(logprobs, torch.zeros(3), mask, logprobs.detach().clone(), kl_beta=0.1)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(kl) == 0.0
    assert torch.equal(logprobs.grad, torch.zeros(3, 5))


def test_kl_term_value_and_gradient():
    generator = torch.Generator().manual_seed(7)
    logprobs = (-torch.rand(2, 4, generator=generator) * 3).requires_grad_(True)
    ref = -torch.rand(2, 4, generator=generator) * 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    beta = 0.3
    loss, kl = policy_loss(logprobs, torch.zeros(2), mask, ref, kl_beta=beta)
    loss.backward()
    delta = (ref - logprobs.detach())
    k3 = delta.exp() - delta - 1
    assert (k3 >= 0).all()
    tokens = mask.sum(-1, keepdim=True)
    torch.testing.assert_close(kl, k3[mask].mean())
    torch.testing.assert_close(loss.detach(), beta * (torch.where(mask, k3, 0).sum(-1) / tokens.squeeze(-1)).mean())
    # ∂/∂logp [β·k3 / (T_j·B)] = β (1 − exp(ref − logp)) / (T_j·B)
    expected = torch.where(mask, beta * (1 - delta.exp()) / (tokens * 2), 0.0)
    torch.testing.assert_close(logprobs.grad, expected)


def test_kl_stays_finite_far_from_the_reference():
    logprobs = torch.tensor([[-200.0, -1.0]], requires_grad=True)
    loss, kl = policy_loss(logprobs, torch.zeros(1), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2), 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(kl) and torch.isfinite(logprobs.grad).all()


def test_token_logprobs_matches_log_softmax_and_masks():
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 6, generator=generator)
    targets = torch.tensor([[1, 5, -100], [0, 2, 3]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    got = token_logprobs(torch.cat([logits, torch.zeros(2, 3, 2)], -1), targets, mask, vocab_size=6)
    expected = logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    torch.testing.assert_close(got, torch.where(mask, expected, 0.0))
    with pytest.raises(ValueError, match="target_ids"):
        token_logprobs(logits, targets + 6, mask)


# --------------------------------------------------------------------------- the full loss


def test_full_loss_rewards_follow_the_groups():
    generator = torch.Generator().manual_seed(9)
    batch, logits = random_batch(generator, groups=(4, 1, 3))
    ref_logits = logits + 0.1 * torch.randn(logits.shape, generator=generator)
    ref = token_logprobs(ref_logits, batch.target_ids, batch.response_mask)
    config = LossConfig()
    out = masters_loss(logits, batch, config, RewardConfig(), ref_logprobs=ref)

    token_jsd = topk_jsd(logits, batch.teacher_topk_ids, batch.teacher_topk_logprobs)
    mask = batch.response_mask
    torch.testing.assert_close(out.jsd, token_jsd[mask].mean())
    torch.testing.assert_close(out.divergence, response_divergence(token_jsd, mask))
    for group in batch.group_index.unique():
        members = batch.group_index == group
        distill = reverse_min_max(out.divergence[members])
        torch.testing.assert_close(out.distill_reward[members], distill)
        reward = batch.accuracy_reward[members] + distill
        torch.testing.assert_close(out.reward[members], reward)
        torch.testing.assert_close(out.advantages[members], grpo_advantages(reward, config.advantage_eps))
        assert abs(float(out.advantages[members].sum())) < 1e-5
    single = batch.group_index == 10
    assert out.distill_reward[single].item() == 0.0 and out.advantages[single].item() == 0.0
    torch.testing.assert_close(out.loss, config.grpo_weight * out.grpo + config.jsd_weight * out.jsd)
    assert float(out.kl) > 0
    metrics = out.metrics()
    assert set(metrics) == {
        "loss", "jsd", "divergence", "grpo", "kl", "accuracy_reward", "distill_reward", "reward", "advantage_abs"
    }
    assert metrics["accuracy_reward"] == pytest.approx(float(batch.accuracy_reward.mean()))


def test_jsd_only_objectives_need_no_rewards_or_reference():
    generator = torch.Generator().manual_seed(10)
    batch, logits = random_batch(generator)
    batch.group_index = batch.accuracy_reward = None
    for objective in ("naive", "mask_progressive"):
        out = masters_loss(logits, batch, LossConfig(objective=objective, jsd_weight=0.5), RewardConfig())
        torch.testing.assert_close(out.loss, 0.5 * out.jsd)
        assert out.grpo is None and out.advantages is None
        assert set(out.metrics()) == {"loss", "jsd", "divergence"}


def test_sft_objective_is_the_mean_next_token_loss_of_the_responses():
    generator = torch.Generator().manual_seed(11)
    batch, logits = random_batch(generator)
    batch.group_index = batch.accuracy_reward = None  # nothing of the rewards is needed
    logits.requires_grad_(True)
    out = masters_loss(logits, batch, LossConfig(objective="sft"), RewardConfig())
    mask = batch.response_mask.bool()
    expected = torch.nn.functional.cross_entropy(logits[mask], batch.target_ids[mask])
    torch.testing.assert_close(out.loss, expected)
    assert out.grpo is None and set(out.metrics()) == {"loss", "jsd", "divergence"}
    out.loss.backward()
    assert logits.grad[~mask].abs().max() == 0  # prompt and padding positions get no gradient


def test_padding_garbage_is_ignored():
    generator = torch.Generator().manual_seed(11)
    batch, logits = random_batch(generator, student_vocab=13, vocab=11)
    ref = token_logprobs(logits, batch.target_ids, batch.response_mask, vocab_size=11)
    config, rewards = LossConfig(), RewardConfig()
    clean = masters_loss(logits, batch, config, rewards, ref, vocab_size=11)
    outside = ~batch.response_mask
    batch.target_ids[outside] = -100
    batch.teacher_topk_ids[outside] = -1
    batch.teacher_topk_logprobs[outside] = math.nan
    ref[outside] = math.nan
    logits.requires_grad_(True)
    dirty = masters_loss(logits, batch, config, rewards, ref, vocab_size=11)
    dirty.loss.backward()
    torch.testing.assert_close(dirty.loss.detach(), clean.loss)
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[outside], torch.zeros_like(logits.grad[outside]))
    assert torch.equal(logits.grad[..., 11:], torch.zeros_like(logits.grad[..., 11:]))


def test_bad_batches_name_the_field():
    generator = torch.Generator().manual_seed(12)
    batch, logits = random_batch(generator)
    full = LossConfig()
    with pytest.raises(ValueError, match="ref_logprobs"):
        masters_loss(logits, batch, full, RewardConfig())
    masters_loss(logits, batch, LossConfig(kl_beta=0.0), RewardConfig())  # no reference needed without KL
    def replaced(**fields):
        return LossTargets(**{**vars(batch), **fields})

    with pytest.raises(ValueError, match="response_mask must have shape"):
        masters_loss(logits, replaced(response_mask=batch.response_mask[:, :-1]), full, RewardConfig())
    with pytest.raises(ValueError, match="group_index must have shape"):
        masters_loss(logits, replaced(group_index=batch.group_index[:-1]), full, RewardConfig())
    with pytest.raises(ValueError, match="accuracy_reward"):
        masters_loss(logits, replaced(accuracy_reward=None), LossConfig(kl_beta=0.0), RewardConfig())
    empty_mask = batch.response_mask.clone()
    empty_mask[2] = False
    with pytest.raises(ValueError, match=r"rows \[2\] have no response tokens"):
        masters_loss(logits, replaced(response_mask=empty_mask), full, RewardConfig())


def _tiny_lm(vocab: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab))


def _train(student, batch, input_ids, config, rewards, ref=None, steps=30):
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.05)
    outputs = []
    for _ in range(steps):
        out = masters_loss(student(input_ids[:, :-1]), batch, config, rewards, ref)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        outputs.append(out)
    return outputs


def test_training_a_tiny_student():
    """Real optimisation loops on an embedding + linear student: the JSD term pulls it to the
    teacher; the policy term raises the likelihood of the one correct response the most."""
    torch.manual_seed(13)
    vocab, length, group = 12, 5, 4
    input_ids = torch.randint(0, vocab, (group, length + 1))
    ids, logprobs = teacher_topk(torch.randn(group, length, vocab) * 2, 6)
    batch = LossTargets(
        target_ids=input_ids[:, 1:],
        response_mask=torch.ones(group, length, dtype=torch.bool),
        teacher_topk_ids=ids,
        teacher_topk_logprobs=logprobs,
        group_index=torch.zeros(group, dtype=torch.long),
        accuracy_reward=torch.tensor([1.0, 0.0, 0.0, 0.0]),
    )

    outputs = _train(_tiny_lm(vocab), batch, input_ids, LossConfig(objective="mask_progressive"), RewardConfig())
    assert float(outputs[-1].jsd) < 0.8 * float(outputs[0].jsd)

    student, reference = _tiny_lm(vocab), _tiny_lm(vocab)
    reference.load_state_dict(student.state_dict())
    with torch.no_grad():
        ref = token_logprobs(reference(input_ids[:, :-1]), batch.target_ids, batch.response_mask)
    config = LossConfig(jsd_weight=0.0)
    outputs = _train(student, batch, input_ids, config, RewardConfig(use_distill=False), ref)
    with torch.no_grad():
        logprobs_after = token_logprobs(student(input_ids[:, :-1]), batch.target_ids, batch.response_mask)
    gain = (logprobs_after - ref).mean(-1)
    assert gain[0] > 0 and gain[0] > gain[1:].max()
    assert float(outputs[-1].kl) > 0  # it moved away from the reference, and the KL saw it


# --------------------------------------------------------------------------- chunked over tokens

# name → (config, whether the frozen reference's log-probs are passed)
OBJECTIVES = {
    "sft": (LossConfig(objective="sft"), False),
    "naive": (LossConfig(objective="naive", jsd_weight=0.5), False),
    "mask_progressive": (LossConfig(objective="mask_progressive"), False),
    "full": (LossConfig(), True),
    "full_without_reference": (LossConfig(kl_beta=0.0), False),
    "full_at_temperature": (LossConfig(temperature=1.7), True),  # JSD and GRPO read different log-softmaxes
}
CHUNKS = ("one token", "ragged", "all tokens")
OUTPUT_FIELDS = ("loss", "jsd", "divergence", "grpo", "kl", "accuracy_reward", "distill_reward", "reward", "advantages")


def chunk_size(name: str, tokens: int) -> int:
    """1, a size that does not divide the response token count, or more than all of them."""
    if name == "one token":
        return 1
    if name == "all tokens":
        return tokens + 7
    return next(size for size in range(3, tokens) if tokens % size)


def assert_same_output(chunked, whole, atol=1e-6, rtol=1e-5) -> None:
    for name in OUTPUT_FIELDS:
        obtained, expected = getattr(chunked, name), getattr(whole, name)
        assert (obtained is None) == (expected is None), name
        if expected is not None:
            torch.testing.assert_close(obtained.detach(), expected.detach(), atol=atol, rtol=rtol, msg=name)


def linear_head_case(seed: int):
    """A random batch (vocabulary 11), hidden states [B, T, 8] and a linear head with two padded rows."""
    generator = torch.Generator().manual_seed(seed)
    batch, _ = random_batch(generator, groups=(4, 1, 3), length=7, vocab=11, k=4)
    head = torch.nn.Linear(8, 13)
    with torch.no_grad():
        head.weight.copy_(torch.randn(13, 8, generator=generator))
        head.bias.copy_(torch.randn(13, generator=generator))
    hidden = torch.randn(8, 7, 8, generator=generator)
    with torch.no_grad():
        ref_logits = head(hidden + 0.3 * torch.randn(hidden.shape, generator=generator))
    ref = token_logprobs(ref_logits, batch.target_ids, batch.response_mask, vocab_size=11)
    return batch, head, hidden, ref


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_chunked_loss_equals_the_unchunked_loss(objective, chunks):
    config, with_reference = OBJECTIVES[objective]
    batch, head, hidden, ref = linear_head_case(14)
    ref = ref if with_reference else None
    tokens = int(batch.response_mask.sum())

    def loss_and_grads(chunk_tokens):
        head.zero_grad(set_to_none=True)
        states = hidden.clone().requires_grad_(True)
        if chunk_tokens is None:
            out = masters_loss(head(states), batch, config, RewardConfig(), ref, vocab_size=11)
        else:
            out = chunked_masters_loss(states, head, batch, config, RewardConfig(), ref, 11, chunk_tokens=chunk_tokens)
        out.loss.backward()
        return out, (states.grad, head.weight.grad, head.bias.grad)

    whole, whole_grads = loss_and_grads(None)
    chunked, chunked_grads = loss_and_grads(chunk_size(chunks, tokens))
    assert_same_output(chunked, whole)
    for name, obtained, expected in zip(("hidden states", "weight", "bias"), chunked_grads, whole_grads):
        torch.testing.assert_close(obtained, expected, atol=1e-6, rtol=1e-5, msg=name)
    assert whole_grads[1].abs().sum() > 0 and float(whole.loss.detach()) != 0.0  # not vacuous
    assert torch.equal(chunked_grads[1][11:], torch.zeros(2, 8))  # padded vocabulary rows get no gradient


def test_chunked_token_logprobs_equal_token_logprobs():
    batch, head, hidden, _ = linear_head_case(15)
    mask = batch.response_mask
    expected = token_logprobs(head(hidden), batch.target_ids, mask, vocab_size=11)
    for chunk_tokens in (1, 4, 1000):
        got = chunked_token_logprobs(hidden, head, batch.target_ids, mask, vocab_size=11, chunk_tokens=chunk_tokens)
        torch.testing.assert_close(got, expected)
        assert torch.equal(got[~mask], torch.zeros(int((~mask).sum())))


def test_chunked_loss_runs_the_head_on_one_chunk_at_a_time_and_recomputes_it_in_backward():
    batch, head, hidden, ref = linear_head_case(16)
    rows = []
    head.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    tokens = int(batch.response_mask.sum())
    out = chunked_masters_loss(hidden.requires_grad_(True), head, batch, LossConfig(), RewardConfig(), ref, 11, chunk_tokens=4)
    per_chunk = [4] * (tokens // 4) + ([tokens % 4] if tokens % 4 else [])
    assert rows == per_chunk  # only response tokens, never more than a chunk
    out.loss.backward()
    # each chunk's logits were dropped in forward and recomputed in backward (in backward's order)
    assert sorted(rows[len(per_chunk) :]) == sorted(per_chunk)


def test_chunked_loss_ignores_padding_garbage():
    batch, head, hidden, ref = linear_head_case(17)
    config = LossConfig()
    clean = chunked_masters_loss(hidden, head, batch, config, RewardConfig(), ref, 11, chunk_tokens=3)
    outside = ~batch.response_mask
    hidden[outside] = math.nan  # the hidden states of prompt and padding positions are never read
    batch.target_ids[outside] = -100
    batch.teacher_topk_ids[outside] = -1
    batch.teacher_topk_logprobs[outside] = math.nan
    ref[outside] = math.nan
    states = hidden.requires_grad_(True)
    dirty = chunked_masters_loss(states, head, batch, config, RewardConfig(), ref, 11, chunk_tokens=3)
    dirty.loss.backward()
    assert_same_output(dirty, clean, atol=0, rtol=0)
    assert torch.isfinite(head.weight.grad).all() and torch.equal(states.grad[outside], torch.zeros_like(states.grad[outside]))


def test_chunked_loss_rejects_bad_inputs():
    batch, head, hidden, ref = linear_head_case(18)
    config = LossConfig()
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer"):
        chunked_masters_loss(hidden, head, batch, config, RewardConfig(), ref, 11, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"hidden_states must be \[B, T, H\]"):
        chunked_masters_loss(hidden[0], head, batch, config, RewardConfig(), ref, 11, chunk_tokens=4)
    with pytest.raises(ValueError, match="ref_logprobs"):
        chunked_masters_loss(hidden, head, batch, config, RewardConfig(), None, 11, chunk_tokens=4)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_masters_loss(hidden, head, batch, config, RewardConfig(), ref, 14, chunk_tokens=4)
    batch.teacher_topk_ids[batch.response_mask.nonzero()[0].tolist()] = 11
    with pytest.raises(ValueError, match="teacher_topk_ids holds ids outside 0..10"):
        chunked_masters_loss(hidden, head, batch, config, RewardConfig(), ref, 11, chunk_tokens=4)


# --------------------------------------------------------------------------- chunked loss on VLMs


def student_and_reference(model_dir, seed: int = 0):
    """The student in train mode, and a frozen reference that is the student slightly perturbed (KL > 0)."""
    student, processor = load_model(model_dir)
    student.train()
    reference = load_model(model_dir)[0].requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return student, reference, processor


def student_loss_and_grads(student, reference, batch, config, vocab, chunk_tokens):
    student.zero_grad(set_to_none=True)
    config = config.model_copy(update={"chunk_tokens": chunk_tokens})
    out = student_loss(student, reference if needs_reference(config) else None, batch, config, RewardConfig(), vocab)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}


def assert_same_student_loss(student, reference, batch, config, vocab, chunk_tokens) -> None:
    whole, whole_grads = student_loss_and_grads(student, reference, batch, config, vocab, None)
    chunked, chunked_grads = student_loss_and_grads(student, reference, batch, config, vocab, chunk_tokens)
    assert_same_output(chunked, whole, atol=1e-6, rtol=1e-5)
    assert chunked_grads.keys() == whole_grads.keys() and len(whole_grads) > 10
    for name, expected in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], expected, atol=1e-6, rtol=1e-4, msg=name)
    if needs_reference(config):
        assert float(whole.kl) > 0


@pytest.fixture(scope="module")
def micro_case(micro_model_dir):
    student, reference, processor = student_and_reference(micro_model_dir)
    records = synthetic_records(processor, num_questions=3, group_size=4, topk=8, seed=3, max_response_tokens=9)
    return student, reference, collate_records(records, VLMFamily(student, processor)), len(processor.tokenizer)


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_chunked_student_loss_equals_the_unchunked_one(micro_case, objective, chunks):
    """Value, every logged term and the gradient of every student parameter, reference included."""
    student, reference, batch, vocab = micro_case
    config, _ = OBJECTIVES[objective]
    assert_same_student_loss(student, reference, batch, config, vocab, chunk_size(chunks, batch.num_response_tokens))


def test_chunked_student_loss_through_a_wrapper_and_the_head_calls(micro_case):
    """Through a DDP-like wrapper (forward delegated to `.module`): the model's own forward runs with its LM
    head on no position; then the head runs per chunk, and again per chunk in backward."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **inputs):
            return self.module(**inputs)

    student, reference, batch, vocab = micro_case
    rows = []
    handle = student.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape[:-1])))
    try:
        out = student_loss(Wrapper(student), reference, batch, LossConfig(chunk_tokens=16), RewardConfig(), vocab)
        tokens = batch.num_response_tokens
        per_chunk = [(16,)] * (tokens // 16) + ([(tokens % 16,)] if tokens % 16 else [])
        assert rows == [(batch.inputs["input_ids"].shape[0], 0), *per_chunk]
        out.loss.backward()
        assert sorted(rows[1 + len(per_chunk) :]) == sorted(per_chunk)
    finally:
        handle.remove()
    whole = student_loss(student, reference, batch, LossConfig(chunk_tokens=None), RewardConfig(), vocab)
    assert_same_output(out, whole)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_chunked_student_loss_on_every_family(architecture, tmp_path):
    tiny = build_tiny_vlm(architecture, tmp_path / "model")
    student, reference, processor = student_and_reference(tiny.model_dir)
    records = synthetic_records(processor, num_questions=2, group_size=3, topk=8, seed=4)
    batch = collate_records(records, VLMFamily(student, processor))
    assert_same_student_loss(student, reference, batch, LossConfig(), len(processor.tokenizer), 5)


@pytest.mark.parametrize("chunk_tokens", [None, 5])
def test_term_gradients_split_the_loss_gradient_between_grpo_and_jsd(micro_case, chunk_tokens):
    """The diagnostics of a logged step: each term's gradient at the loss's input (hidden states or logits);
    diagnosing changes neither the loss nor the parameters' gradients."""
    student, reference, batch, vocab = micro_case
    config = LossConfig(chunk_tokens=chunk_tokens)
    plain, plain_grads = student_loss_and_grads(student, reference, batch, config, vocab, chunk_tokens)
    student.zero_grad(set_to_none=True)
    out = student_loss(student, reference, batch, config, RewardConfig(), vocab, diagnose=True)
    out.loss.backward()
    torch.testing.assert_close(out.loss, plain.loss)
    for name, param in student.named_parameters():
        if name in plain_grads:
            torch.testing.assert_close(param.grad, plain_grads[name], msg=name)
    metrics = out.metrics()
    assert metrics["grad_norm_grpo"] > 0 and metrics["grad_norm_jsd"] > 0
    assert -1 <= metrics["grad_cosine_grpo_jsd"] <= 1
    torch.testing.assert_close(out.terms["grpo"] + out.terms["jsd"], out.loss)
    logged = step_metrics(out, batch)
    lengths = batch.targets.response_mask.sum(dim=1).double()
    expected = torch.corrcoef(torch.stack([out.distill_reward.double(), lengths]))[0, 1]
    assert logged["distill_reward_length_corr"] == pytest.approx(float(expected))
    jsd_only = student_loss(student, None, batch, LossConfig(objective="mask_progressive"), RewardConfig(), vocab, diagnose=True)
    assert jsd_only.term_gradients is None  # only the full objective has two terms to compare
