"""POST to a service that may be overloaded or restarting: the one retry policy of the LLM judge and of
the teacher service over HTTP."""

from __future__ import annotations

import time

import httpx

# Statuses worth another try: the server is overloaded or failing right now, not our request. 500 is
# one because hosted OpenAI-compatible endpoints answer it for passing faults (the OpenAI client
# retries it too); one that persists is reported after the backoff.
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


class RetriesExhausted(RuntimeError):
    """Every try timed out, failed to connect or got a transient status."""

    def __init__(self, url: str, attempts: int, problem: str):
        super().__init__(f"POST {url} failed {attempts} times; last error: {problem}")
        self.attempts = attempts
        self.problem = problem


def post_with_retries(http: httpx.Client, url: str, body: dict, retries: int, backoff_s: float) -> tuple[httpx.Response, int]:
    """POST `body` as JSON until the reply is not a transient failure, at most `retries` times more,
    waiting `backoff_s`, then twice as long each time. Returns that reply, whatever its status (the
    caller judges it), and the requests made; raises `RetriesExhausted`."""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            reply = http.post(url, json=body)
        except httpx.TransportError as exc:  # timeouts and connection errors
            problem = f"{type(exc).__name__}: {exc}"
            continue
        if reply.status_code in TRANSIENT_STATUS:
            problem = f"HTTP {reply.status_code}: {reply.text[:200]}"
            continue
        return reply, attempt + 1
    raise RetriesExhausted(url, retries + 1, problem)
