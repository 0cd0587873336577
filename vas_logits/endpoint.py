"""CompletionsEndpoint: a base model behind an OpenAI-compatible `/v1/completions` API (vLLM, llama.cpp,
TGI, OpenAI's legacy completions, ...), seen only through the text it emits and its top-k log-probabilities.

The `openai` client does the HTTP: a timeout per request and retries with exponential backoff on
connection errors, 408, 409, 429 and 5xx answers. What comes back is checked here, and every failure
becomes an `EndpointError` naming the endpoint, the prompt and the step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass


# A server that samples an end-of-sequence token for the one token asked reports no log-probabilities; the
# request is then sent again (with another seed) up to this many times. min_tokens=1 (next_token_body) makes
# this rare: it bans the main EOS token only, and models have others (SmolLM2: <|endoftext|>, <|im_end|>).
EOS_RETRIES = 8


class EndpointError(RuntimeError):
    """The endpoint could not be reached, refused a request or answered something unusable."""


@dataclass
class EndpointCompletion:
    """One completion sampled by the endpoint: its text and why it ended ("stop": EOS or a stop string;
    "length": max_tokens)."""

    text: str
    finish_reason: str


def _require_openai():
    try:
        import openai
    except ImportError as error:  # an extra, so that in-process users need not install it
        raise ImportError("API mode needs the `openai` client: pip install 'vas-logits[api]'") from error
    return openai


class CompletionsEndpoint:
    """An OpenAI-compatible completions endpoint.

    Args:
        base_url: The API root, e.g. "http://127.0.0.1:8000/v1" (the path before `/completions`).
        model: The served model's name; default: the first one `GET /models` lists.
        api_key: Default: $OPENAI_API_KEY, else a placeholder (local servers ignore it).
        timeout: Seconds one request may take, retries not counted.
        max_retries: Retries of a failed request (connection errors, 408/409/429/5xx), with exponential
            backoff (the openai client's: 0.5 s doubling up to 8 s, with jitter).
        concurrency: Requests kept in flight: fit() samples this many prompts at once, and VASClient decodes this
            many at once unless told otherwise. A server that handles one request at a time and keeps one prompt
            cache (llama-cpp-python) is fastest at 1; batching servers (vLLM, TGI, llama.cpp `-np`) gain from more.
        next_token_body: Extra JSON fields of every next-token request. Default `{"min_tokens": 1}`: a server that
            samples EOS for the one token asked may stop before reporting any log-probability (llama-cpp-python
            does), and `min_tokens` (accepted by llama-cpp-python and vLLM) keeps it from sampling its EOS token;
            llama-cpp-python's reported log-probabilities are unchanged by it (tested). Pass `{}` for servers
            that refuse the field (OpenAI's own API).
        client: An `openai.OpenAI` client to use instead of building one (its own settings then apply).

    Example:
        >>> endpoint = CompletionsEndpoint("http://127.0.0.1:8000/v1")
        >>> endpoint.top_logprobs("The movie was", top_k=5)  # {" a": -2.0, " about": -2.9, ...}
    """

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, concurrency: int = 8,
                 next_token_body: dict | None = None, client=None):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"`base_url` must be an http(s) URL such as 'http://127.0.0.1:8000/v1', got {base_url!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"`timeout` must be a positive number of seconds, got {timeout!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"`max_retries` must be a non-negative integer, got {max_retries!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"`concurrency` must be a positive integer, got {concurrency!r}")
        self.base_url = base_url.rstrip("/")
        self.concurrency = concurrency
        self.next_token_body = {"min_tokens": 1} if next_token_body is None else dict(next_token_body)
        self._model = model
        if client is None:
            openai = _require_openai()
            client = openai.OpenAI(base_url=self.base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                                   timeout=timeout, max_retries=max_retries)
        self.client = client

    def __repr__(self) -> str:
        return f"CompletionsEndpoint({self.base_url!r}, model={self._model!r})"

    def _context(self, where: str) -> str:
        """How errors name the request: the URL, and e.g. "prompt 3, step 17"."""
        return f"{self.base_url}/completions ({where})" if where else f"{self.base_url}/completions"

    @property
    def model(self) -> str:
        """The served model's name (asked once from `GET /models` when not given)."""
        if self._model is None:
            try:
                models = [entry.id for entry in self.client.models.list()]
            except Exception as error:
                raise EndpointError(f"{self.base_url}: listing the served models failed: {_describe(error)}") from error
            if not models:
                raise EndpointError(f"{self.base_url}/models lists no model; pass `model=` explicitly")
            self._model = models[0]
        return self._model

    def top_logprobs(self, text: str, top_k: int, temperature: float = 1.0, where: str = "") -> dict[str, float]:
        """The next token's `top_k` most likely text pieces after `text`, with their log-probabilities.

        One request: max_tokens=1, logprobs=top_k. The token the server samples is ignored; if it is an
        end-of-sequence token and the server therefore reports nothing, the request is sent again with another
        seed (up to EOS_RETRIES times).

        Raises:
            EndpointError: The request failed, or the answer has no log-probabilities, fewer than `top_k` of
                them (the server's cap, or distinct tokens with the same text merged into one key), or
                non-numeric ones. The message names the endpoint and `where` (e.g. "prompt 3, step 17").
        """
        context = self._context(where)
        for attempt in range(1 + EOS_RETRIES):
            try:
                reseed = {"seed": attempt} if attempt else {}  # a retry: let the server sample another token
                response = self.client.completions.create(
                    model=self.model, prompt=text, max_tokens=1, logprobs=top_k, temperature=temperature,
                    extra_body=self.next_token_body or None, **reseed)
            except Exception as error:
                raise EndpointError(f"{context}: request failed: {_describe(error)}") from error
            if not _stopped_without_logprobs(response):
                break
        else:
            raise EndpointError(
                f"{context}: the server sampled an end-of-sequence token and stopped before reporting "
                f"log-probabilities, {1 + EOS_RETRIES} times in a row (next_token_body: {self.next_token_body}; "
                "min_tokens=1 bans a server's main EOS token, not every end-of-sequence token)"
            )
        try:
            top = response.choices[0].logprobs.top_logprobs[0]
        except (AttributeError, IndexError, KeyError, TypeError) as error:
            raise EndpointError(
                f"{context}: the answer has no top log-probabilities (`choices[0].logprobs.top_logprobs[0]`); "
                f"does the server support `logprobs`? (llama-cpp-python needs --logits_all true). "
                f"Answer: {str(response)[:300]}"
            ) from error
        if not isinstance(top, dict):
            raise EndpointError(f"{context}: top_logprobs[0] should map text to log-probability, got {top!r:.200}")
        try:
            pieces = {str(piece): float(logprob) for piece, logprob in top.items()}
        except (TypeError, ValueError) as error:
            raise EndpointError(f"{context}: non-numeric log-probabilities in {top!r:.200}") from error
        if any(math.isnan(value) or value > 1e-4 for value in pieces.values()):
            raise EndpointError(f"{context}: log-probabilities must be <= 0 and not NaN, got {pieces!r:.200}")
        if len(pieces) < top_k:
            raise EndpointError(
                f"{context}: asked for {top_k} top log-probabilities, got {len(pieces)} ({sorted(pieces)!r:.200}). "
                "Lower `top_k` to what the server returns (OpenAI: at most 5 on /v1/completions); distinct tokens "
                "with the same text also merge into one key"
            )
        return dict(sorted(pieces.items(), key=lambda item: -item[1])[:top_k])

    def sample(self, prompt: str, n: int, max_tokens: int, temperature: float = 1.0,
               stop: Sequence[str] | None = None, where: str = "", **extra_body) -> list[EndpointCompletion]:
        """`n` completions of `prompt` sampled by the server (asked again for the rest if it returns fewer).

        Raises:
            EndpointError: A request failed or its answer has no usable choices.
        """
        context = self._context(where)
        completions: list[EndpointCompletion] = []
        while len(completions) < n:
            try:
                stops = {"stop": list(stop)} if stop else {}  # no field at all rather than null
                response = self.client.completions.create(
                    model=self.model, prompt=prompt, n=n - len(completions), max_tokens=max_tokens,
                    temperature=temperature, extra_body=extra_body or None, **stops)
                choices = [EndpointCompletion(choice.text, choice.finish_reason) for choice in response.choices]
            except Exception as error:
                raise EndpointError(f"{context}: sampling failed: {_describe(error)}") from error
            if not choices or any(not isinstance(choice.text, str) for choice in choices):
                raise EndpointError(f"{context}: the answer has no completion text: {str(response)[:300]}")
            completions.extend(choices)
        return completions[:n]


def _stopped_without_logprobs(response) -> bool:
    """The server sampled an end-of-sequence token for the one token asked and reported nothing (llama-cpp-python
    stops before recording an EOS token's log-probabilities)."""
    try:
        choice = response.choices[0]
        return choice.finish_reason == "stop" and not (choice.logprobs and choice.logprobs.top_logprobs)
    except (AttributeError, IndexError, TypeError):
        return False


def _describe(error: Exception) -> str:
    status = getattr(error, "status_code", None)
    kind = type(error).__name__
    hint = (" (no such route on this server: `base_url` must be the API root that `/completions` follows, "
            "e.g. 'http://127.0.0.1:8000/v1')") if status == 404 else ""
    return f"{kind} (HTTP {status}): {error}{hint}" if status else f"{kind}: {error}"
