"""The engine protocol and the transformers engine (the default, CPU and GPU).

An engine owns one resident model. A replica hands it whole batches, all at one mask level:
`generate` samples completions, `score` returns the model's top-k log-probs on given responses,
`set_mask_ratio` re-masks the weights in place (`masters.masking.TeacherMasker`).

Reproducible seeds: the transformers engine runs its own decoding loop (KV cache, left padding,
explicit position ids) and draws every sample from its own `torch.Generator`, seeded from the
request's seed and the sample's index. A seeded request therefore draws the same random numbers
whatever else shares its batch; its logits differ from a solo run only by float rounding in
batched kernels (a flip needs a draw within ~1e-6 of a boundary, never observed here).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from masters.config import MaskConfig, ServeConfig
from masters.families import VLMFamily, inputs_on
from masters.models import load_model

from serve.api import ChatMessage, ServeError, TokenScores
from serve.images import load_image

# --------------------------------------------------------------------------- engine-neutral inputs


@dataclass
class ChatPrompt:
    """A chat in the model's template form (`{"type": "image"}` parts) and its decoded images, in order."""

    messages: list[dict]
    images: list[Image.Image]


def chat_prompt(messages: list[ChatMessage], config: ServeConfig) -> ChatPrompt:
    """OpenAI messages → template messages + images; image errors are 400s naming the problem."""
    template_messages, images = [], []
    for message in messages:
        if isinstance(message.content, str):
            template_messages.append({"role": message.role, "content": message.content})
            continue
        parts = []
        for part in message.content:
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                images.append(load_image(part.image_url.url, config))
                parts.append({"type": "image"})
        template_messages.append({"role": message.role, "content": parts})
    return ChatPrompt(template_messages, images)


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling parameters of one request (the paper's: temperature, top-p, top-k, repetition penalty)."""

    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int = field(default_factory=lambda: secrets.randbits(63))
    top_logprobs: int | None = None  # None: no log-probs returned; 0: only the sampled token's
    score_top_logprobs: int | None = None  # record each sampled token's scores, as `score` would return them


@dataclass
class EncodedPrompt:
    """A prompt ready for an engine: token ids (image placeholders expanded) and its images."""

    token_ids: list[int]  # what the model sees: counts against the context and in `usage`
    images: list[Image.Image]
    engine_input: Any = None  # engine-specific: `PromptInputs` (transformers), unexpanded ids (vLLM)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    # Per generated token: (token id, log-prob, [(top id, top log-prob), ...]) when asked for.
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    scores: TokenScores | None = None  # with `Sampling.score_top_logprobs`: the unprocessed distribution's top-k


class Engine(Protocol):
    """What a replica needs from an inference engine; all calls of one replica are serialised."""

    max_context: int
    vocab_size: int
    max_top_k: int  # the largest k `score` can return
    mask_ratio: float

    def encode_chat(self, prompt: ChatPrompt) -> EncodedPrompt: ...

    def encode_text(self, text: str) -> list[int]: ...

    def decode_token(self, token_id: int) -> str: ...

    def generate(self, batch: list[tuple[EncodedPrompt, Sampling]]) -> list[list[Completion]]: ...

    def score(self, batch: list[tuple[EncodedPrompt, list[int], int]]) -> list[TokenScores]: ...

    def set_mask_ratio(self, mask_ratio: float) -> float: ...

    def health(self) -> dict: ...


@dataclass
class SwitchTimes:
    """How long each mask-level switch of an engine took, for `health()`."""

    seconds: list[float] = field(default_factory=list)

    def timed(self, switch: Callable[[], object]) -> float:
        """Run `switch`; returns and records the seconds it took."""
        started = time.perf_counter()
        switch()
        self.seconds.append(time.perf_counter() - started)
        return self.seconds[-1]

    def health(self) -> dict:
        seconds = self.seconds
        return {
            "level_switches": len(seconds),
            "last_switch_s": round(seconds[-1], 4) if seconds else None,
            "mean_switch_s": round(sum(seconds) / len(seconds), 4) if seconds else None,
        }


def seeded_generator(seed: int, sample_index: int, device: torch.device) -> torch.Generator:
    """Sample j of a request with seed s always draws from the same stream."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + sample_index) & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def top_k_scores(logprobs: torch.Tensor, token_ids: torch.Tensor, top_k: int) -> TokenScores:
    """`logprobs` [T, V] predicting `token_ids` [T]: the scored tokens' log-probs, top-k and tail mass."""
    top = logprobs.topk(top_k, dim=-1)
    return token_scores(token_ids, logprobs.gather(-1, token_ids[:, None])[:, 0], top.values, top.indices)


def token_scores(token_ids: torch.Tensor, token_logprobs: torch.Tensor, top_values: torch.Tensor, top_ids: torch.Tensor) -> TokenScores:
    """[T] tokens and their log-probs, [T, k] top log-probs and ids: with the tail mass, as arrays."""
    tail_mass = (1.0 - top_values.double().exp().sum(-1)).clamp_min(0.0)
    return TokenScores(
        token_ids=token_ids.to(torch.int32).cpu().numpy(),
        logprobs=token_logprobs.float().cpu().numpy(),
        top_ids=top_ids.to(torch.int32).cpu().numpy(),
        top_logprobs=top_values.float().cpu().numpy(),
        tail_mass=tail_mass.float().cpu().numpy(),
    )


def filter_logits(
    logits: torch.Tensor,
    seen: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    repetition_penalty: torch.Tensor,
) -> torch.Tensor:
    """Per-row sampling distribution (HF order: repetition penalty, temperature, top-k, top-p) as log-probs.

    Every operation is row-wise, so a row's distribution never depends on the other rows.
    Rows with temperature 0 keep their penalised logits (the caller takes the argmax).
    """
    penalty = repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    scores = torch.where(seen, penalised, logits)
    scores = scores / torch.where(temperature > 0, temperature, 1.0)[:, None]
    sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(scores.shape[-1], device=scores.device)[None, :]
    beyond_k = (top_k[:, None] > 0) & (ranks >= top_k[:, None])
    sorted_scores = sorted_scores.masked_fill(beyond_k, float("-inf"))
    probs = sorted_scores.softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    beyond_p = (probs.cumsum(-1) - probs) >= top_p[:, None]
    sorted_scores = sorted_scores.masked_fill(beyond_p, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores).log_softmax(-1)


# --------------------------------------------------------------------------- transformers engine


class TransformersEngine:
    """A resident transformers VLM with batched sampling and scoring and in-place mask levels."""

    def __init__(
        self,
        model_dir: str | Path,
        mask_ratios: list[float],
        mask_scope: str = MaskConfig().scope,
        device: str = "cpu",
        dtype: str = "auto",
    ):
        started = time.perf_counter()
        self.model, self.processor = load_model(model_dir, device=device, dtype=dtype)
        self.device = torch.device(device)
        self.tokenizer = self.processor.tokenizer
        text_config = self.model.config.get_text_config()
        self.max_context = int(text_config.max_position_embeddings)
        self.vocab_size = int(text_config.vocab_size)
        self.max_top_k = self.vocab_size
        self.family = VLMFamily(self.model, self.processor)
        self.pad_id = self.family.pad_id
        self.stop_ids = torch.tensor(self.family.stop_token_ids, dtype=torch.long, device=self.device)
        # Never sample special tokens other than the stop tokens (an image token in a response breaks
        # scoring it), nor padded vocabulary rows beyond the tokenizer.
        unsampleable = {i for i in self.tokenizer.all_special_ids if i not in self.family.stop_token_ids}
        unsampleable |= set(range(len(self.tokenizer), self.vocab_size))
        self.unsampleable_ids = torch.tensor(sorted(unsampleable), dtype=torch.long, device=self.device)
        self.masker = None
        if any(ratio > 0 for ratio in mask_ratios):
            from masters.masking import TeacherMasker

            self.masker = TeacherMasker(self.model, mask_ratios, mask_scope)
        self.mask_ratio = 0.0
        self.load_s = time.perf_counter() - started
        self.switch_times = SwitchTimes()
        self.batches = 0
        self.batched_items = 0
        # Token positions the model computed (padding excluded): prompts prefilled for sampling, decode
        # steps (finished rows of a batch included: they are computed too), and prompt + response scored.
        self.positions = {"prefill": 0, "decode": 0, "score": 0}

    # ----------------------------------------------------------------------- prompts

    def encode_chat(self, prompt: ChatPrompt) -> EncodedPrompt:
        text = self.processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
        try:
            inputs = self.family.encode(text, prompt.images)
        except ValueError as exc:  # e.g. a literal image placeholder in the text without an image
            raise ServeError(400, f"messages could not be encoded: {exc}", param="messages") from None
        return EncodedPrompt(inputs.token_ids, prompt.images, engine_input=inputs)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _forward_inputs(self, prompts: list[EncodedPrompt], continuations: list[list[int]] | None = None) -> dict:
        """Prompts left padded, continuations right padded (`VLMFamily.inputs`), on the model's device and dtype."""
        return inputs_on(self.family.inputs([p.engine_input for p in prompts], continuations), self.device, self.model.dtype)

    # ----------------------------------------------------------------------- generate

    @torch.inference_mode()
    def generate(self, batch: list[tuple[EncodedPrompt, Sampling]]) -> list[list[Completion]]:
        """`n` completions per request; each row stops at EOS or its own `max_tokens`."""
        self.batches += 1
        self.batched_items += len(batch)
        rows = [(request, sample) for request, (_, sampling) in enumerate(batch) for sample in range(sampling.n)]
        prompts = [batch[request][0] for request, _ in rows]
        params = [batch[request][1] for request, _ in rows]
        device = self.device

        def column(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

        temperature = column("temperature", torch.float32)
        top_p, top_k = column("top_p", torch.float32), column("top_k", torch.long)
        repetition_penalty = column("repetition_penalty", torch.float32)
        max_tokens = column("max_tokens", torch.long)
        generators = [seeded_generator(params[i].seed, sample, device) for i, (_, sample) in enumerate(rows)]
        want_logprobs = [p.top_logprobs is not None for p in params]
        score_k = max((p.score_top_logprobs for p in params if p.score_top_logprobs), default=0)
        steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per step, with score_k

        inputs = self._forward_inputs(prompts)
        self.positions["prefill"] += int(inputs["attention_mask"].sum())
        seen = torch.zeros((len(rows), self.vocab_size), dtype=torch.bool, device=device)
        seen.scatter_(1, inputs["input_ids"], inputs["attention_mask"].bool())
        attention_mask, position_ids = inputs["attention_mask"], inputs["position_ids"]
        output = self.model(**inputs, use_cache=True, logits_to_keep=1)

        generated: list[list[int]] = [[] for _ in rows]
        token_logprobs: list[list] = [[] for _ in rows]
        finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for step in range(int(max_tokens.max())):
            logits = output.logits[:, -1].float()
            sampling_logits = logits.index_fill(1, self.unsampleable_ids, float("-inf"))
            sample_logprobs = filter_logits(sampling_logits, seen, temperature, top_p, top_k, repetition_penalty)
            next_tokens = torch.full((len(rows),), self.pad_id, dtype=torch.long, device=device)
            for row in range(len(rows)):
                if finished[row]:
                    continue  # finished rows draw nothing, so a row's draws depend on itself only
                if temperature[row] == 0:
                    next_tokens[row] = sample_logprobs[row].argmax()
                else:
                    next_tokens[row] = torch.multinomial(sample_logprobs[row].exp(), 1, generator=generators[row])[0]
                generated[row].append(int(next_tokens[row]))
            if score_k or any(want_logprobs):  # the model's own distribution, before any sampling filter
                model_logprobs = logits.log_softmax(-1)
            if score_k:
                top = model_logprobs.topk(score_k, dim=-1)
                chosen = model_logprobs.gather(-1, next_tokens[:, None])[:, 0]
                steps.append((~finished, chosen, top.values, top.indices))
            if any(want_logprobs):
                for row in range(len(rows)):
                    if want_logprobs[row] and not finished[row]:
                        token = int(next_tokens[row])
                        top = model_logprobs[row].topk(params[row].top_logprobs) if params[row].top_logprobs else None
                        tops = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
                        token_logprobs[row].append((token, float(model_logprobs[row, token]), tops))
            seen[torch.arange(len(rows), device=device), next_tokens] |= ~finished
            finished |= torch.isin(next_tokens, self.stop_ids) | (step + 1 >= max_tokens)
            if bool(finished.all()):
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            # Every position axis (one, or mrope's three) advances by one per generated text token.
            position_ids = position_ids[..., -1:] + 1
            self.positions["decode"] += len(rows)
            output = self.model(
                input_ids=next_tokens[:, None],
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=output.cache,
                use_cache=True,
            )

        if score_k:
            active, chosen, top_values, top_ids = (torch.stack(parts) for parts in zip(*steps))  # [steps, rows, ...]
        results: list[list[Completion]] = [[] for _ in batch]
        for row, (request, _) in enumerate(rows):
            tokens = generated[row]
            scores = None
            if params[row].score_top_logprobs:
                k, taken = params[row].score_top_logprobs, active[:, row]
                scores = token_scores(
                    torch.tensor(tokens), chosen[taken, row], top_values[taken, row, :k], top_ids[taken, row, :k]
                )
            stopped = bool(tokens) and tokens[-1] in self.family.stop_token_ids
            text = self.tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=True)
            results[request].append(
                Completion(
                    text=text,
                    token_ids=tokens,
                    finish_reason="stop" if stopped else "length",
                    logprobs=token_logprobs[row] if want_logprobs[row] else None,
                    scores=scores,
                )
            )
        return results

    # ----------------------------------------------------------------------- score

    @torch.inference_mode()
    def score(self, batch: list[tuple[EncodedPrompt, list[int], int]]) -> list[TokenScores]:
        """(prompt, response ids, k) items: one forward over prompt + response; position t scores response token t."""
        self.batches += 1
        self.batched_items += len(batch)
        prompts = [prompt for prompt, _, _ in batch]
        responses = [response for _, response, _ in batch]
        longest = max(len(response) for response in responses)
        inputs = self._forward_inputs(prompts, responses)
        self.positions["score"] += int(inputs["attention_mask"].sum())
        # Responses start at one column P in every row: the last T + 1 logits hold every prediction.
        logits = self.model(**inputs, logits_to_keep=longest + 1).logits[:, :-1]
        logprobs = logits.float().log_softmax(-1)
        scores = []
        for row, (_, response, top_k) in enumerate(batch):
            predicting = logprobs[row, : len(response)]
            token_ids = torch.tensor(response, dtype=torch.long, device=predicting.device)
            scores.append(top_k_scores(predicting, token_ids, top_k))
        return scores

    # ----------------------------------------------------------------------- levels

    def set_mask_ratio(self, mask_ratio: float) -> float:
        """Re-mask in place (only the bands between the two levels change); returns the seconds the switch took."""
        if self.mask_ratio == mask_ratio:
            return 0.0
        if self.masker is None:
            raise ValueError(f"this model is served dense only; cannot mask at {mask_ratio}")
        elapsed = self.switch_times.timed(lambda: self.masker.set_mask_ratio(mask_ratio))
        self.mask_ratio = mask_ratio
        return elapsed

    def health(self) -> dict:
        return {
            "engine": "transformers",
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "mask_ratio": self.mask_ratio,
            "load_s": round(self.load_s, 3),
            "batches": self.batches,
            "mean_batch_size": round(self.batched_items / max(self.batches, 1), 2),
            **{f"{kind}_positions": count for kind, count in self.positions.items()},
            **self.switch_times.health(),
        }
