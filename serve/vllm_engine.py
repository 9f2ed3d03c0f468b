"""The vLLM engine (GPU): batched multimodal generation, prompt log-prob scoring, in-place mask levels.

UNVERIFIED HERE: this machine has no GPU and no vLLM, so this module has never been run; it is
written against vLLM's documented offline API (`LLM.generate` with token prompts + `multi_modal_data`,
`SamplingParams(prompt_logprobs=k)` with a raised `max_logprobs`, `LLM.apply_model`). It is
imported only when `serve.engine: vllm`.

Mask levels: each worker keeps, per Hugging Face tensor the scope masks, its place in the checkpoint
and its per-level bounds (computed once from one read of the tensor in the served dtype). A switch
reads the tensors again from the memory-mapped safetensors files, masks them on the GPU and writes
them through the model's own `load_weights`, which fuses (qkv, gate/up) and shards them for tensor
parallelism exactly as at load time. Masks are therefore per Hugging Face tensor, identical to
`TeacherMasker`'s, with no restart and no dense copy per worker: host memory holds one tensor at a
time, and the page cache one copy of the checkpoint per node, shared by its workers.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from pathlib import Path

import torch

from masters.config import isclose_ratio
from masters.families import encode_prompt, template_writes_bos
from masters.models import resolve_dtype

from serve.api import ServeError, TokenScores
from serve.engine import ChatPrompt, Completion, EncodedPrompt, Sampling, SwitchTimes

# --------------------------------------------------------------------------- inside vLLM's workers


def _init_levels(model: torch.nn.Module, model_dir: str, mask_ratios: list[float], scope: str) -> int:
    """Remember where each masked-scope tensor lies in the checkpoint and its per-level bounds.

    The bounds need one read and sort of each tensor; the tensor itself is not kept (a 38B teacher's
    dense copy would be ~76 GB of host memory in every tensor-parallel worker).
    """
    from safetensors import safe_open

    from masters.masking import checkpoint_weight_map, mask_levels, masked_checkpoint_keys

    parameter = next(model.parameters())
    weight_map = checkpoint_weight_map(Path(model_dir))
    keys = sorted(masked_checkpoint_keys(Path(model_dir), list(weight_map), scope), key=lambda k: (str(weight_map[k]), k))
    levels = []
    for file, file_keys in itertools.groupby(keys, key=lambda k: weight_map[k]):
        with safe_open(file, framework="pt") as handle:
            for key in file_keys:
                dense = handle.get_tensor(key).to(parameter.dtype)
                levels.append((key, str(file), [level.bound for level in mask_levels(dense, mask_ratios)]))
    model._masters_levels = (list(mask_ratios), parameter.dtype, parameter.device, levels)
    return len(levels)


def _set_level(model: torch.nn.Module, mask_ratio: float) -> None:
    """Read each masked tensor from the memory-mapped checkpoint (the OS page cache is shared by the
    node's workers), mask it on the GPU, and hand it to the model's own `load_weights`, one at a time."""
    from safetensors import safe_open

    from masters.masking import write_level

    mask_ratios, dtype, device, levels = model._masters_levels
    level = next(i for i, ratio in enumerate(mask_ratios) if isclose_ratio(ratio, mask_ratio))

    def masked_tensors():
        for file, entries in itertools.groupby(levels, key=lambda entry: entry[1]):
            with safe_open(file, framework="pt") as handle:
                for key, _, bounds in entries:
                    dense = handle.get_tensor(key).to(device, dtype)
                    yield key, write_level(dense, bounds[level], dense)  # in place: one copy on the GPU

    model.load_weights(masked_tensors())
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- the engine


def _token_scores(tokens: list[int], positions: list[dict], top_k: int) -> TokenScores:
    """Per token, vLLM's log-prob dict (the top-k by rank plus the token itself) as `TokenScores`."""
    logprobs, top_ids, top_logprobs, tail_mass = [], [], [], []
    for token, entry in zip(tokens, positions):
        top = _ranked(entry, top_k)
        logprobs.append(entry[token].logprob)
        top_ids.append([t for t, _ in top])
        top_logprobs.append([lp for _, lp in top])
        tail_mass.append(max(0.0, 1.0 - float(torch.tensor(top_logprobs[-1], dtype=torch.float64).exp().sum())))
    return TokenScores.from_lists(tokens, logprobs, top_ids, top_logprobs, tail_mass)


def _ranked(entry: dict, k: int) -> list[tuple[int, float]]:
    """(token id, log-prob) of ranks 1..k from one position's vLLM `Logprob` dict."""
    return [(token, lp.logprob) for token, lp in sorted(entry.items(), key=lambda item: item[1].rank) if lp.rank <= k]


class VLLMEngine:
    """A resident vLLM `LLM`; one replica serialises its calls, vLLM batches inside each call."""

    def __init__(
        self,
        model_dir: str | Path,
        mask_ratios: list[float],
        mask_scope: str,
        dtype: str,
        tensor_parallel_size: int,
        max_top_k: int,
    ):
        # apply_model ships a function to the worker processes, which vLLM allows only when asked to.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from transformers import AutoProcessor
        from vllm import LLM

        started = time.perf_counter()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        self.max_top_k = max_top_k
        self.llm = LLM(
            model=str(model_dir),
            dtype=str(resolve_dtype(dtype, "cuda")).removeprefix("torch."),
            tensor_parallel_size=tensor_parallel_size,
            max_logprobs=max_top_k,  # prompt log-probs of the score endpoint need the full top-k
        )
        model_config = self.llm.llm_engine.model_config
        self.max_context = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        self.mask_ratio = 0.0
        self.masked = any(ratio > 0 for ratio in mask_ratios)
        if self.masked:
            self.llm.apply_model(
                functools.partial(_init_levels, model_dir=str(model_dir), mask_ratios=mask_ratios, scope=mask_scope)
            )
        self.load_s = time.perf_counter() - started
        self.switch_times = SwitchTimes()
        self.batches = 0

    def encode_chat(self, prompt: ChatPrompt) -> EncodedPrompt:
        text = self.processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
        try:
            # The expanded length (image placeholders included) is what counts against the context.
            expanded = encode_prompt(self.processor, text, prompt.images).token_ids
        except ValueError as exc:
            raise ServeError(400, f"messages could not be encoded: {exc}", param="messages") from None
        # vLLM expands the image placeholders itself from the unexpanded ids.
        add_bos = not template_writes_bos(self.tokenizer, text)
        engine_input = {"prompt_token_ids": self.tokenizer(text, add_special_tokens=add_bos)["input_ids"]}
        if prompt.images:
            engine_input["multi_modal_data"] = {"image": prompt.images}
        return EncodedPrompt(list(expanded), prompt.images, engine_input=engine_input)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def generate(self, batch: list[tuple[EncodedPrompt, Sampling]]) -> list[list[Completion]]:
        from vllm import SamplingParams

        self.batches += 1
        params = [
            SamplingParams(
                n=sampling.n,
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else -1,
                repetition_penalty=sampling.repetition_penalty,
                seed=sampling.seed & 0x7FFF_FFFF_FFFF_FFFF,
                # vLLM's log-probs are of the raw model output (`logprobs_mode` "raw_logprobs", its
                # default), before temperature, top-p, top-k and penalties: what `score_top_logprobs` records.
                logprobs=max((k for k in (sampling.top_logprobs, sampling.score_top_logprobs) if k is not None), default=None),
            )
            for _, sampling in batch
        ]
        outputs = self.llm.generate([p.engine_input for p, _ in batch], params, use_tqdm=False)
        results = []
        for output, (_, sampling) in zip(outputs, batch):
            completions = []
            for sample in output.outputs:
                logprobs = None
                if sample.logprobs is not None:
                    # Each position's dict holds the top-k (rank 1..k) plus the sampled token.
                    logprobs = [
                        (token, entry[token].logprob, _ranked(entry, sampling.top_logprobs))
                        for token, entry in zip(sample.token_ids, sample.logprobs)
                    ]
                scores = None
                if sampling.score_top_logprobs:
                    scores = _token_scores(list(sample.token_ids), sample.logprobs, sampling.score_top_logprobs)
                finish = "stop" if sample.finish_reason == "stop" else "length"
                completions.append(Completion(sample.text, list(sample.token_ids), finish, logprobs, scores))
            results.append(completions)
        return results

    def score(self, batch: list[tuple[EncodedPrompt, list[int], int]]) -> list[TokenScores]:
        from vllm import SamplingParams

        self.batches += 1
        prompts = [
            {**prompt.engine_input, "prompt_token_ids": prompt.engine_input["prompt_token_ids"] + response}
            for prompt, response, _ in batch
        ]
        params = [SamplingParams(max_tokens=1, prompt_logprobs=top_k) for _, _, top_k in batch]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        # One dict per prompt position: the top-k (rank 1..k) plus the actual token.
        return [
            _token_scores(response, output.prompt_logprobs[-len(response) :], top_k)
            for output, (_, response, top_k) in zip(outputs, batch)
        ]

    def set_mask_ratio(self, mask_ratio: float) -> float:
        if isclose_ratio(self.mask_ratio, mask_ratio):
            return 0.0
        if not self.masked:
            raise ValueError(f"this model is served dense only; cannot mask at {mask_ratio}")
        elapsed = self.switch_times.timed(lambda: self.llm.apply_model(functools.partial(_set_level, mask_ratio=mask_ratio)))
        self.mask_ratio = mask_ratio
        return elapsed

    def health(self) -> dict:
        return {
            "engine": "vllm",
            "device": "cuda",
            "mask_ratio": self.mask_ratio,
            "load_s": round(self.load_s, 3),
            "batches": self.batches,
            **self.switch_times.health(),
        }
