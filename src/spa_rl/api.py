"""The agent's turns answered by a model behind an OpenAI-compatible chat-completions API (`vllm serve`, llama.cpp's
server, OpenAI itself), for `spa eval` and `spa imagine` on models that are not loaded here.

`ApiPolicy.respond` sends each live episode's conversation so far through the official `openai` client, several
requests at once (`api_concurrency`), with the client's own retries and exponential backoff on connection errors,
429 and 5xx (`api_retries`) and a timeout per request (`api_timeout`). Every answer is appended to a JSONL file
as it arrives, keyed by the puzzle, the sample and the conversation, so an interrupted evaluation rerun with the
same settings replays the answers it has and asks only for the rest (the environments are deterministic, so the
replayed episodes are the same). A server's mistakes (unreachable, no such model, a refused key, an answer with
no text) are one line each. The API gives text, not tokens: episodes played this way have no token ids or
log-probs, which evaluation does not need. This module must never train, and never store the API key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spa_rl.config import Config, setting
from spa_rl.errors import SpaError
from spa_rl.io import JsonlAppender, read_jsonl

RESPONSES_FILE = "responses.jsonl"


@dataclass(kw_only=True)
class ApiConfig(Config):
    """Where the model is asked when it is not loaded here."""

    api_base: str | None = setting(None, metavar="URL")
    """An OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1): --model names the model it serves, which plays
    through chat completions instead of being loaded (none: local weights)."""
    api_key_env: str = setting("OPENAI_API_KEY", volatile=True)
    """The environment variable holding the API key (a local server without one needs none)."""
    api_concurrency: int = setting(8, ge=1, volatile=True)
    """Requests in flight at once."""
    api_timeout: float = setting(120.0, gt=0, volatile=True)
    """Seconds a request may take."""
    api_retries: int = setting(5, ge=0, volatile=True)
    """Retries of a request that failed to connect, timed out or got 429 or 5xx, with exponential backoff. (These
    four may change when an interrupted evaluation is resumed: they do not change the answers.)"""

    def check(self) -> None:
        if self.api_base is not None and not self.api_base.startswith(("http://", "https://")):
            raise SpaError(f"--api-base {self.api_base!r} is not a URL: pass one like http://127.0.0.1:8000/v1")


def request_key(seed: int, sample: int, messages: Sequence[dict[str, str]]) -> str:
    """The key of one turn's request: the puzzle, the sample, and the conversation so far."""
    digest = hashlib.sha256(json.dumps(list(messages), sort_keys=True).encode()).hexdigest()[:24]
    return f"{seed}/{sample}/{digest}"


