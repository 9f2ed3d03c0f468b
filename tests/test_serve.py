"""The teacher service end to end: the real Serve app on loopback, the real `openai` client, the micro model.

One deployment serves the whole module (deploying costs ~10 s); it is shut down in `finally`.
"""

import asyncio
import base64
import io
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch
from PIL import Image

from masters.config import validate_config
from masters.models import load_model

API_KEY_ENV = "MASTERS_TEST_SERVE_KEY"
API_KEY = "test-key-123"
TEACHER_IDS = ["teacher@0.2", "teacher@0.1", "teacher@0"]

pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGE_URL = png_data_url(Image.new("RGB", (40, 40), (200, 10, 10)))


def image_messages(question: str = "what colour is the square?", url: str = IMAGE_URL) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


@pytest.fixture(scope="module")
def service(ray_session, micro_model_dir, monkeypatch_module):
    from ray import serve

    from serve.app import start

    monkeypatch_module.setenv(API_KEY_ENV, API_KEY)
    config = validate_config(
        {
            "models": {"teachers": [{"name": "teacher", "model": str(micro_model_dir)}], "student": str(micro_model_dir)},
            "mask": {"max_mask_ratio": 0.2, "mask_step": 0.1},
            "serve": {
                "port": free_port(),
                "api_key_env": API_KEY_ENV,
                "num_cpus": 0.5,
                "max_batch_size": 8,
                "max_queued_requests": 32,
                "max_n": 8,
                "max_tokens_limit": 64,
                "max_image_bytes": 50_000,
                "max_image_pixels": 64 * 64,
            },
        }
    )
    paths = {"teacher": micro_model_dir, "student": micro_model_dir}
    try:
        base_url = start(config, paths)
        yield config, base_url
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service[1], api_key=API_KEY, max_retries=0, timeout=60)


def post(service, path: str, body, token: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(service[1] + path, content=content, headers=headers, timeout=60)


# --------------------------------------------------------------------------- the API


def test_models_lists_every_level_and_the_student(client):
    ids = [model.id for model in client.models.list().data]
    assert ids == ["teacher@0.2", "teacher@0.1", "teacher@0", "student"]


def test_chat_with_an_image(client):
    response = client.chat.completions.create(model="teacher@0.1", messages=image_messages(), max_tokens=6)
    choice = response.choices[0]
    assert response.model == "teacher@0.1" and len(response.choices) == 1
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert 1 <= len(choice.token_ids) <= 6
    assert response.usage.completion_tokens == len(choice.token_ids)
    assert response.usage.prompt_tokens > 16  # the image alone expands to 16 tokens in the micro model


def test_n_samples_with_logprobs(client):
    response = client.chat.completions.create(
        model="student", messages=image_messages(), n=4, max_tokens=8, temperature=1.0, logprobs=True, top_logprobs=3
    )
    assert [choice.index for choice in response.choices] == [0, 1, 2, 3]
    assert len({tuple(choice.token_ids) for choice in response.choices}) > 1, "4 samples should not all coincide"
    for choice in response.choices:
        assert len(choice.logprobs.content) == len(choice.token_ids)
        assert all(len(entry.top_logprobs) == 3 and entry.logprob <= 0 for entry in choice.logprobs.content)


def test_seeded_requests_reproduce_whatever_they_are_batched_with(service, client):
    def ask(seed, question="what colour is the square?"):
        response = client.chat.completions.create(
            model="teacher@0", messages=image_messages(question), n=2, max_tokens=8, seed=seed,
            extra_body={"top_k": 20, "repetition_penalty": 1.1},
        )  # fmt: skip
        return [choice.token_ids for choice in response.choices]

    alone = ask(seed=11)
    # The same request again, now racing unseeded requests for a place in the same batches.
    with ThreadPoolExecutor(8) as pool:
        noise = [pool.submit(ask, None, "how many shapes are there? " * k) for k in range(1, 7)]
        crowded = [pool.submit(ask, 11) for _ in range(2)]
        results = [future.result() for future in crowded]
        [future.result() for future in noise]
    assert results == [alone, alone]
    assert ask(seed=12) != alone


# --------------------------------------------------------------------------- streaming


def streamed(chunks: list, index: int) -> dict:
    """One choice of a stream put back together; `finish_reasons` lists every non-null one in order."""
    mine = [chunk.choices[0] for chunk in chunks if chunk.choices and chunk.choices[0].index == index]
    return {
        "first_role": mine[0].delta.role,
        "text": "".join(choice.delta.content or "" for choice in mine),
        "deltas": [choice.delta.content for choice in mine[1:-1]],
        "token_ids": [token for choice in mine for token in choice.token_ids],
        "logprobs": [entry for choice in mine if choice.logprobs for entry in choice.logprobs.content],
        "finish_reasons": [choice.finish_reason for choice in mine if choice.finish_reason is not None],
        "last_finish": mine[-1].finish_reason,
    }


def test_streamed_chat_is_the_non_streamed_one_token_by_token(client):
    request = {"model": "teacher@0.1", "messages": image_messages(), "n": 2, "max_tokens": 12, "seed": 21,
               "temperature": 1.0, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))

    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert all(chunk.model == "teacher@0.1" for chunk in chunks)
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert all(len(chunk.choices) == 1 and chunk.usage is None for chunk in choice_chunks)
    assert {chunk.choices[0].index for chunk in choice_chunks} == {0, 1}
    for choice in whole.choices:
        stream = streamed(choice_chunks, choice.index)
        assert stream["first_role"] == "assistant"
        assert stream["text"] == choice.message.content
        assert stream["token_ids"] == choice.token_ids
        assert stream["logprobs"] == choice.logprobs.content
        assert stream["finish_reasons"] == [choice.finish_reason] == [stream["last_finish"]]
        assert all(stream["deltas"]) and len(stream["deltas"]) > 1, "per-token deltas, not one block of text"
    # The two samples advance together, as they would if they were generated live.
    assert [chunk.choices[0].index for chunk in choice_chunks[:4]] == [0, 1, 0, 1]


