"""Request and response payloads of the teacher service, shared by HTTP clients and Serve handles.

Chat completions follow the OpenAI schema (plus `top_k` and `repetition_penalty`, and the
generated `token_ids` on each choice), streamed as `chat.completion.chunk`s on request; `/v1/score`
is ours. Requests are strict: a wrong type or an unknown field is an error naming the field, never
a silent coercion.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator


class ServeError(Exception):
    """A request the service refuses; becomes an OpenAI-style error body with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
    ):
        super().__init__(status, message, param, code, error_type)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type

    def body(self) -> dict:
        detail = ErrorDetail(message=self.message, type=self.error_type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


# --------------------------------------------------------------------------- messages


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str = Field(description="`data:image/...;base64,...`, or a path on the server when serve.allow_local_images.")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


# --------------------------------------------------------------------------- chat completions


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="One more chunk before `[DONE]`: no choices, the request's usage.")


class ChatCompletionRequest(_Request):
    """OpenAI chat completion request; unset sampling fields take the config's `generation.sampling`."""

    model: str = Field(description="`<teacher>@<ratio>` (e.g. `teacher-l@0.15`) or `student`.")
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0 disables top-k filtering.")
    repetition_penalty: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer OpenAI name of max_tokens.")
    seed: int | None = Field(None, description="Same seed and request: same samples, whatever shares the batch.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    score_top_logprobs: int | None = Field(
        None,
        ge=1,
        description="Masters extension: per generated token, the model's top-k log-probs of its unprocessed "
        "distribution (before temperature, top-p, top-k and repetition penalty) and the mass outside them, in "
        "each choice's `scores`, as `/v1/score` would return them; capped at the vocabulary size.",
    )
    score_token_ids: list[list[int]] | None = Field(
        None,
        min_length=1,
        description="Masters extension, with `score_top_logprobs`: other responses to the same messages (token ids, as "
        "generated) to score like `/v1/score` does, in the response's `scored`; the prompt is encoded once for both.",
    )
    stream: bool = Field(False, description="Server-sent `chat.completion.chunk` events, once the completion is generated.")
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream=true")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        if self.score_token_ids is not None and self.score_top_logprobs is None:
            raise ValueError("score_token_ids: needs score_top_logprobs (how many log-probs per token)")
        if self.stream and (self.score_top_logprobs is not None or self.score_token_ids is not None):
            raise ValueError("score_top_logprobs, score_token_ids: not available with stream=true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ScoreData(BaseModel):
    """Per response token: its log-prob, the model's top-k ids and log-probs, and the mass outside the top-k."""

    index: int
    token_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    tail_mass: list[float]


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] = Field(description="Generated token ids, the final EOS included when finish_reason is stop.")
    scores: ScoreData | None = Field(
        None, description="With `score_top_logprobs`: what `/v1/score` returns for these token_ids, recorded while sampling."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    scored: list[ScoreData] | None = Field(None, description="With `score_token_ids`: their scores, in order.")


# --------------------------------------------------------------------------- streaming


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler) -> dict[str, str]:
        # OpenAI's deltas carry only what the chunk adds: `{"content": "x"}`, and `{}` in the last one.
        return {name: value for name, value in handler(self).items() if value is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    token_ids: list[int] = Field(
        default_factory=list, description="The generated ids this chunk covers; a choice's chunks join to its token_ids."
    )


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


def text_offsets(decode: Callable[[list[int]], str], token_ids: list[int], text: str) -> list[int]:
    """For each generated token, how much of `text` (its completion's text) is complete once it is out.

    Decoding token by token would split characters spelt by several tokens (byte-level BPE writes "é"
    as two) and lose spaces that tokenizers attach to the token after, so each token is decoded in a
    window with the ones before it, and a window ending in an incomplete character (U+FFFD) waits for
    the next token (vLLM's and TGI's incremental detokenization). Offsets are clamped to `text` and the
    last one is its end, so slices of `text` between them join to exactly the non-streamed text.
    """
    offsets: list[int] = []
    produced, start, read = 0, 0, 0  # tokens[start:read] is the context already counted
    for end in range(1, len(token_ids) + 1):
        before = decode(token_ids[start:read])
        now = decode(token_ids[start:end])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            produced += len(now) - len(before)
            start, read = read, end
        offsets.append(min(produced, len(text)))
    if offsets:
        offsets[-1] = len(text)
    return offsets


def completion_chunks(
    response: ChatCompletionResponse, offsets: list[list[int]], include_usage: bool = False
) -> Iterator[ChatCompletionChunk]:
    """A whole completion as the chunks OpenAI streams: per choice the assistant role, then one content
    delta per token that completes text (tokens that complete none, like a byte of "é", join the next
    one), then an empty delta with `finish_reason` (and any trailing ids, e.g. the EOS); choices
    interleave step by step. Then the usage chunk (no choices) if asked. `offsets` is `text_offsets`
    per choice."""

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=response.id, created=response.created, model=response.model, choices=choices, usage=usage
        )

    per_choice = [_choice_chunks(choice, choice_offsets) for choice, choice_offsets in zip(response.choices, offsets)]
    for step in itertools.zip_longest(*per_choice):
        for choice_chunk in step:
            if choice_chunk is not None:
                yield chunk([choice_chunk])
    if include_usage:
        yield chunk([], response.usage)


