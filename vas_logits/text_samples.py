"""Samples as text: sampled through an API endpoint, or generated elsewhere (vLLM, another engine) and handed
to fit() as JSON lines, a `datasets.Dataset` or a list of dicts.

A text sample is (prompt, completion, reward[, finish_reason]). fit() trains on token ids, so each one is
tokenised with the value model's tokenizer as prompt + completion in one piece (the text the value model
will see while decoding), the prompt being the longest token prefix shared with the prompt alone (a
completion's first characters may merge with the prompt's last token). A completion that ended by itself
(finish_reason "stop", the default) gets the EOS token: fit() trains V(s∘EOS) toward the reward, which is
what decoding queries when EOS is a candidate.
"""

from __future__ import annotations

import json
import numbers
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .endpoint import CompletionsEndpoint, run_concurrently
from .sampling import FLOAT32_MAX, RewardFn, Sample, SampleStore, score_batch
from .text_values import common_prefix_length

FINISH_REASONS = ("stop", "length")


def read_text_samples(source) -> list[dict]:
    """Validated records {prompt, completion, reward, finish_reason} from a JSON-lines path, a `datasets.Dataset`
    or an iterable of dicts.

    Raises:
        ValueError: A record (named by its line or index) lacks a field or has one of the wrong type.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"`samples` must be a JSON-lines file, a datasets.Dataset or a list of dicts; "
                             f"{str(path)!r} is not a file")
        records, names = [], []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"`samples`: line {number} of {path} is not JSON: {error}") from error
                names.append(f"line {number} of {path}")
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, dict)):
        records = list(source)  # a datasets.Dataset yields one dict per row
        names = [f"samples[{index}]" for index in range(len(records))]
    else:
        raise ValueError(f"`samples` must be a JSON-lines path, a datasets.Dataset or a list of dicts, got "
                         f"{type(source).__name__}")
    if not records:
        raise ValueError("`samples` holds no sample")
    return [_check_record(record, name) for record, name in zip(records, names)]


def _check_record(record, name: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"`samples`: {name} must be a dict with prompt, completion and reward, got {record!r:.100}")
    missing = [field for field in ("prompt", "completion", "reward") if field not in record]
    if missing:
        raise ValueError(f"`samples`: {name} lacks {missing} (has {sorted(record)})")
    prompt, completion, reward = record["prompt"], record["completion"], record["reward"]
    finish_reason = record.get("finish_reason") or "stop"
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"`samples`: {name} has prompt {prompt!r:.80}; expected a non-empty string")
    if not isinstance(completion, str):
        raise ValueError(f"`samples`: {name} has completion {completion!r:.80}; expected a string")
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not abs(reward) < FLOAT32_MAX:
        raise ValueError(f"`samples`: {name} has reward {reward!r}; expected a finite number within float32's "
                         f"range (|reward| < {FLOAT32_MAX:.3g}; numpy scalars are welcome)")
    if finish_reason not in FINISH_REASONS:
        raise ValueError(f"`samples`: {name} has finish_reason {finish_reason!r}; expected one of {FINISH_REASONS}")
    return dict(prompt=prompt, completion=completion, reward=float(reward), finish_reason=finish_reason)


def tokenize_text_sample(tokenizer, prompt_index: int, prompt: str, completion: str, reward: float,
                         finish_reason: str) -> Sample:
    """A Sample in the value tokenizer's ids (see the module docstring)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(prompt + completion, add_special_tokens=True)["input_ids"]
    split = common_prefix_length(prompt_ids, full_ids)
    if split == 0:
        raise ValueError(f"Prompt {prompt_index} ({prompt[:60]!r}) has no token of its own in the value tokenizer")
    completion_ids = full_ids[split:]
    if finish_reason == "stop" and tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    if not completion_ids:
        raise ValueError(
            f"The completion {completion!r:.60} of prompt {prompt_index} ({prompt[:60]!r}) has no token of its own "
            f"in the value tokenizer and did not end by itself (finish_reason {finish_reason!r}): no state to train "
            "on. Drop the record, or mark it finish_reason 'stop' if the model ended there"
        )
    return Sample(prompt_index, full_ids[:split], completion_ids, reward)


def endpoint_sample_and_score(
    endpoint: CompletionsEndpoint,
    tokenizer,
    prompts: Sequence[tuple[int, str]],
    reward_fn: RewardFn,
    store: SampleStore,
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    prompts_per_batch: int,
    generation_kwargs: dict | None = None,
    progress: bool = True,
) -> list[Sample]:
    """Sample `samples_per_prompt` completions of each (index, text) prompt through the endpoint (a batch's
    prompts concurrently, `endpoint.concurrency` at a time), score them, store each batch."""
    samples = []
    batches = [prompts[i : i + prompts_per_batch] for i in range(0, len(prompts), prompts_per_batch)]
    extra = dict(generation_kwargs or {})
    for batch_index, batch in enumerate(tqdm(batches, desc="sampling (API)", unit="batch", disable=not progress)):
        sampled: list = [None] * len(batch)
        cancelled = threading.Event()  # the first failure (or Ctrl-C) stops the batch's other requests

        def sample(position: int) -> None:
            index, text = batch[position]
            sampled[position] = endpoint.sample(text, samples_per_prompt, max_new_tokens, temperature,
                                                where=f"prompt {index}", cancelled=cancelled, **extra)

        run_concurrently(sample, len(batch), endpoint.concurrency, cancelled)
        completions = [completion for per_prompt in sampled for completion in per_prompt]
        prompt_texts = [text for _, text in batch for _ in range(samples_per_prompt)]
        rewards = score_batch(reward_fn, prompt_texts, [c.text for c in completions], store, batch, batch_index)
        indices = [index for index, _ in batch for _ in range(samples_per_prompt)]
        new = [tokenize_text_sample(tokenizer, index, prompt, completion.text, reward,
                                    "stop" if completion.finish_reason == "stop" else "length")
               for index, prompt, completion, reward in zip(indices, prompt_texts, completions, rewards)]
        store.append(new)
        samples.extend(new)
    return samples


def given_samples(records: list[dict], tokenizer, prompts: Sequence[tuple[int, str]], store: SampleStore,
                  progress: bool = True) -> list[Sample]:
    """The records of the given (index, text) prompts, tokenised, stored as one batch."""
    wanted = {text: index for index, text in prompts}
    new = [tokenize_text_sample(tokenizer, wanted[record["prompt"]], record["prompt"], record["completion"],
                                record["reward"], record["finish_reason"])
           for record in tqdm(records, desc="tokenising samples", unit="sample", disable=not progress)
           if record["prompt"] in wanted]
    store.append(new)
    return new