def test_stream_is_openai_server_sent_events_on_the_wire(service):
    body = chat(model="student", max_tokens=5, stream=True)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", service[1] + "/chat/completions", json=body, headers=headers, timeout=60) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        raw = reply.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(event.startswith("data: ") for event in events[:-1])
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" not in chunk for chunk in chunks), "usage only when stream_options.include_usage"
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(set(chunk["choices"][0]["delta"]) == {"content"} for chunk in chunks[1:-1])


def test_streamed_errors_are_ordinary_errors_not_streams(client):
    with pytest.raises(openai.NotFoundError, match="valid model ids"):
        client.chat.completions.create(model="teacher@0.5", messages=image_messages(), stream=True)
    with pytest.raises(openai.BadRequestError, match="max_n"):
        client.chat.completions.create(model="teacher@0", messages=image_messages(), n=20, stream=True)
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.chat.completions.create(
            model="teacher@0", messages=image_messages(), stream_options={"include_usage": True}
        )


def test_stream_deltas_never_split_a_character(micro_model_dir):
    from transformers import AutoTokenizer

    from serve.api import AssistantMessage, ChatCompletionResponse, Choice, Usage, completion_chunks, text_offsets

    tokenizer = AutoTokenizer.from_pretrained(micro_model_dir)
    text = "naïve 日本語 ✓ café, the red square."  # byte-level BPE: 2-3 tokens for each non-ASCII character
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the test needs characters spelt by several tokens"
    decode = lambda token_ids: tokenizer.decode(token_ids, skip_special_tokens=True)  # noqa: E731
    assert decode(ids) == text
    choice = Choice(index=0, message=AssistantMessage(content=text), finish_reason="stop", token_ids=ids)
    usage = Usage(prompt_tokens=1, completion_tokens=len(ids), total_tokens=1 + len(ids))
    response = ChatCompletionResponse(model="m", choices=[choice], usage=usage)
    chunks = [chunk.choices[0] for chunk in completion_chunks(response, [text_offsets(decode, ids, text)])]
    deltas = [c.delta.content for c in chunks[1:-1]]
    assert "".join(deltas) == text and not any("\ufffd" in delta for delta in deltas)
    assert "日" in deltas and "é" in deltas and " red" in deltas
    assert [t for c in chunks for t in c.token_ids] == ids and chunks[-1].token_ids == [tokenizer.eos_token_id]


# --------------------------------------------------------------------------- scoring


def score(service, model: str, response_token_ids: list[int], top_logprobs: int = 5) -> dict:
    body = {"model": model, "items": [{"messages": image_messages(), "response_token_ids": response_token_ids}],
            "top_logprobs": top_logprobs}  # fmt: skip
    reply = post(service, "/score", body)
    assert reply.status_code == 200, reply.text
    return reply.json()["data"][0]


