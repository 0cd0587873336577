"""Lookahead labels: the prefix head's labels one base step further, an exact expectation instead of a return.

Prefix and candidate rewards (prefix_rewards.py, candidate_rewards.py) give the prefix head phi the reward of the
text so far, r(x), at every state x the processor compares: exact, but blind to what a token sets up. The future
part of Q is then left to u, which learns it from returns whose noise is far larger than the contrasts it must
find (README, round 17). One step of that future is computable without any sampling:

    l(x) = r(x) + sum_{b in top-k(x)} p(b | x) · (r(x∘b) − r(x))      (x not final; l(x) = r(x) at EOS or at
                                                                        max_new_tokens, where nothing follows)

the expected reward after the base's next token, truncated to its top-k (the tokens outside count as changing
nothing). `score_lookahead` replaces every label phi learns by it: the levels r_t of the drawn states s_t
(from the candidates already scored there: no new reward calls) and the candidate rewards r(s_t∘a), for which it
reads the base's top-k after every candidate in ONE teacher-forced forward per batch (the candidates appended with
a 4-D mask, as the trainer values them) and scores the k continuations of each. The control variates use the
same labels: any estimate fixed before the draw keeps their mean zero (targets.control_variates), and one closer
to Q removes more noise. u still learns E[R | s] − phi from the returns, so Q stays unbiased.

On the yardstick (bench_value_learning.py, exact answer known) the closed form with l instead of r raises the
temporal task's ceiling from 0.76 to 0.86 of the exact Q's gain (top-4; 0.88 with the whole vocabulary).

Cost: one base forward of (1 + k) · T positions per sample and T · k² more reward calls, stored in
`lookahead-top<k>.jsonl` in output_dir so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .candidate_rewards import sampling_probabilities
from .prefix_rewards import append_records, load_records, sample_key
from .processor import config_attention_layout
from .samplers import eval_mode
from .sampling import RewardFn, Sample, check_rewards, end_token_ids
from .trainer import additive_masks, collate

logger = logging.getLogger(__name__)


def _parse(record: dict) -> list[list[float]]:
    return [[float(value) for value in row] for row in record["values"]]


def score_lookahead(
    base_model,
    tokenizer,
    samples: Sequence[Sample],
    prompt_texts: Mapping[int, str],
    reward_fn: RewardFn,
    max_new_tokens: int,
    path: str | os.PathLike | None,
    pad_token_id: int,
    temperature: float,
    batch_size: int = 16,
    progress: bool = True,
) -> list[Sample]:
    """`samples` (with candidate rewards and probabilities, score_candidates) with their labels replaced by the
    lookahead l (module docstring): `candidate_rewards[t][j]` = l(s_t∘a_j), `prefix_rewards[t]` = l(s_t) for
    0 < t < T (r_T kept: the completion is finished there; r_0 is never trained). Samples without candidates pass
    unchanged. Stored records in `path` are reused.

    Args:
        base_model: The local transformers causal LM that drew the samples (under no_grad).
        max_new_tokens: The samples' length limit: a candidate at s_{max_new_tokens − 1} is final.
        temperature: The sampling temperature, for p(b | x) (`sampling_probabilities`).
    """
    path = Path(path) if path is not None else None
    stored = load_records(path, _parse)
    with_candidates = [sample for sample in samples if sample.candidate_ids and sample.candidate_probs is not None]

    def complete(sample: Sample) -> bool:
        rows = stored.get(sample_key(sample))
        return rows is not None and [len(row) for row in rows] == [len(row) for row in sample.candidate_ids]

    missing = [sample for sample in with_candidates if not complete(sample)]
    if missing:
        logger.info("Scoring one base step beyond every candidate of %d completions (%d stored)", len(missing),
                    len(stored))
    final_tokens = end_token_ids(base_model, tokenizer)
    layout = config_attention_layout(base_model.config)
    batches = [missing[start : start + batch_size] for start in range(0, len(missing), batch_size)]
    for number, batch in enumerate(tqdm(batches, desc="lookahead labels", unit="batch", disable=not progress)):
        next_ids, next_probs = _after_candidates(base_model, batch, pad_token_id, temperature, layout)
        rows = []  # (row, t, j, b, p(b)): the continuation b of candidate j at state t, where one follows
        for row, sample in enumerate(batch):
            for t, tokens in enumerate(sample.candidate_ids):
                for j, token in enumerate(tokens):
                    if token not in final_tokens and t + 1 < max_new_tokens:
                        rows += [(row, t, j, b, p) for b, p in zip(next_ids[row][t][j], next_probs[row][t][j])]
        texts = tokenizer.batch_decode([batch[row].completion_ids[:t] + [batch[row].candidate_ids[t][j], b]
                                        for row, t, j, b, _ in rows], skip_special_tokens=True)
        try:
            rewards = check_rewards(reward_fn([prompt_texts[batch[row].prompt_index] for row, *_ in rows],
                                              texts), len(rows), number) if rows else []
        except Exception as error:
            where = f"; the lookahead labels scored so far are kept in {path}" if path is not None else ""
            raise RuntimeError(f"reward_fn failed on lookahead prefixes (lookahead batch {number}){where}") from error
        values = [[list(row) for row in sample.candidate_rewards] for sample in batch]  # l = r where nothing follows
        for (row, t, j, _, probability), reward in zip(rows, rewards):
            values[row][t][j] += probability * (reward - batch[row].candidate_rewards[t][j])
        records = []
        for sample, sample_values in zip(batch, values):
            stored[sample_key(sample)] = sample_values
            records.append({"key": sample_key(sample), "values": sample_values})
        append_records(path, records)
    lifted = {id(sample) for sample in with_candidates}
    return [_with_lookahead(sample, stored[sample_key(sample)]) if id(sample) in lifted else sample
            for sample in samples]


def _with_lookahead(sample: Sample, values: list[list[float]]) -> Sample:
    """The sample with l as its labels: l(s_t∘a) for its candidates, l(s_t) = r_t + sum_a p(a|s_t) (r(s_t∘a) − r_t)
    for its states 0 < t < T."""
    prefix = list(sample.prefix_rewards) if sample.prefix_rewards is not None else None
    if prefix is not None:
        for t in range(1, len(sample.candidate_ids)):
            level = prefix[t]
            prefix[t] = level + sum(p * (r - level) for p, r in zip(sample.candidate_probs[t],
                                                                    sample.candidate_rewards[t]))
    return dataclasses.replace(sample, prefix_rewards=prefix, candidate_rewards=values)


@torch.no_grad()
def _after_candidates(base_model, samples: Sequence[Sample], pad_token_id: int, temperature: float, layout):
    """For every candidate a_j of every state s_t: the base's top-k next tokens after s_t∘a_j (k = the number of
    candidates) and their sampling probabilities, [sample][t][j] -> list of k, from one forward with the
    candidates appended to the sequences (each sees its prefix and itself, at the next token's position)."""
    batch = collate(samples, pad_token_id, base_model.device, candidates=True)
    mask = additive_masks(batch.allowed, batch.position_ids, layout, base_model.dtype)
    with eval_mode(base_model):
        logits = base_model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids).logits
    ids, probs = [], []
    for row, sample in enumerate(samples):
        sample_ids, sample_probs = [], []
        for t, tokens in enumerate(sample.candidate_ids):
            columns = batch.candidate_columns[row, t, : len(tokens)]
            candidate_logits = logits[row, columns].float()  # (k, V)
            top = candidate_logits.topk(min(len(tokens), logits.shape[-1]), dim=-1).indices  # (k, k)
            sample_ids.append(top.tolist())
            sample_probs.append(sampling_probabilities(base_model, candidate_logits, temperature).gather(1, top)
                                .tolist())
        ids.append(sample_ids)
        probs.append(sample_probs)
    return ids, probs
