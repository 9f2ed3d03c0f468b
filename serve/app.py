"""The Ray Serve application: one deployment per configured model behind an OpenAI-style gateway.

- `ModelServer` (one deployment per teacher and one for the student): each replica owns a resident
  engine. Requests are batched with `@serve.batch`; a batch runs at one mask level, and a level
  switch waits for the engine lock, i.e. for the batch in flight. Every replica serves every level:
  the router spreads requests by queue length, not by level (see `_run_at_levels`).
- `Gateway` (FastAPI ingress): auth, JSON validation, model-id routing, OpenAI-style errors, 503
  when a model's queue is full, `stream: true` as server-sent events.

Inside the cluster, call `serve.levels.model_handle(config, model_id)`, then
`await handle.generate.remote(request)` / `handle.score.remote(request)` with the same pydantic
payloads the HTTP API takes, or `generate_many` / `score_many` with a list of them.
"""

import asyncio
import functools
import hmac
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from masters.config import MastersConfig
from masters.curriculum import STUDENT
from masters.io import api_key_from_env

from serve.api import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    Samples,
    ScoreRequest,
    ScoreResponse,
    ServeError,
    TokenLogprob,
    TokenScores,
    TopLogprob,
    Usage,
    completion_chunks,
    text_offsets,
)
from serve.engine import Completion, EncodedPrompt, Engine, Sampling, chat_prompt
from serve.levels import APP_NAME, Catalog, ServedModel

logger = logging.getLogger("ray.serve")

GATEWAY = "gateway"


def load_engine(config: MastersConfig, model_dir: str, served: ServedModel) -> "Engine":
    """The configured engine for one model; vLLM is imported only here, only when asked for."""
    ratios = list(served.ratios) if served.is_teacher else [0.0]
    if config.serve.engine == "vllm":
        from serve.vllm_engine import VLLMEngine

        # vLLM must reserve room for the largest top-k at load time; 20 is OpenAI's top_logprobs maximum.
        max_top_k = max(config.generation.teacher_topk, 20)
        parallel = config.serve.tensor_parallel_size
        return VLLMEngine(model_dir, ratios, config.mask.scope, config.models.dtype, parallel, max_top_k)
    import torch

    from serve.engine import TransformersEngine

    device = "cuda" if config.serve.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    return TransformersEngine(model_dir, ratios, config.mask.scope, device=device, dtype=config.models.dtype)