@pytest.fixture(scope="module")
def direct_model(micro_model_dir):
    return load_model(micro_model_dir)


def direct_logprobs(direct_model, response_token_ids: list[int]) -> torch.Tensor:
    model, processor = direct_model
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the square?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    image = Image.open(io.BytesIO(base64.b64decode(IMAGE_URL.partition(",")[2]))).convert("RGB")
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([response_token_ids])], dim=1)
    with torch.inference_mode():
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
    return logits.float().log_softmax(-1)[0, inputs["input_ids"].shape[1] - 1 : -1]


def test_score_equals_a_direct_transformers_forward(service, direct_model):
    response = [40, 41, 42, 43, 44, 45]
    scored = score(service, "teacher@0", response, top_logprobs=8)
    reference = direct_logprobs(direct_model, response)
    top = reference.topk(8)
    assert scored["token_ids"] == response
    assert scored["top_ids"] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor(scored["top_logprobs"])[:, 0], top.values[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        torch.tensor(scored["logprobs"]), reference.gather(-1, torch.tensor(response)[:, None])[:, 0], atol=1e-5, rtol=0
    )
    tail = 1 - torch.tensor(scored["top_logprobs"], dtype=torch.float64).exp().sum(-1)
    torch.testing.assert_close(torch.tensor(scored["tail_mass"], dtype=torch.float64), tail.clamp_min(0), atol=1e-6, rtol=0)


def test_score_accepts_response_text(service):
    body = {"model": "student", "items": [{"messages": image_messages(), "response": "red"}] * 2}
    reply = post(service, "/score", body)
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert data[0]["token_ids"] == data[1]["token_ids"] and len(data[0]["top_ids"][0]) == 64  # generation.teacher_topk


def test_level_switches_change_outputs_and_level_zero_is_the_unmasked_model(service, client, direct_model):
    response = [40, 41, 42, 43]
    dense = score(service, "teacher@0", response)
    by_level = {mid: score(service, mid, response)["logprobs"] for mid in TEACHER_IDS}
    assert len({tuple(logprobs) for logprobs in by_level.values()}) == len(TEACHER_IDS)
    # The same seed draws the same random numbers at every level, so only the weights differ.
    seeded = {"messages": image_messages(), "n": 4, "max_tokens": 16, "seed": 5}
    samples = {mid: client.chat.completions.create(model=mid, **seeded).choices for mid in ("teacher@0.2", "teacher@0")}
    assert [c.token_ids for c in samples["teacher@0.2"]] != [c.token_ids for c in samples["teacher@0"]]
    back = score(service, "teacher@0.0", response)  # another spelling of the same level
    assert back == dense, "level 0 after a switch must reproduce the dense logits exactly"
    reference = direct_logprobs(direct_model, response)
    assert torch.equal(torch.tensor(back["logprobs"]), reference.gather(-1, torch.tensor(response)[:, None])[:, 0])
    health = httpx.get(service[1].removesuffix("/v1") + "/health", timeout=30).json()
    assert health["status"] == "ok"
    assert health["models"]["teacher"]["level_switches"] >= 2 and health["models"]["teacher"]["last_switch_s"] > 0


def test_in_cluster_handle_takes_the_same_payloads(service):
    from serve.api import ChatCompletionRequest, ScoreRequest
    from serve.levels import model_handle

    config = service[0]
    request = ChatCompletionRequest.model_validate(
        {"model": "teacher@0.1", "messages": image_messages(), "n": 2, "max_tokens": 4, "seed": 3}
    )
    result = model_handle(config, "teacher@0.1").generate.remote(request).result(timeout_s=60)
    assert len(result.choices) == 2
    scores = model_handle(config, "teacher@0.1").score.remote(
        ScoreRequest.model_validate(
            {"model": "teacher@0.1", "items": [{"messages": image_messages(), "response_token_ids": result.choices[0].token_ids}]}
        )
    ).result(timeout_s=60)
    assert scores.data[0].token_ids == result.choices[0].token_ids

    # Several requests in one call; scores come back as arrays, the same numbers as the JSON form.
    handle = model_handle(config, "teacher@0.1")
    items = [{"messages": image_messages(), "response_token_ids": c.token_ids} for c in result.choices]
    score_requests = [ScoreRequest.model_validate({"model": "teacher@0.1", "items": items[:1]}),
                      ScoreRequest.model_validate({"model": "teacher@0.1", "items": items})]
    many = handle.score_many.remote(score_requests).result(timeout_s=60)
    assert [len(arrays) for arrays in many] == [1, 2]
    assert many[0][0].to_data(0) == scores.data[0]
    assert [arrays.token_ids.tolist() for arrays in many[1]] == [c.token_ids for c in result.choices]
    assert many[1][0].top_ids.shape == (len(result.choices[0].token_ids), 64)  # generation.teacher_topk
    chats = handle.generate_many.remote([request, request]).result(timeout_s=60)
    assert [reply.token_ids for reply in chats] == [[c.token_ids for c in result.choices]] * 2
    assert [reply.texts for reply in chats] == [[c.message.content for c in result.choices]] * 2


