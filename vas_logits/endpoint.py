"""CompletionsEndpoint: a base model behind an OpenAI-compatible `/v1/completions` API (vLLM, llama.cpp,
TGI, OpenAI's legacy completions, ...), seen only through the text it emits and its top-k log-probabilities.

The `openai` client does the HTTP, with retries and exponential backoff on connection errors, 408, 409, 429
and 5xx answers. Its timeout bounds each read, not the request, so each request runs in a daemon thread
that the caller waits for until `timeout` (the whole request's deadline) or until it is cancelled: a
server that drips bytes cannot stall a step, Ctrl-C never waits for an answer, and an abandoned request
never keeps the interpreter alive. What comes back is checked here, and every failure becomes an
`EndpointError` naming the endpoint, the prompt and the step.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


# A server that samples an end-of-sequence token for the one token asked reports no log-probabilities; the
# request is then sent again (with another seed) up to this many times. min_tokens=1 (next_token_body) makes
# this rare: it bans the main EOS token only, and models have others (SmolLM2: <|endoftext|>, <|im_end|>).
EOS_RETRIES = 8
POLL_SECONDS = 0.05  # how often a waiting caller looks at its deadline and at `cancelled`


class EndpointError(RuntimeError):
    """The endpoint could not be reached, refused a request or answered something unusable. `unreachable`: no
    connection could be made (refused, reset, DNS), so other requests to the same server need not be tried."""

    def __init__(self, message: str, *, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


class RequestCancelled(Exception):
    """The caller stopped waiting for a request (Ctrl-C, or another request failed); its answer is dropped."""


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
        timeout: Seconds one request may take in all, its retries and their backoff included: a deadline, after
            which the request is abandoned and the step fails with an EndpointError.
        max_retries: Retries of a failed request (connection errors, 408/409/429/5xx) within `timeout`, with
            exponential backoff (the openai client's: 0.5 s doubling up to 8 s, with jitter).
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
        self.timeout = float(timeout)
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

    def top_logprobs(self, text: str, top_k: int, temperature: float = 1.0, where: str = "",
                     cancelled: threading.Event | None = None) -> dict[str, float]:
        """The next token's `top_k` most likely text pieces after `text`, with their log-probabilities.

        One request: max_tokens=1, logprobs=top_k. The token the server samples is ignored; if it is an
        end-of-sequence token and the server therefore reports nothing, the request is sent again with another
        seed (up to EOS_RETRIES times).

        Raises:
            EndpointError: The request failed or passed its deadline, or the answer has no log-probabilities,
                fewer than `top_k` of them (the server's cap, or distinct tokens with the same text merged into
                one key), non-numeric ones, or a piece that is not valid text. The message names the endpoint and
                `where` (e.g. "prompt 3, step 17").
            RequestCancelled: `cancelled` was set while waiting.
        """
        context = self._context(where)
        for attempt in range(1 + EOS_RETRIES):
            reseed = {"seed": attempt} if attempt else {}  # a retry: let the server sample another token
            response = self._create(context, cancelled, prompt=text, max_tokens=1, logprobs=top_k,
                                    temperature=temperature, extra_body=self.next_token_body or None, **reseed)
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
        if all(value == -math.inf for value in pieces.values()):
            raise EndpointError(f"{context}: every top log-probability is -inf ({pieces!r:.200}): no piece can "
                                "be chosen (does the request ban every token, e.g. through logit_bias?)")
        for piece in pieces:
            _check_text(piece, context, "a next-token piece")
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
               stop: Sequence[str] | None = None, where: str = "", cancelled: threading.Event | None = None,
               **extra_body) -> list[EndpointCompletion]:
        """`n` completions of `prompt` sampled by the server (asked again for the rest if it returns fewer).

        Raises:
            EndpointError: A request failed or passed its deadline, or its answer has no usable choices.
            RequestCancelled: `cancelled` was set while waiting.
        """
        context = self._context(where)
        completions: list[EndpointCompletion] = []
        while len(completions) < n:
            stops = {"stop": list(stop)} if stop else {}  # no field at all rather than null
            response = self._create(context, cancelled, prompt=prompt, n=n - len(completions), max_tokens=max_tokens,
                                    temperature=temperature, extra_body=extra_body or None, **stops)
            try:
                choices = [EndpointCompletion(choice.text, choice.finish_reason) for choice in response.choices]
            except (AttributeError, TypeError) as error:
                raise EndpointError(f"{context}: the answer has no completion choices: {str(response)[:300]}") from error
            if not choices or any(not isinstance(choice.text, str) for choice in choices):
                raise EndpointError(f"{context}: the answer has no completion text: {str(response)[:300]}")
            for choice in choices:
                _check_text(choice.text, context, "a completion")
            completions.extend(choices)
        return completions[:n]

    def _create(self, context: str, cancelled: threading.Event | None, **body):
        """`client.completions.create(model=..., **body)` within `timeout` seconds in all.

        The call runs in a daemon thread; this one waits in POLL_SECONDS slices until the answer comes, the
        deadline passes or `cancelled` is set. An abandoned call finishes (or times out on a read) on its own.
        """
        outcome: dict = {}
        done = threading.Event()

        def call():
            try:
                outcome["response"] = self.client.completions.create(model=self.model, **body)
            except BaseException as error:  # handed to the waiting thread
                outcome["error"] = error
            finally:
                done.set()

        threading.Thread(target=call, daemon=True, name="vas-request").start()
        deadline = time.monotonic() + self.timeout
        while not done.wait(min(POLL_SECONDS, max(0.0, deadline - time.monotonic()))):
            if cancelled is not None and cancelled.is_set():
                raise RequestCancelled(context)
            if time.monotonic() >= deadline:
                raise EndpointError(
                    f"{context}: no complete answer within timeout={self.timeout:g} s (a deadline for the whole "
                    "request, retries included); raise `timeout` for a slow server"
                )
        error = outcome.get("error")
        if isinstance(error, EndpointError):  # from `self.model`
            raise error
        if error is not None:
            raise EndpointError(f"{context}: request failed: {_describe(error)}",
                                unreachable=_is_connection_error(error)) from error
        return outcome["response"]


def run_concurrently(task: Callable[[int], None], count: int, concurrency: int, cancelled: threading.Event) -> None:
    """Run task(0), ..., task(count - 1) on `concurrency` daemon threads and return when all are done.

    The first exception a task raises sets `cancelled` (the other tasks' requests then raise RequestCancelled
    and they stop) and is re-raised here. A KeyboardInterrupt in the calling thread sets `cancelled` and
    propagates at once: in-flight requests are not waited for, and daemon threads never keep the interpreter
    alive.
    """
    indices, lock, errors = iter(range(count)), threading.Lock(), []

    def worker():
        while not cancelled.is_set():
            with lock:
                index = next(indices, None)
            if index is None:
                return
            try:
                task(index)
            except RequestCancelled:
                return
            except BaseException as error:  # a failed request, a bug, an interrupt in this thread
                errors.append(error)
                cancelled.set()
                return

    threads = [threading.Thread(target=worker, daemon=True, name=f"vas-worker-{number}")
               for number in range(min(concurrency, count))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(POLL_SECONDS)  # in slices: Ctrl-C reaches the main thread between them
    except BaseException:
        cancelled.set()
        raise
    if errors:
        raise errors[0]


def _stopped_without_logprobs(response) -> bool:
    """The server sampled an end-of-sequence token for the one token asked and reported nothing (llama-cpp-python
    stops before recording an EOS token's log-probabilities)."""
    try:
        choice = response.choices[0]
        return choice.finish_reason == "stop" and not (choice.logprobs and choice.logprobs.top_logprobs)
    except (AttributeError, IndexError, TypeError):
        return False


def _check_text(text: str, context: str, what: str) -> None:
    """Refuse text that no tokenizer can take: a lone UTF-16 surrogate (a server that split a character
    across tokens and escaped each half in its JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise EndpointError(
            f"{context}: {what} from the server is not valid Unicode ({error.reason} at {error.start} in "
            f"{text!r:.80}): the server split a character across tokens. Ask it for whole characters (vLLM, "
            "llama.cpp and OpenAI return them), or lower `top_k` so that such pieces are not among the candidates"
        ) from None


def _is_connection_error(error: BaseException) -> bool:
    """No connection could be made (openai's APIConnectionError, not its subclass APITimeoutError)."""
    try:
        import openai
    except ImportError:
        return False
    return isinstance(error, openai.APIConnectionError) and not isinstance(error, openai.APITimeoutError)


def _describe(error: Exception) -> str:
    status = getattr(error, "status_code", None)
    kind = type(error).__name__
    hint = (" (no such route on this server: `base_url` must be the API root that `/completions` follows, "
            "e.g. 'http://127.0.0.1:8000/v1')") if status == 404 else ""
    return f"{kind} (HTTP {status}): {error}{hint}" if status else f"{kind}: {error}"
