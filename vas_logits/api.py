"""VASClient: Value Augmented Sampling of a model reachable only through an OpenAI-compatible API.

VAS needs only the base model's next-token top-k log-probabilities, never its weights. Per prompt and step:

    pieces, logprobs = the endpoint's top_k next text pieces after prompt + text so far   (one round trip)
    Q_i(piece)       = V_i(prompt + text + piece)       with value model i's own tokenizer  (text_values.py)
    next piece       ~ softmax((logprobs + Σ_i beta_i (Q_i − mean_K Q_i)) / T)      (argmax when greedy)

which is the processor's closed form restricted to the top k (VAS_NOTES.md), with T applied after the
adjustment as generate()'s warpers do. Decoding stops at an EOS piece, a stop string or max_new_tokens.

Each step costs one HTTP round trip, so prompts are decoded concurrently on daemon threads: while one
waits for its answer, others are valued or sent. Each prompt has its own random generator (seed + its
index), so results do not depend on the scheduling.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from .endpoint import CompletionsEndpoint, EndpointError, run_concurrently
from .processor import _check_betas
from .text_values import TextValuer
from .value_model import ValueModel

logger = logging.getLogger(__name__)

DEFAULT_EOS_TEXTS = ("",)  # vLLM and llama.cpp show special tokens such as EOS as empty text


@dataclass
class APICompletion:
    """One prompt's result. finish_reason: "stop" (EOS or a stop string), "length" (max_new_tokens), "error"
    (see `error`; `text` holds what was generated before it) or "interrupted"."""

    prompt: str
    text: str
    finish_reason: str
    num_steps: int
    error: str | None = None


class APIGenerationError(RuntimeError):
    """Some prompts failed. `completions` holds every prompt's result, the failed ones with their partial text."""

    def __init__(self, message: str, completions: list[APICompletion]):
        super().__init__(message)
        self.completions = completions