class ModelServer:
    """A replica of one model: resident engine, batched generate/score, in-place mask levels."""

    def __init__(self, served: ServedModel, model_dir: str, config: MastersConfig):
        self.served = served
        self.catalog = Catalog([served])
        self.config = config
        self.engine = load_engine(config, model_dir, served)
        self._engine_lock = asyncio.Lock()
        for batched in (self._generate_batch, self._score_batch):
            batched.set_max_batch_size(config.serve.max_batch_size)
            batched.set_batch_wait_timeout_s(config.serve.batch_wait_timeout_s)
        logger.info("%s: %s engine loaded in %.2fs", served.name, config.serve.engine, self.engine.health()["load_s"])

    # ----------------------------------------------------------------------- levels

    async def _run_at_levels(self, items: list[tuple], run) -> list:
        """Run `items` ((mask_ratio, *args)) grouped by level; a switch waits for the batch in flight.

        Levels are not routed to replicas (no Serve model multiplexing): the multiplexed router
        sends a model id only to the replicas that already hold it until they refuse work, so the
        curriculum's one level under full load stayed on one replica while the others idled
        (measured: every batch of a 512-question stage on one of two replicas). Instead each
        replica re-masks when a batch needs another level; the curriculum moves one level at a
        time, so that is one switch per replica per stage.

        Engine work runs on the replica's event loop on purpose: while it runs, new requests wait
        in the replica's queue and all join the next batch. In a worker thread it competed with
        them for the GIL and batches stayed small (measured: 2.6 requests per batch with 32 clients).
        """
        by_level: dict[float, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            by_level[item[0]].append(index)
        results: list = [None] * len(items)
        async with self._engine_lock:
            # The held level first: no switch unless the batch needs one.
            for mask_ratio in sorted(by_level, key=lambda r: r != self.engine.mask_ratio):
                switch_s = self.engine.set_mask_ratio(mask_ratio)
                if switch_s:
                    logger.info("%s: mask level -> %s in %.4fs", self.served.name, mask_ratio, switch_s)
                indices = by_level[mask_ratio]
                for index, output in zip(indices, run([items[i][1:] for i in indices])):
                    results[index] = output
        return results

    def _resolve(self, requested: str) -> float:
        return self.catalog.resolve(requested).mask_ratio

    # ----------------------------------------------------------------------- generate

    def _sampling(self, request: ChatCompletionRequest) -> Sampling:
        limits, defaults = self.config.serve, self.config.generation.sampling
        if request.n > limits.max_n:
            raise ServeError(400, f"n is {request.n}; this server allows at most serve.max_n={limits.max_n}", "n")
        max_tokens = request.requested_max_tokens or defaults.max_new_tokens
        if max_tokens > limits.max_tokens_limit:
            raise ServeError(
                400,
                f"max_tokens is {max_tokens}; this server allows at most "
                f"serve.max_tokens_limit={limits.max_tokens_limit}",
                "max_tokens",
            )
        fields = {
            name: getattr(request, name) if getattr(request, name) is not None else getattr(defaults, name)
            for name in ("temperature", "top_p", "top_k", "repetition_penalty")
        }
        if request.seed is not None:
            fields["seed"] = request.seed
        top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        score_top_logprobs = min(request.score_top_logprobs, self.engine.max_top_k) if request.score_top_logprobs else None
        return Sampling(n=request.n, max_tokens=max_tokens, top_logprobs=top_logprobs, score_top_logprobs=score_top_logprobs, **fields)

    def _encode(self, messages, extra_tokens: int, param: str) -> EncodedPrompt:
        prompt = self.engine.encode_chat(chat_prompt(messages, self.config.serve))
        if len(prompt.token_ids) + extra_tokens > self.engine.max_context:
            raise ServeError(
                400,
                f"the prompt is {len(prompt.token_ids)} tokens and {param} adds {extra_tokens}: more than the model's "
                f"context of {self.engine.max_context} tokens; shorten the messages or {param}",
                param="messages",
                code="context_length_exceeded",
            )
        return prompt

    async def _sample(self, request: ChatCompletionRequest) -> tuple[EncodedPrompt, list[Completion], list[TokenScores]]:
        """The encoded prompt, the request's completions and the scores of its `score_token_ids`."""
        mask_ratio = self._resolve(request.model)
        sampling = self._sampling(request)
        to_score = [self._checked_ids(ids, "score_token_ids") for ids in request.score_token_ids or []]
        if len(to_score) > self.config.serve.max_score_items:
            raise ServeError(
                400,
                f"{len(to_score)} score_token_ids; at most serve.max_score_items={self.config.serve.max_score_items}",
                "score_token_ids",
            )
        longest = max([sampling.max_tokens] + [len(ids) for ids in to_score])
        prompt = self._encode(request.messages, longest, "max_tokens" if longest == sampling.max_tokens else "score_token_ids")
        # One encoded prompt (image decoded, processor run once) for the samples and the scored responses.
        completions, scored = await asyncio.gather(
            self._generate_batch((mask_ratio, prompt, sampling)),
            asyncio.gather(*(self._score_batch((mask_ratio, prompt, ids, sampling.score_top_logprobs)) for ids in to_score)),
        )
        return prompt, completions, list(scored)

    async def generate(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        prompt, completions, scored = await self._sample(request)
        choices = [
            Choice(
                index=index,
                message=AssistantMessage(content=completion.text),
                finish_reason=completion.finish_reason,
                token_ids=completion.token_ids,
                logprobs=self._choice_logprobs(completion),
                scores=completion.scores.to_data(index) if completion.scores is not None else None,
            )
            for index, completion in enumerate(completions)
        ]
        completion_tokens = sum(len(c.token_ids) for c in completions)
        usage = Usage(
            prompt_tokens=len(prompt.token_ids),
            completion_tokens=completion_tokens,
            total_tokens=len(prompt.token_ids) + completion_tokens,
        )
        return ChatCompletionResponse(
            model=request.model,
            choices=choices,
            usage=usage,
            scored=[score.to_data(index) for index, score in enumerate(scored)] if request.score_token_ids else None,
        )

    async def generate_stream(self, request: ChatCompletionRequest) -> tuple[ChatCompletionResponse, list[list[int]]]:
        """`generate`, and per choice where each token's text ends in it (`text_offsets`), for `stream: true`.

        The completion is generated whole, in the shared batches, and then streamed: per-token
        generation would take the request out of batching. Decoding happens here, where the tokenizer is.
        """
        response = await self.generate(request)
        # The Engine protocol decodes one token only; both engines keep the Hugging Face tokenizer.
        decode = functools.partial(self.engine.tokenizer.decode, skip_special_tokens=True)
        offsets = [text_offsets(decode, choice.token_ids, choice.message.content) for choice in response.choices]
        return response, offsets

    def _choice_logprobs(self, completion: Completion) -> ChoiceLogprobs | None:
        if completion.logprobs is None:
            return None

        def top(token_id: int, logprob: float) -> TopLogprob:
            text = self.engine.decode_token(token_id)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        content = []
        for token_id, logprob, tops in completion.logprobs:
            entry = top(token_id, logprob)
            content.append(TokenLogprob(**entry.model_dump(), top_logprobs=[top(i, lp) for i, lp in tops]))
        return ChoiceLogprobs(content=content)

    async def generate_many(self, requests: list[ChatCompletionRequest]) -> list[Samples]:
        """Several requests for this call's model in one handle call, for in-cluster callers: one call's
        routing and serialisation instead of one per request, and the requests join the same batches.
        Scores come back as arrays (`Samples`): a group's top-64 is ~16k numbers, a few buffers to pickle."""

        async def one(request: ChatCompletionRequest) -> Samples:
            _, completions, scored = await self._sample(request)
            return Samples(
                texts=[c.text for c in completions],
                token_ids=[c.token_ids for c in completions],
                scores=[c.scores for c in completions],
                scored=scored,
            )

        return list(await asyncio.gather(*(one(request) for request in requests)))

    @serve.batch  # sized from serve.max_batch_size and batch_wait_timeout_s in __init__
    async def _generate_batch(self, items: list[tuple[float, EncodedPrompt, Sampling]]) -> list[list[Completion]]:
        return await self._run_at_levels(items, self.engine.generate)

    # ----------------------------------------------------------------------- score

    def _response_ids(self, item) -> list[int]:
        token_ids = item.response_token_ids
        if token_ids is None:
            token_ids = self.engine.encode_text(item.response)
        if not token_ids:
            raise ServeError(400, "response encodes to no tokens; send a non-empty response", "items.response")
        return self._checked_ids(token_ids, "items.response_token_ids")

    def _checked_ids(self, token_ids: list[int], param: str) -> list[int]:
        if not token_ids:
            raise ServeError(400, f"{param}: a response needs at least one token", param)
        bad = [t for t in token_ids if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise ServeError(400, f"{param} {bad[:5]} are outside the vocabulary [0, {self.engine.vocab_size})", param)
        return token_ids

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        top_logprobs, prompt_tokens, scores = await self._score_items(request)
        scored = sum(len(s.token_ids) for s in scores)
        usage = Usage(prompt_tokens=prompt_tokens + scored, completion_tokens=0, total_tokens=prompt_tokens + scored)
        data = [s.to_data(index) for index, s in enumerate(scores)]
        return ScoreResponse(model=request.model, top_logprobs=top_logprobs, data=data, usage=usage)

    async def score_many(self, requests: list[ScoreRequest]) -> list[list[TokenScores]]:
        """Several score requests for this call's model in one handle call (see `generate_many`); per
        request, its items' scores as arrays, which cross to the caller as buffers, not Python lists."""
        return [scores for _, _, scores in await asyncio.gather(*(self._score_items(r) for r in requests))]

    async def _score_items(self, request: ScoreRequest) -> tuple[int, int, list[TokenScores]]:
        """(top_logprobs, prompt tokens, scores in item order) for one request."""
        mask_ratio = self._resolve(request.model)
        if len(request.items) > self.config.serve.max_score_items:
            raise ServeError(
                400,
                f"{len(request.items)} items; score at most serve.max_score_items={self.config.serve.max_score_items} per request",
                "items",
            )
        top_k = min(request.top_logprobs or self.config.generation.teacher_topk, self.engine.max_top_k)

        responses = [self._response_ids(item) for item in request.items]
        # The responses of one group share their prompt: decode its image and encode it once.
        prompt_keys = [json.dumps([m.model_dump(mode="json") for m in item.messages], sort_keys=True) for item in request.items]
        longest: dict[str, int] = {}
        for key, response in zip(prompt_keys, responses):
            longest[key] = max(longest.get(key, 0), len(response))
        encoded: dict[str, EncodedPrompt] = {}
        for key, item in zip(prompt_keys, request.items):
            if key not in encoded:
                encoded[key] = self._encode(item.messages, longest[key], "the response")
        prepared = [(encoded[key], response) for key, response in zip(prompt_keys, responses)]
        scores = await asyncio.gather(*(self._score_batch((mask_ratio, p, r, top_k)) for p, r in prepared))
        return top_k, sum(len(p.token_ids) for p, _ in prepared), list(scores)

    @serve.batch  # sized from serve.max_batch_size and batch_wait_timeout_s in __init__
    async def _score_batch(self, items: list[tuple[float, EncodedPrompt, list[int], int]]) -> list:
        return await self._run_at_levels(items, self.engine.score)

    # ----------------------------------------------------------------------- health

    async def health(self) -> dict:
        replica = serve.get_replica_context().replica_id.unique_id
        return {"model": self.served.name, "replica": replica, **self.engine.health()}


# --------------------------------------------------------------------------- gateway

api = FastAPI(title="Masters teacher service")

# What the routes answer besides 200, for /openapi.json: clients and schema fuzzers check every status
# against it. Validation errors are 400s (the routes validate strictly themselves, so never FastAPI's
# 422), an oversized image is a 400 `image_too_large` (no 413), a full queue is a 503 (no 429).
_ERRORS = {
    400: "Invalid request: malformed JSON; a missing, wrong-typed or unknown field (named in `param`); an image "
    "that cannot be used (`invalid_image`, `image_too_large`, `local_images_disabled`); a limit exceeded "
    "(`n`, `max_tokens`, `context_length_exceeded`).",
    401: "Missing or wrong API key (`invalid_api_key`); only when the service requires one (serve.api_key_env).",
    404: "Unknown model id or mask level; the message lists the valid ids.",
    503: "The model's queue is full (`overloaded`): retry later.",
}


def _responses(ok: type[BaseModel], *errors: int, description: str = "Successful Response", **ok_fields) -> dict:
    responses: dict = {200: {"model": ok, "description": description, **ok_fields}}
    return responses | {status: {"model": ErrorResponse, "description": _ERRORS[status]} for status in errors}


def _body(model: type[BaseModel]) -> dict:
    """The request body of a route, for /openapi.json (its schema is added by `_openapi`)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi() -> dict:
    """FastAPI's spec plus the request bodies' schemas. The routes read their bodies themselves (strict,
    errors as OpenAI's 400s rather than FastAPI's 422s), so FastAPI does not know those models."""
    if api.openapi_schema is None:
        spec = get_openapi(title=api.title, version=api.version, routes=api.routes)
        _, definitions = models_json_schema(
            [(ChatCompletionRequest, "validation"), (ScoreRequest, "validation")],
            ref_template="#/components/schemas/{model}",
        )
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in definitions["$defs"].items():
            if schemas.setdefault(name, schema) != schema:
                raise RuntimeError(f"two different schemas named {name} in /openapi.json")
        api.openapi_schema = spec
    return api.openapi_schema


api.openapi = _openapi


def _error(status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None):
    error = ServeError(status, message, param, code, kind or "invalid_request_error")
    return JSONResponse(error.body(), status_code=status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    response = _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
    response.headers.update(exc.headers or {})  # a 405's `Allow`
    return response


def _validation_message(error: ValidationError) -> tuple[str, str | None]:
    problems, first_param = [], None
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        first_param = first_param or where or None
        if item["type"] == "json_invalid":
            return f"the request body is not valid JSON: {item['ctx'].get('error', '')}".strip(), None
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field, not supported by this server"
        problems.append(f"{where or 'body'}: {message}")
    return "invalid request: " + "; ".join(problems), first_param


def _events(chunks: Iterator[ChatCompletionChunk], include_usage: bool) -> Iterator[str]:
    """Server-sent events as OpenAI sends them: `data: <chunk>` each, then `data: [DONE]`. Chunks carry
    `usage` (null until the last) only when the request asked for it."""
    exclude = None if include_usage else {"usage"}
    for chunk in chunks:
        yield f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"
    yield "data: [DONE]\n\n"


@serve.ingress(api)
class Gateway:
    """HTTP front: auth, validation, routing by model id, OpenAI-style errors."""

    def __init__(self, config: MastersConfig, handles: dict[str, DeploymentHandle], api_key: str | None):
        self.catalog = Catalog.from_config(config)
        self.handles = handles
        self.api_key = api_key

    def _check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ServeError(
                401,
                "missing or wrong API key: send `Authorization: Bearer <key>`",
                code="invalid_api_key",
                error_type="authentication_error",
            )

    async def _call(self, request: Request, payload_type, method: str):
        try:
            self._check_auth(request)
            body = await request.body()
            try:
                payload = payload_type.model_validate_json(body)
            except ValidationError as exc:
                message, param = _validation_message(exc)
                raise ServeError(400, message, param) from None
            handle = self.handles[self.catalog.resolve(payload.model).model.name]
            if getattr(payload, "stream", False):
                # The whole completion before the first byte: every error (a bad image, the context,
                # a full queue) is still an ordinary 4xx/503 here, never a broken 200 stream.
                response, offsets = await handle.generate_stream.remote(payload)
                include_usage = payload.stream_options is not None and payload.stream_options.include_usage
                chunks = completion_chunks(response, offsets, include_usage)
                return StreamingResponse(_events(chunks, include_usage), media_type="text/event-stream")
            result = await getattr(handle, method).remote(payload)
            return JSONResponse(result.model_dump(mode="json"))
        except ServeError as error:  # also a ServeError raised in a replica (Ray re-raises it as its cause's class)
            return JSONResponse(error.body(), status_code=error.status)
        except BackPressureError:
            return _error(
                503,
                "the service is at capacity (serve.max_queued_requests); retry later",
                code="overloaded",
                kind="server_error",
            )

    @api.post(
        "/v1/chat/completions",
        responses=_responses(
            ChatCompletionResponse,
            400,
            401,
            404,
            503,
            description="A `chat.completion`; with `stream: true`, `text/event-stream`: `data: <chat.completion.chunk>` "
            "events, then `data: [DONE]`.",
            content={"text/event-stream": {"schema": {"type": "string"}}},
        ),
        openapi_extra=_body(ChatCompletionRequest),
    )
    async def chat_completions(self, request: Request) -> JSONResponse:
        return await self._call(request, ChatCompletionRequest, "generate")

    @api.post("/v1/score", responses=_responses(ScoreResponse, 400, 401, 404, 503), openapi_extra=_body(ScoreRequest))
    async def score(self, request: Request) -> JSONResponse:
        return await self._call(request, ScoreRequest, "score")

    @api.get("/v1/models", responses=_responses(ModelList, 401))
    async def models(self, request: Request) -> JSONResponse:
        try:
            self._check_auth(request)
        except ServeError as error:
            return JSONResponse(error.body(), status_code=error.status)
        cards = [
            ModelCard(id=model_id, root=model.name, mask_ratio=ratio if model.is_teacher else 0.0)
            for model in self.catalog.models.values()
            for model_id, ratio in zip(model.model_ids, model.ratios)
        ]
        return JSONResponse(ModelList(data=cards).model_dump(mode="json"))

    @api.get(
        "/health",
        responses={
            200: {"model": Health, "description": "Every model answered."},
            503: {"model": Health, "description": "`degraded`: a model did not answer (its entry says why)."},
        },
    )
    async def health(self) -> JSONResponse:
        names = list(self.handles)
        states = await asyncio.gather(*(self.handles[n].health.remote() for n in names), return_exceptions=True)
        models = {n: (s if isinstance(s, dict) else {"error": str(s)}) for n, s in zip(names, states)}
        ok = all("error" not in s for s in models.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "models": models}, status_code=200 if ok else 503)


# --------------------------------------------------------------------------- building and starting


def _deployment_options(config: MastersConfig) -> dict:
    limits = config.serve
    options = {
        "ray_actor_options": {"num_cpus": limits.num_cpus, "num_gpus": limits.num_gpus, "resources": limits.resources},
        # Beyond it, requests wait in the caller's bounded queue.
        "max_ongoing_requests": limits.max_ongoing_requests,
        "max_queued_requests": limits.max_queued_requests,
        "health_check_period_s": 10,
    }
    if limits.min_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": limits.min_replicas,
            "max_replicas": limits.max_replicas,
            "target_ongoing_requests": limits.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = limits.replicas
    return options


def build_app(config: MastersConfig, model_paths: dict[str, Path]) -> serve.Application:
    """The Serve application: a `ModelServer` deployment per model in `model_paths` (every teacher + `student`)."""
    catalog = Catalog.from_config(config)
    missing = [name for name in catalog.models if name not in model_paths]
    if missing:
        raise ValueError(f"model_paths lacks {missing}; give a model directory for every teacher and for {STUDENT!r}")
    api_key = api_key_from_env(config.serve.api_key_env or None, "serve.api_key_env")
    options = _deployment_options(config)
    model_server = serve.deployment(ModelServer)
    handles = {
        name: model_server.options(name=name, **options).bind(served, str(model_paths[name]), config)
        for name, served in catalog.models.items()
    }
    per_model = options["max_ongoing_requests"] + config.serve.max_queued_requests
    replicas = config.serve.max_replicas or config.serve.replicas
    gateway = serve.deployment(Gateway).options(
        name=GATEWAY,
        ray_actor_options={"num_cpus": 0},
        # The gateway only awaits. Load is shed by the models' bounded queues (an OpenAI-style 503 from
        # the gateway), so the gateway itself must never queue requests in the proxy: room for all of them.
        max_ongoing_requests=len(handles) * replicas * per_model + 256,
    )
    return gateway.bind(config, handles, api_key)


def start(config: MastersConfig, model_paths: dict[str, Path]) -> str:
    """Deploy the app serving `model_paths` (`masters.zoo.resolve_model_paths`) on the connected Ray
    cluster; returns the OpenAI base URL (`http://host:port/v1`)."""
    started = time.perf_counter()
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    app = build_app(config, model_paths)
    serve.run(app, name=APP_NAME, route_prefix="/")
    logger.info("teacher service deployed in %.1fs", time.perf_counter() - started)
    return f"http://{config.serve.host}:{config.serve.port}/v1"

