"""The LLM judge client: R_acc from any OpenAI-compatible chat endpoint (docs/method.md §3).

One score is at most two conversations: the judge prompt, and, when its reply has no readable
``<answer>`` tag, a second call asking for a bare 0 or 1. Every HTTP call is retried on timeouts,
connection errors and transient statuses with exponential backoff (`cluster.http`). What still fails raises
:class:`JudgeError`; the caller applies the stage's failure policy. A failure is never scored 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from cluster.http import RetriesExhausted, post_with_retries
from masters.config import JudgeConfig
from masters.io import api_key_from_env
from masters.judging import judge_messages, judge_retry_messages, parse_bare_score, parse_judge_score


class JudgeError(RuntimeError):
    """A judge score that could not be obtained: retries exhausted, a rejected request, or no score twice."""

    def __init__(self, message: str, calls: int, retries: int):
        super().__init__(message)
        self.calls = calls
        self.retries = retries


@dataclass(frozen=True)
class JudgeVerdict:
    score: int  # 0 or 1
    calls: int  # HTTP requests made, retries included
    retries: int  # requests repeated after a transient failure


class JudgeClient:
    """Scores one response against the ground truth with an OpenAI-compatible judge over HTTP."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        timeout_s: float,
        max_retries: int,
        api_key: str | None = None,
        backoff_s: float = 0.5,
        max_tokens: int = 256,
    ):
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_tokens = max_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout_s, headers=headers)

    @classmethod
    def from_config(cls, judge: JudgeConfig, endpoint: str, model: str, backoff_s: float = 0.5) -> JudgeClient:
        """`endpoint`/`model` are the resolved ones (the config's, or the unmasked teacher's when unset)."""
        api_key = api_key_from_env(judge.api_key_env, "rewards.judge.api_key_env")
        return cls(endpoint, model, judge.timeout_s, judge.max_retries, api_key=api_key, backoff_s=backoff_s)

    def close(self) -> None:
        self._http.close()

    def score(self, question: str, ground_truth: str, response: str) -> JudgeVerdict:
        """1 if the judge finds the response captures the ground truth, else 0; raises JudgeError."""
        tally = _Tally()
        messages = judge_messages(question, ground_truth, response)
        reply = self._complete(messages, tally)
        score = parse_judge_score(reply)
        if score is None:
            reply_again = self._complete(judge_retry_messages(messages, reply), tally)
            score = parse_bare_score(reply_again)
            if score is None:
                raise tally.error(
                    f"judge {self.model!r} gave no readable score twice; last replies: {reply[-200:]!r} "
                    f"then {reply_again[-200:]!r}"
                )
        return JudgeVerdict(score=score, calls=tally.calls, retries=tally.retries)

    def _complete(self, messages: list[dict[str, str]], tally: _Tally) -> str:
        """The reply text of one chat completion, retried on transient failures."""
        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": self.max_tokens}
        try:
            reply, calls = post_with_retries(self._http, self.url, body, self.max_retries, self.backoff_s)
        except RetriesExhausted as exc:
            tally.count(exc.attempts)
            raise tally.error(
                f"judge at {self.url} failed {exc.attempts} times (rewards.judge.max_retries="
                f"{self.max_retries}); last error: {exc.problem}"
            ) from None
        tally.count(calls)
        if reply.status_code != 200:
            raise tally.error(
                f"judge at {self.url} rejected the request with HTTP {reply.status_code}: {reply.text[:300]} "
                "(check rewards.judge.endpoint, rewards.judge.model and the API key)"
            )
        try:
            return reply.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise tally.error(
                f"judge at {self.url} answered HTTP 200 without an OpenAI chat completion: {reply.text[:300]}"
            ) from None


@dataclass
class _Tally:
    """Requests made for one score, so failures report them too."""

    calls: int = 0
    retries: int = 0

    def count(self, requests: int) -> None:
        """`requests` made for one call: the first, then retries."""
        self.calls += requests
        self.retries += requests - 1

    def error(self, message: str) -> JudgeError:
        return JudgeError(message, self.calls, self.retries)