class VASClient:
    """Steers a model behind an OpenAI-compatible `/v1/completions` endpoint with one or more value models.

    Args:
        endpoint: A `CompletionsEndpoint`, or its base URL.
        value_models: A ValueModel or a list of them (each in eval mode, on any device).
        tokenizers: The value models' tokenizer, or one per value model. They need not be the served model's:
            every candidate text is re-tokenised.
        beta: One strength per value model (a number applies to all); 0 leaves the base distribution as is.
        top_k: Candidates per step, as many as the endpoint returns log-probabilities for.
        eos_texts: Pieces that mean end of sequence: they end the completion and are valued as the value
            tokenizer's EOS token (fit() trains V(s∘EOS) toward the reward). Default: the empty piece and the
            tokenizers' EOS tokens.
        concurrency: Prompts decoded at once (threads), i.e. requests in flight; default: the endpoint's.

    Example:
        >>> client = VASClient("http://127.0.0.1:8000/v1", value_model, tokenizer, beta=2.0, top_k=10)
        >>> [c.text for c in client.generate(["Write a review:"], max_new_tokens=32)]
    """

    def __init__(
        self,
        endpoint: CompletionsEndpoint | str,
        value_models: ValueModel | Sequence[ValueModel],
        tokenizers,
        beta: float | Sequence[float] = 1.0,
        top_k: int = 10,
        *,
        eos_texts: Sequence[str] | None = None,
        concurrency: int | None = None,
    ):
        self.endpoint = CompletionsEndpoint(endpoint) if isinstance(endpoint, str) else endpoint
        self.value_models = [value_models] if isinstance(value_models, ValueModel) else list(value_models)
        if not self.value_models or not all(isinstance(model, ValueModel) for model in self.value_models):
            raise ValueError(f"`value_models` must be a ValueModel or a non-empty list of them, got {value_models!r:.100}")
        if isinstance(tokenizers, (list, tuple)):
            if len(tokenizers) != len(self.value_models):
                raise ValueError(f"`tokenizers` has {len(tokenizers)} entries for {len(self.value_models)} value models")
            self.tokenizers = list(tokenizers)
        else:
            self.tokenizers = [tokenizers] * len(self.value_models)
        self.betas = _check_betas(beta, len(self.value_models))
        self.top_k = _positive_int("top_k", top_k)
        self.concurrency = self.endpoint.concurrency if concurrency is None else _positive_int("concurrency", concurrency)
        if eos_texts is None:
            eos_texts = list(DEFAULT_EOS_TEXTS) + [t.eos_token for t in self.tokenizers if t.eos_token is not None]
        self.eos_texts = frozenset(eos_texts)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 64,
        do_sample: bool = True,
        temperature: float = 1.0,
        stop: Sequence[str] | None = None,
        beta: float | Sequence[float] | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> list[APICompletion]:
        """Decode each prompt (text, chat template already applied) with VAS.

        Args:
            max_new_tokens: Most pieces (server tokens) per completion.
            do_sample: Sample from the steered distribution; False takes its argmax.
            temperature: Divides the steered logits (beta too, as in generate()); also sent with each request.
            stop: Strings that end a completion (cut before them).
            beta: This request's strengths (default: the client's).
            seed: Prompt i samples with a torch.Generator seeded with seed + i.

        Returns:
            One APICompletion per prompt, in order.

        Raises:
            APIGenerationError: Some prompt failed (unreachable server, HTTP error, malformed answer, timeout);
                its `completions` hold every result, partial texts included. An unreachable server fails every
                prompt at once. Ctrl-C raises at once, without waiting for requests in flight (the threads stop
                at their next step); the KeyboardInterrupt carries the same `completions`, unfinished prompts
                with finish_reason "interrupted".
        """
        if isinstance(prompts, str) or not isinstance(prompts, Iterable):
            raise ValueError(f"`prompts` must be a list of non-empty strings, got {prompts!r:.100}")
        prompts = list(prompts)
        if not all(isinstance(prompt, str) and prompt for prompt in prompts):
            raise ValueError(f"`prompts` must be a list of non-empty strings, got {prompts!r:.100}")
        _positive_int("max_new_tokens", max_new_tokens)
        if do_sample and not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"`temperature` must be > 0 when sampling, got {temperature!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(text, str) or not text for text in stops):
            raise ValueError(f"`stop` must be non-empty strings, got {stop!r}")
        betas = self.betas if beta is None else _check_betas(beta, len(self.value_models))
        options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=float(temperature),
                       stops=stops, betas=betas)

        if not prompts:
            return []
        # results[i] is replaced, never mutated, at each step: a copy of the list is a consistent snapshot even
        # while abandoned threads still run.
        results = [APICompletion(prompt, "", "interrupted", 0) for prompt in prompts]
        cancelled, unreachable = threading.Event(), []
        bar = tqdm(total=len(prompts), desc="VAS via API", unit="prompt", disable=not progress)

        def decode(index: int) -> None:
            try:
                self._decode(index, results, seed + index, cancelled, **options)
            except EndpointError as error:
                results[index] = replace(results[index], finish_reason="error", error=str(error))
                if error.unreachable:  # the server is down: fail every prompt now rather than each on its own
                    unreachable.append(error)
                    cancelled.set()
                    return
            bar.update()

        try:
            run_concurrently(decode, len(prompts), self.concurrency, cancelled)
        except BaseException as error:  # a bug, a failing value model, Ctrl-C: every prompt's result goes with it
            error.completions = list(results)
            raise
        finally:
            bar.close()
        results = list(results)
        if unreachable:
            results = [replace(result, finish_reason="error", error=f"not finished: {unreachable[0]}")
                       if result.finish_reason == "interrupted" else result for result in results]
        failed = [result for result in results if result.finish_reason == "error"]
        if failed:
            raise APIGenerationError(
                f"{len(failed)} of {len(prompts)} prompts failed; the first: {failed[0].error}. Every prompt's "
                "result, partial texts included, is in this error's `completions`", results)
        return results

    @torch.no_grad()
    def _decode(self, index: int, results: list[APICompletion], seed: int, cancelled: threading.Event, *,
                max_new_tokens: int, do_sample: bool, temperature: float, stops: list[str], betas: list[float]) -> None:
        """Decode prompt `index`, replacing results[index] after each step (a failure leaves the partial text)."""
        valuers = [TextValuer(model, tokenizer) for model, tokenizer in zip(self.value_models, self.tokenizers)]
        generator = torch.Generator().manual_seed(seed)
        prompt, longest_stop = results[index].prompt, max((len(text) for text in stops), default=0)
        generated = ""
        for step in range(max_new_tokens):
            if cancelled.is_set():
                return
            text = prompt + generated
            top = self.endpoint.top_logprobs(text, self.top_k, temperature, where=f"prompt {index}, step {step}",
                                             cancelled=cancelled)
            pieces = list(top)
            logits = torch.tensor([top[piece] for piece in pieces], dtype=torch.float32)  # (k,)
            logits += self._adjustment(valuers, text, pieces, betas)
            if do_sample:
                choice = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator))
            else:
                choice = int(logits.argmax())
            piece = pieces[choice]
            if piece in self.eos_texts:
                results[index] = APICompletion(prompt, generated, "stop", step + 1)
                return
            start = max(0, len(generated) - longest_stop)
            generated += piece
            cut = min((position for position in (generated.find(text, start) for text in stops) if position >= 0),
                      default=-1)
            if cut >= 0:
                results[index] = APICompletion(prompt, generated[:cut], "stop", step + 1)
                return
            results[index] = APICompletion(prompt, generated, "interrupted", step + 1)  # until it finishes
        results[index] = APICompletion(prompt, generated, "length", max_new_tokens)

    def _adjustment(self, valuers: list[TextValuer], text: str, pieces: list[str], betas: list[float]) -> torch.Tensor:
        """Σ_i beta_i (Q_i − mean_K Q_i) over the pieces, (k,) float32; EOS pieces valued as the tokenizer's EOS."""
        adjustment = torch.zeros(len(pieces))
        for valuer, beta in zip(valuers, betas):
            if beta == 0:
                continue
            eos = valuer.tokenizer.eos_token or ""
            texts = [eos if piece in self.eos_texts else piece for piece in pieces]
            scaled = valuer.value_model.beta_times_q(valuer.values(text, texts), beta, len(texts))[0].cpu()
            if not bool(torch.isfinite(scaled).all()):
                raise ValueError(f"Value model {valuers.index(valuer)} gave non-finite values for {texts!r:.200}")
            adjustment += scaled - scaled.mean()
        return adjustment


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value