def test_score_data_from_another_service_is_checked_before_use():
    from serve.api import ScoreData, TokenScores

    good = ScoreData(index=0, token_ids=[5, 6], logprobs=[-1.0, -2.0], top_ids=[[5, 1], [6, 2]],
                     top_logprobs=[[-1.0, -3.0], [-2.0, -4.0]], tail_mass=[0.5, 0.25])  # float32-exact
    scores = TokenScores.from_data(good)
    assert scores.top_ids.shape == (2, 2) and scores.to_data(0) == good
    ragged = good.model_copy(update={"top_ids": [[5, 1], [6]]})
    with pytest.raises(ValueError, match="top_ids must hold 2 rows of k entries"):
        TokenScores.from_data(ragged)
    short = good.model_copy(update={"top_logprobs": [[-1.0, -3.0]]})
    with pytest.raises(ValueError, match="top_logprobs must hold 2 rows"):
        TokenScores.from_data(short)
    with pytest.raises(ValueError, match="tail_mass has 1 entries for 2 response tokens"):
        TokenScores.from_data(good.model_copy(update={"tail_mass": [0.5]}))


# --------------------------------------------------------------------------- bad input and load


def chat(**fields) -> dict:
    return {"model": "teacher@0", "messages": image_messages(), "max_tokens": 2} | fields


BOMB = png_data_url(Image.new("RGB", (400, 400)))  # ~1 KB of PNG, 160k pixels
NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()
TOO_MANY_BYTES = "data:image/png;base64," + "A" * 80_000