def _choice_chunks(choice: Choice, offsets: list[int]) -> Iterator[ChunkChoice]:
    text, ids = choice.message.content, choice.token_ids
    entries = choice.logprobs.content if choice.logprobs is not None else None

    def covering(positions: list[int], **fields) -> ChunkChoice:
        logprobs = ChoiceLogprobs(content=[entries[p] for p in positions]) if entries is not None and positions else None
        return ChunkChoice(index=choice.index, token_ids=[ids[p] for p in positions], logprobs=logprobs, **fields)

    yield ChunkChoice(index=choice.index, delta=ChunkDelta(role="assistant", content=""))
    done, pending = 0, []
    for position, end in enumerate(offsets):
        pending.append(position)
        if end > done:
            yield covering(pending, delta=ChunkDelta(content=text[done:end]))
            done, pending = end, []
    yield covering(pending, delta=ChunkDelta(), finish_reason=choice.finish_reason)


# --------------------------------------------------------------------------- scoring


class ScoreItem(_Request):
    """One (prompt, response) pair: the response as token ids (as generated) or as text (tokenized as is)."""

    messages: list[ChatMessage] = Field(min_length=1)
    response_token_ids: list[int] | None = Field(None, min_length=1)
    response: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_response(self) -> ScoreItem:
        if (self.response_token_ids is None) == (self.response is None):
            raise ValueError("give exactly one of response_token_ids and response")
        return self


class ScoreRequest(_Request):
    model: str
    items: list[ScoreItem] = Field(min_length=1)
    top_logprobs: int | None = Field(
        None, ge=1, description="Log-probs per token (OpenAI's name); default generation.teacher_topk, capped at the vocabulary."
    )


@dataclass(frozen=True, eq=False)
class TokenScores:
    """One scored response as arrays: what engines return and in-cluster callers receive (`score_many`).

    A group's top-64 log-probs are ~16k numbers; as arrays they cross process boundaries as a few
    buffers and go into Arrow without a Python object per number. `ScoreData` is the JSON form.
    """

    token_ids: np.ndarray  # [T] int32
    logprobs: np.ndarray  # [T] float32
    top_ids: np.ndarray  # [T, k] int32
    top_logprobs: np.ndarray  # [T, k] float32
    tail_mass: np.ndarray  # [T] float32

    @classmethod
    def from_lists(cls, token_ids, logprobs, top_ids, top_logprobs, tail_mass) -> TokenScores:
        """From per-token lists (a `/v1/score` reply, or vLLM's output); refuses misaligned ones."""
        tokens = len(token_ids)
        rows = {}
        for name, values, dtype in (("top_ids", top_ids, np.int32), ("top_logprobs", top_logprobs, np.float32)):
            try:
                rows[name] = np.asarray(values, dtype)
            except ValueError:  # ragged
                rows[name] = None
            if rows[name] is None or rows[name].ndim != 2 or len(rows[name]) != tokens:
                raise ValueError(f"score data: {name} must hold {tokens} rows of k entries, one per response token")
        for name, values in (("logprobs", logprobs), ("tail_mass", tail_mass)):
            if len(values) != tokens:
                raise ValueError(f"score data: {name} has {len(values)} entries for {tokens} response tokens")
        return cls(
            token_ids=np.asarray(token_ids, np.int32),
            logprobs=np.asarray(logprobs, np.float32),
            top_ids=rows["top_ids"],
            top_logprobs=rows["top_logprobs"],
            tail_mass=np.asarray(tail_mass, np.float32),
        )

    @classmethod
    def from_data(cls, data: ScoreData) -> TokenScores:
        return cls.from_lists(data.token_ids, data.logprobs, data.top_ids, data.top_logprobs, data.tail_mass)

    def to_data(self, index: int) -> ScoreData:
        # The engine's own output: validating ~2k numbers per response again cost ~3 ms a group.
        return ScoreData.model_construct(
            index=index,
            token_ids=self.token_ids.tolist(),
            logprobs=self.logprobs.tolist(),
            top_ids=self.top_ids.tolist(),
            top_logprobs=self.top_logprobs.tolist(),
            tail_mass=self.tail_mass.tolist(),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenScores):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, name), getattr(other, name))
            for name in ("token_ids", "logprobs", "top_ids", "top_logprobs", "tail_mass")
        )


@dataclass(frozen=True, eq=False)
class Samples:
    """One chat request's result for in-cluster callers (`generate_many`, `ModelClient.chat_many`): the
    choices' texts and token ids, and the scores as arrays (`TokenScores`) rather than JSON lists:
    `scores` per choice with `score_top_logprobs` (else None), `scored` for `score_token_ids`, in order."""

    texts: list[str]
    token_ids: list[list[int]]
    scores: list[TokenScores | None]
    scored: list[TokenScores]

    @classmethod
    def from_response(cls, response: ChatCompletionResponse) -> Samples:
        """From the JSON form (another service's reply), its scores checked as `TokenScores.from_data` does."""
        return cls(
            texts=[choice.message.content for choice in response.choices],
            token_ids=[choice.token_ids for choice in response.choices],
            scores=[TokenScores.from_data(c.scores) if c.scores is not None else None for c in response.choices],
            scored=[TokenScores.from_data(data) for data in response.scored or []],
        )


class ScoreResponse(BaseModel):
    object: Literal["score"] = "score"
    model: str
    top_logprobs: int
    data: list[ScoreData]
    usage: Usage


# --------------------------------------------------------------------------- models and health


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "masters"
    root: str = Field(description="The configured model name the id belongs to.")
    mask_ratio: float


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    models: dict[str, dict] = Field(
        description="Per model, what one of its replicas reports (`replica`, `engine`, `mask_ratio`, batch and "
        "level-switch counts), or `{\"error\": ...}` when none answered."
    )


# --------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="`invalid_request_error`, `authentication_error` or `server_error`.")
    param: str | None = Field(description="The request field at fault, when one is.")
    code: str | None = Field(description="e.g. `context_length_exceeded`, `invalid_api_key`, `overloaded`.")


class ErrorResponse(BaseModel):
    """OpenAI's error body: what every 4xx and 503 of the service carries."""

    error: ErrorDetail