class ApiPolicy:
    """Answers turns by asking `model` at `config.api_base`; `cache`: the JSONL file of answers (None: none kept)."""

    def __init__(self, config: ApiConfig, model: str, cache: Path | None = None, seed: int = 0) -> None:
        try:
            import openai
        except ImportError:
            raise SpaError("evaluating a model behind an API needs the openai package: pip install openai "
                           "(or pip install 'spa-rl[api]')") from None
        self.openai, self.config, self.model, self.seed = openai, config, model, seed
        self.base = str(config.api_base)
        self.client = openai.OpenAI(base_url=self.base, api_key=os.environ.get(config.api_key_env) or "none",
                                    max_retries=config.api_retries, timeout=config.api_timeout)
        self.answers = {row["key"]: row for row in read_jsonl(cache)} if cache is not None and cache.is_file() else {}
        self.asked = self.replayed = 0
        """Requests sent to the API by this object; answers taken from the cache instead."""
        self._cache_path, self.cache = cache, None  # opened at the first answer: a refused start leaves no file
        try:
            self._check_model()
        except BaseException:
            self.client.close()
            raise

    def _check_model(self) -> None:
        """Refuse a model the server does not list (a server without a model list is asked anyway)."""
        try:
            served = [m.id for m in self.client.models.list()]
        except self.openai.APIStatusError as e:
            if e.status_code in (404, 405, 501):  # no model list here: the first request will tell
                return
            raise self._error(e) from None
        except self.openai.APIError as e:
            raise self._error(e) from None
        if served and self.model not in served:
            raise SpaError(f"the API at {self.base} serves no model {self.model!r}: pass --model with one it serves "
                           f"({', '.join(served[:10])})")

    def _error(self, e: Exception) -> SpaError:
        o = self.openai
        if isinstance(e, o.AuthenticationError):
            return SpaError(f"the API at {self.base} refused the key (401): set ${self.config.api_key_env} to a key "
                            f"it accepts (or --api-key-env to the variable that holds one)")
        if isinstance(e, o.APITimeoutError):
            return SpaError(f"the API at {self.base} did not answer within {self.config.api_timeout:g} s "
                            f"({self.config.api_retries} retries): raise --api-timeout or check the server")
        if isinstance(e, o.APIConnectionError):
            return SpaError(f"cannot reach the API at {self.base}: is the server running, and is the URL right (it "
                            f"usually ends in /v1)?")
        if isinstance(e, o.NotFoundError):
            return SpaError(f"the API at {self.base} has no model {self.model!r} or no chat completions (404): check "
                            f"--model and --api-base")
        if isinstance(e, o.APIStatusError):
            return SpaError(f"the API at {self.base} answered {e.status_code}: {_short(e.message)}")
        return SpaError(f"the API at {self.base} failed: {_short(str(e))}")

    def respond(self, turns: Sequence[tuple[int, int, list[dict[str, str]]]], sampling: Any) -> list[tuple[str, bool]]:
        """(text, truncated) for each (puzzle seed, sample, conversation so far): replayed from the cache, or asked,
        `api_concurrency` at a time, each answer kept as it arrives."""
        keys = [request_key(seed, sample, messages) for seed, sample, messages in turns]
        todo = {k: turns[i] for i, k in enumerate(keys) if k not in self.answers}
        self.replayed += len(keys) - len(todo)
        if todo:
            pool = ThreadPoolExecutor(min(self.config.api_concurrency, len(todo)))
            futures = {pool.submit(self._ask, turn[2], sampling, key): key for key, turn in todo.items()}
            try:
                for future in as_completed(futures):
                    self._keep(futures[future], *future.result())
            except BaseException:  # keep what has arrived; do not wait for the requests still out
                for future, key in futures.items():
                    if future.done() and not future.cancelled() and future.exception() is None \
                            and key not in self.answers:
                        self._keep(key, *future.result())
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
        return [(self.answers[k]["text"], bool(self.answers[k]["truncated"])) for k in keys]

    def _keep(self, key: str, text: str, truncated: bool) -> None:
        """An answer that arrived: remembered, and appended to the cache file (main thread only)."""
        row = {"key": key, "text": text, "truncated": truncated}
        self.answers[key] = row
        self.asked += 1
        if self._cache_path is not None:
            if self.cache is None:
                self.cache = JsonlAppender(self._cache_path)
            self.cache.append(row)

    def _ask(self, messages: list[dict[str, str]], sampling: Any, key: str) -> tuple[str, bool]:
        extra = {"top_k": sampling.top_k} if sampling.top_k > 0 else None  # vLLM's and llama.cpp's extension
        # a sampling seed of its own per request, so a rerun (or a server that honours seeds) draws the same
        request_seed = int(hashlib.sha256(f"{self.seed}/{key}".encode()).hexdigest()[:8], 16)
        try:
            reply = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=sampling.temperature, top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens, seed=request_seed, extra_body=extra)
        except self.openai.APIError as e:
            raise self._error(e) from None
        if not reply.choices or reply.choices[0].message.content is None:
            reason = reply.choices[0].finish_reason if reply.choices else "no choices"
            raise SpaError(f"the API at {self.base} answered with no text ({reason}): is {self.model!r} a chat model?")
        choice = reply.choices[0]
        return choice.message.content, choice.finish_reason == "length"

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.client.close()


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."