BAD_REQUESTS = {
    "malformed json": ("/chat/completions", '{"model": "teacher@0", "messages": [', 400, "not valid JSON"),
    "missing messages": ("/chat/completions", {"model": "teacher@0"}, 400, "messages"),
    "n of the wrong type": ("/chat/completions", chat(n="4"), 400, "n:"),
    "unknown field": ("/chat/completions", chat(frequency_pen=1), 400, "frequency_pen"),
    "unknown model": ("/chat/completions", chat(model="gpt-4"), 404, "teacher@0.2"),
    "level outside schedule": ("/chat/completions", chat(model="teacher@0.15"), 404, "valid model ids"),
    "undecodable image": ("/chat/completions", chat(messages=image_messages(url=NOT_AN_IMAGE)), 400, "decoded"),
    "oversized image": ("/chat/completions", chat(messages=image_messages(url=TOO_MANY_BYTES)), 400, "max_image_bytes"),
    "decompression bomb": ("/chat/completions", chat(messages=image_messages(url=BOMB)), 400, "max_image_pixels"),
    "remote image": ("/chat/completions", chat(messages=image_messages(url="http://x/y.png")), 400, "data URL"),
    "local image disabled": ("/chat/completions", chat(messages=image_messages(url="/etc/hosts")), 400, "allow_local_images"),
    "prompt beyond context": ("/chat/completions", chat(messages=image_messages("red " * 600)), 400, "context"),
    "n beyond max_n": ("/chat/completions", chat(n=9), 400, "max_n"),
    "max_tokens beyond limit": ("/chat/completions", chat(max_tokens=65), 400, "max_tokens_limit"),
    "stream_options without stream": (
        "/chat/completions", chat(stream_options={"include_usage": True}), 400, "stream=true"
    ),
    "stream_options unknown field": (
        "/chat/completions", chat(stream=True, stream_options={"include_usage": True, "x": 1}), 400, "stream_options.x"
    ),
    "streamed unknown model": ("/chat/completions", chat(model="gpt-4", stream=True), 404, "teacher@0.2"),
    "streamed undecodable image": (
        "/chat/completions", chat(messages=image_messages(url=NOT_AN_IMAGE), stream=True), 400, "decoded"
    ),
    "streamed prompt beyond context": (
        "/chat/completions", chat(messages=image_messages("red " * 600), stream=True), 400, "context"
    ),
    "score_token_ids without score_top_logprobs": ("/chat/completions", chat(score_token_ids=[[5, 6]]), 400, "needs score_top_logprobs"),
    "score_top_logprobs with stream": ("/chat/completions", chat(score_top_logprobs=4, stream=True), 400, "stream=true"),
    "score_token_ids outside vocab": (
        "/chat/completions", chat(score_top_logprobs=4, score_token_ids=[[10**6]]), 400, "outside the vocabulary"
    ),
    "score_token_ids empty response": ("/chat/completions", chat(score_top_logprobs=4, score_token_ids=[[]]), 400, "at least one token"),
    "score both responses": (
        "/score",
        {"model": "teacher@0", "items": [{"messages": image_messages(), "response": "a", "response_token_ids": [1]}]},
        400,
        "exactly one",
    ),
    "score token outside vocab": (
        "/score",
        {"model": "teacher@0", "items": [{"messages": image_messages(), "response_token_ids": [10**6]}]},
        400,
        "outside the vocabulary",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_an_openai_style_4xx(service, spec, case):
    path, body, status, fragment = BAD_REQUESTS[case]
    reply = post(service, path, body)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"  # also when a stream was asked for
    check_against_spec(spec, "/v1" + path, reply)
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"]


@pytest.mark.parametrize("token", [None, "wrong-key"])
def test_missing_or_wrong_token_is_401(service, token):
    reply = post(service, "/chat/completions", chat(), token=token)
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(service[1] + "/models", timeout=30).status_code == 401


def test_unknown_routes_get_an_openai_style_404_and_wrong_methods_a_405(service):
    reply = httpx.get(service[1] + "/completions", timeout=30)
    assert reply.status_code == 404 and "/v1/completions" in reply.json()["error"]["message"]
    assert reply.json()["error"]["code"] == "not_found"
    reply = httpx.get(service[1] + "/chat/completions", timeout=30)
    assert reply.status_code == 405 and reply.headers["allow"] == "POST"
    assert reply.json()["error"]["code"] == "method_not_allowed"


# --------------------------------------------------------------------------- the OpenAPI spec


@pytest.fixture(scope="module")
def spec(service) -> dict:
    reply = httpx.get(service[1].removesuffix("/v1") + "/openapi.json", timeout=30)
    assert reply.status_code == 200
    return reply.json()


def documented(spec: dict, path: str) -> dict[int, dict]:
    (operation,) = spec["paths"][path].values()
    return {int(status): answer for status, answer in operation["responses"].items()}


def check_against_spec(spec: dict, path: str, reply: httpx.Response) -> None:
    """The route's spec lists the status, and the JSON body has the schema it gives for it."""
    answer = documented(spec, path).get(reply.status_code)
    assert answer is not None, f"{path} answered {reply.status_code}, which /openapi.json does not list: {reply.text}"
    schema = answer["content"]["application/json"]["schema"]
    jsonschema.validate(reply.json(), {**schema, "components": spec["components"]})


@pytest.fixture(scope="module")
def degraded_url(service):
    """A second gateway whose models never answer: the only way to see /health's 503 without breaking the service."""
    from ray import serve

    from serve.app import Gateway

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Unresponsive:
        async def health(self) -> dict:
            raise RuntimeError("engine lost")

    unresponsive = Unresponsive.bind()
    handles = {"teacher": unresponsive, "student": unresponsive}
    gateway = serve.deployment(Gateway).options(name="gateway", ray_actor_options={"num_cpus": 0})
    serve.run(gateway.bind(service[0], handles, None), name="degraded", route_prefix="/degraded")
    try:
        yield service[1].removesuffix("/v1") + "/degraded"
    finally:
        serve.delete("degraded")


def test_openapi_lists_the_error_answers_with_openai_bodies(spec):
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    expected = {"/v1/chat/completions": {200, 400, 401, 404, 503}, "/v1/score": {200, 400, 401, 404, 503},
                "/v1/models": {200, 401}, "/health": {200, 503}}  # fmt: skip
    for path, statuses in expected.items():
        answers = documented(spec, path)
        assert set(answers) == statuses, path
        if path != "/health":  # whose 503 is its own `degraded` report
            assert all(answers[status]["content"]["application/json"]["schema"] == error for status in statuses - {200})
    assert set(spec["components"]["schemas"]["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    assert "text/event-stream" in documented(spec, "/v1/chat/completions")[200]["content"]
    for path, request in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/score", "ScoreRequest")):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{request}"} and request in spec["components"]["schemas"]
    # A valid request validates against the documented request schema, an invalid one does not.
    request_schema = {"$ref": "#/components/schemas/ChatCompletionRequest", "components": spec["components"]}
    jsonschema.validate(chat(n=2, stream=True, stream_options={"include_usage": True}), request_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(chat(frequency_pen=1), request_schema)


def test_every_documented_status_is_really_answered(service, spec, degraded_url):
    score_body = {"model": "teacher@0", "items": [{"messages": image_messages(), "response_token_ids": [40, 41]}]}
    busy_score = score_body | {"items": [{"messages": image_messages(), "response_token_ids": list(range(40, 48))}] * 4}
    root = service[1].removesuffix("/v1")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    answers = {
        "/v1/chat/completions": [
            post(service, "/chat/completions", chat()),
            post(service, "/chat/completions", "{"),
            post(service, "/chat/completions", chat(), token=None),
            post(service, "/chat/completions", chat(model="teacher@0.5")),
            *flood(service, "/chat/completions", [chat(model="student", n=2, max_tokens=16)] * 128),
        ],
        "/v1/score": [
            post(service, "/score", score_body),
            post(service, "/score", score_body | {"top_logprobs": 0}),
            post(service, "/score", score_body, token="wrong"),
            post(service, "/score", score_body | {"model": "teacher"}),
            *flood(service, "/score", [busy_score] * 128),
        ],
        "/v1/models": [
            httpx.get(service[1] + "/models", headers=headers, timeout=30),
            httpx.get(service[1] + "/models", timeout=30),
        ],
        "/health": [httpx.get(root + "/health", timeout=30), httpx.get(degraded_url + "/health", timeout=30)],
    }
    for path, replies in answers.items():
        for reply in replies:
            check_against_spec(spec, path, reply)
        assert {reply.status_code for reply in replies} == set(documented(spec, path)), path
    degraded = answers["/health"][-1].json()
    assert degraded["status"] == "degraded" and "engine lost" in degraded["models"]["teacher"]["error"]


def test_the_openai_client_sees_4xx_as_its_own_errors(client):
    with pytest.raises(openai.NotFoundError, match="valid model ids"):
        client.chat.completions.create(model="teacher@0.5", messages=image_messages())
    with pytest.raises(openai.BadRequestError, match="max_n"):
        client.chat.completions.create(model="teacher@0", messages=image_messages(), n=20)


def test_32_concurrent_clients_are_all_answered(service):
    def ask(index: int) -> int:
        client = openai.OpenAI(base_url=service[1], api_key=API_KEY, max_retries=0, timeout=120)
        response = client.chat.completions.create(
            model=TEACHER_IDS[index % 3], messages=image_messages(f"question {index}?"), max_tokens=4
        )
        return len(response.choices)

    with ThreadPoolExecutor(32) as pool:
        assert list(pool.map(ask, range(32))) == [1] * 32


def flood(service, path: str, bodies: list[dict]) -> list[httpx.Response]:
    """All `bodies` posted at once, far more than a model's queue takes."""

    async def send() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(limits=limits, timeout=120, headers=headers) as http:
            return await asyncio.gather(*(http.post(service[1] + path, json=body) for body in bodies))

    return asyncio.run(send())


def test_overload_answers_503_and_the_service_recovers(service, client, spec):
    bodies = [chat(model="student", n=4, max_tokens=48, stream=i % 2 == 1) for i in range(128)]
    replies = flood(service, "/chat/completions", bodies)
    for reply in replies:
        if reply.headers["content-type"] == "application/json":
            check_against_spec(spec, "/v1/chat/completions", reply)
    statuses = [reply.status_code for reply in replies]
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and 200 in statuses
    rejected = next(reply for reply in replies if reply.status_code == 503)
    assert rejected.json()["error"]["code"] == "overloaded"
    # A streamed request turned away is the same JSON 503, not a 200 stream that breaks off.
    streamed_replies = replies[1::2]
    assert any(reply.status_code == 503 for reply in streamed_replies), [reply.status_code for reply in streamed_replies]
    for reply in streamed_replies:
        kind = "application/json" if reply.status_code == 503 else "text/event-stream"
        assert reply.headers["content-type"].startswith(kind)
    response = client.chat.completions.create(model="student", messages=image_messages(), max_tokens=2)
    assert len(response.choices) == 1
