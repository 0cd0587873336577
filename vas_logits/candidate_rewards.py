"""Candidate rewards: the prefix reward of each of the base's top candidates at every sampled state.

VAS moves probability between the top-k candidates a of a state s by Q(s, a) − mean_K Q (VAS_NOTES.md), but a
sample shows one next token per state, the one the base drew. Prefix rewards (prefix_rewards.py) make that
token's reward increment exact; candidate rewards do the same for its siblings, the tokens VAS chooses among:

    for each sample, each state s_t (t = 0 .. T − 1), each of the base's `top_k` most likely next tokens a
    r(s_t∘a) = reward_fn(prompt, completion[:t] + [a])

and the prefix head phi learns the contrasts phi(s_t∘a) − phi(s_{t+1}) = r(s_t∘a) − r_{t+1} (s_{t+1} = s_t∘a_t,
the drawn token). All candidates of all states of a sample are valued in ONE forward of the value model: they
are appended to the sequence, each with the position id of the next token and a 4-D attention mask that lets it
see its own prefix and itself (as the processor values its candidates, processor.py).

The probability p(a | s_t) with which sampling drew each candidate comes from the same forward: u's returns are
corrected with it by control variates of mean zero (targets.control_variates, trainer.py).

Cost: one teacher-forced forward of the base per sample (its top-k at every state) and T · top_k more reward
calls, stored in `candidate-rewards-top<k>.jsonl` in output_dir so an interrupted run resumes; in training,
T · top_k more positions per sample.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .prefix_rewards import append_records, load_records, sample_key
from .samplers import eval_mode
from .sampling import RewardFn, Sample, check_rewards, pad_batch

logger = logging.getLogger(__name__)


def _parse(record: dict) -> tuple[list[list[int]], list[list[float]], list[list[float]] | None]:
    ids = [[int(token) for token in row] for row in record["ids"]]
    rewards = [[float(value) for value in row] for row in record["rewards"]]
    probs = [[float(value) for value in row] for row in record["probs"]] if "probs" in record else None
    if [len(row) for row in ids] != [len(row) for row in rewards] or \
            (probs is not None and [len(row) for row in ids] != [len(row) for row in probs]):
        raise ValueError("ids, rewards and probs differ in shape")
    return ids, rewards, probs


def score_candidates(
    base_model,
    tokenizer,
    samples: Sequence[Sample],
    prompt_texts: Mapping[int, str],
    reward_fn: RewardFn,
    top_k: int,
    path: str | os.PathLike | None,
    pad_token_id: int,
    temperature: float | None = 1.0,
    batch_size: int = 16,
    progress: bool = True,
) -> list[Sample]:
    """`samples` with `candidate_ids`, `candidate_rewards` and `candidate_probs` filled in, (T, top_k) each: at
    each state s_t the base's top_k next tokens (by its logits; EOS included), r(s_t∘a) and the probability that
    sampling at `temperature` drew a (`sampling_probabilities`). Records stored in `path` are reused (one stored
    without probabilities gets them from a base forward, its rewards kept).

    Args:
        base_model: A local transformers causal LM (teacher-forced on the samples, under no_grad).
        prompt_texts: `prompt_texts[sample.prompt_index]` is the prompt text reward_fn saw for the sample.
        path: A JSON-lines file of {"key", "ids", "rewards", "probs"} records (None: keep nothing).
        temperature: The sampling temperature of the samples; None when they were not drawn from the base's
            softmax at a temperature (e.g. top-p): then no probabilities (candidate_probs stays None).
        batch_size: Samples per base forward and per reward_fn call.
    """
    path = Path(path) if path is not None else None
    stored = load_records(path, _parse)

    def complete(sample: Sample) -> bool:
        ids = stored.get(sample_key(sample), ([],))[0]
        return len(ids) == len(sample.completion_ids) and all(len(row) == top_k for row in ids)

    missing = [sample for sample in samples if sample.completion_ids and not complete(sample)]
    if missing:
        logger.info("Scoring the base's top-%d candidates at every state of %d completions (%d stored)", top_k,
                    len(missing), len(stored))
    batches = [missing[start : start + batch_size] for start in range(0, len(missing), batch_size)]
    for number, batch in enumerate(tqdm(batches, desc="candidate rewards", unit="batch", disable=not progress)):
        candidates, probs = _top_candidates(base_model, batch, top_k, pad_token_id, temperature)
        rows = [(sample, t, token) for sample, ids in zip(batch, candidates) for t, row in enumerate(ids)
                for token in row]
        texts = tokenizer.batch_decode([sample.completion_ids[:t] + [token] for sample, t, token in rows],
                                       skip_special_tokens=True)
        try:
            rewards = check_rewards(reward_fn([prompt_texts[sample.prompt_index] for sample, _, _ in rows], texts),
                                    len(rows), number)
        except Exception as error:
            where = f"; the candidate rewards scored so far are kept in {path}" if path is not None else ""
            raise RuntimeError(f"reward_fn failed on candidate prefixes (candidate batch {number}){where}") from error
        records, position = [], 0
        for sample, ids, sample_probs in zip(batch, candidates, probs):
            count = len(ids) * top_k
            flat = rewards[position : position + count]
            scored = [flat[t * top_k : (t + 1) * top_k] for t in range(len(ids))]
            stored[sample_key(sample)] = (ids, scored, sample_probs)
            records.append(_record(sample, ids, scored, sample_probs))
            position += count
        append_records(path, records)
    if temperature is not None:  # records of an older version: their probabilities, the rewards kept
        unscored = [sample for sample in samples if complete(sample) and stored[sample_key(sample)][2] is None]
        for start in range(0, len(unscored), batch_size):
            batch = unscored[start : start + batch_size]
            _, probs = _top_candidates(base_model, batch, top_k, pad_token_id, temperature,
                                       [stored[sample_key(sample)][0] for sample in batch])
            for sample, sample_probs in zip(batch, probs):
                ids, scored, _ = stored[sample_key(sample)]
                stored[sample_key(sample)] = (ids, scored, sample_probs)
            append_records(path, [_record(sample, *stored[sample_key(sample)]) for sample in batch])
    result = []
    for sample in samples:
        ids, rewards, probs = stored[sample_key(sample)] if complete(sample) else ([], [], [])
        result.append(dataclasses.replace(sample, candidate_ids=ids, candidate_rewards=rewards,
                                          candidate_probs=probs if temperature is not None else None))
    return result


def _record(sample: Sample, ids, rewards, probs) -> dict:
    record = {"key": sample_key(sample), "ids": ids, "rewards": rewards}
    return {**record, "probs": probs} if probs is not None else record


# generation_config settings that make generate()'s sampling distribution differ from softmax(logits / T), each
# with the values that leave it unchanged (sampling.sampling_kwargs already turns top_k, top_p and min_p off)
_NEUTRAL_SETTINGS = {
    "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None, []),
    "sequence_bias": (None, {}), "min_length": (None, 0), "min_new_tokens": (None, 0),
    "begin_suppress_tokens": (None, []), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,), "watermarking_config": (None,),
}


def distribution_changing_settings(generation_config) -> dict:
    """The settings of a base's generation_config under which sampling does not draw from
    `sampling_probabilities` (a repetition penalty, a minimum length...), {name: value}; empty when it does."""
    return {name: getattr(generation_config, name) for name, neutral in _NEUTRAL_SETTINGS.items()
            if getattr(generation_config, name, None) not in neutral}


def sampling_probabilities(base_model, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., V) float32: the distribution plain sampling draws from, softmax(logits / temperature) with the base's
    generation_config.suppress_tokens removed (what sampling.sampling_kwargs asks of generate())."""
    logits = logits.float() / temperature
    suppressed = getattr(base_model.generation_config, "suppress_tokens", None)
    if suppressed:
        logits[..., list(suppressed)] = -math.inf
    return logits.softmax(-1)


@torch.no_grad()
def _top_candidates(base_model, samples: Sequence[Sample], top_k: int, pad_token_id: int,
                    temperature: float | None, given_ids: list | None = None) -> tuple[list, list]:
    """(T, top_k) ids per sample, the base's most likely next tokens at s_0 .. s_{T−1} (or `given_ids`), and their
    sampling probabilities (None per sample without a temperature), from one right-padded teacher-forced forward
    of prompt ∘ completion[:T − 1]."""
    sequences = [sample.prompt_ids + sample.completion_ids[:-1] for sample in samples]
    input_ids, attention_mask = (t.to(base_model.device) for t in pad_batch(sequences, pad_token_id, "right"))
    with eval_mode(base_model):
        logits = base_model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
    ids, probs = [], []
    for row, sample in enumerate(samples):
        states = slice(len(sample.prompt_ids) - 1, len(sample.prompt_ids) - 1 + len(sample.completion_ids))
        state_logits = logits[row, states].float()  # (T, V)
        top = state_logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices if given_ids is None else \
            torch.tensor(given_ids[row], device=logits.device)
        ids.append(top.tolist())
        probs.append(None if temperature is None else
                     sampling_probabilities(base_model, state_logits, temperature).gather(1, top).tolist())
    return ids, probs
