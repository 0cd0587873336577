"""Sibling rollouts: Monte-Carlo returns of several candidates at the same state, for fit().

VAS moves probability between the top-k candidates of a state by Q(s, a) − mean_K Q (VAS_NOTES.md). A value model
trained on the base's own samples sees one next token per state, the one the base drew, so the contrast between
candidates at one state is learned only indirectly. Sibling rollouts supervise it directly:

    for each sample s_0 .. s_T:   a cut t drawn uniformly from 0 .. T − 1, the state s = prompt ∘ completion[:t]
    candidates                    `siblings` distinct tokens drawn uniformly from the base's top-k at s
    for each candidate a          roll out the frozen base from s∘a to the end (as many tokens in all as the
                                  sample could have had), score the completion once: a return of Q(s, a)

Each rollout is a Sample whose `first_state` is t + 1: only the states from s∘a on are trained on it, because
the token at s was chosen by this scheme, not by the base, so the earlier states' returns are not V's. The
rollouts of a batch of prompts are scored and stored together (`siblings-<n>-top<k>.jsonl` in output_dir), so
an interrupted run resumes with the prompts not rolled out yet.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .samplers import Sampler, eval_mode
from .sampling import (RewardFn, Sample, SampleStore, cut_completion, end_token_ids, pad_batch, sampling_kwargs,
                       score_batch)

logger = logging.getLogger(__name__)


class SiblingSampler(Sampler):
    """fit()'s sampler of sibling rollouts: called with (index, text) prompts like any Sampler, it rolls out the
    given base samples of those prompts (see `roll_out_siblings` for the options)."""

    def __init__(self, base_model, tokenizer, reward_fn: RewardFn, samples: Sequence[Sample], **options):
        self.local_model, self.tokenizer, self.reward_fn, self.options = base_model, tokenizer, reward_fn, options
        self.samples = samples
        self.description = {"siblings": options["siblings"], "top_k": options["top_k"]}

    def __call__(self, prompts, store, progress):
        texts = dict(prompts)
        mine = [sample for sample in self.samples if sample.prompt_index in texts]
        with eval_mode(self.local_model):
            return roll_out_siblings(self.local_model, self.tokenizer, mine, texts, self.reward_fn, store,
                                     progress=progress, **self.options)


@torch.no_grad()
def roll_out_siblings(
    base_model,
    tokenizer,
    samples: Sequence[Sample],
    prompt_texts: Mapping[int, str],
    reward_fn: RewardFn,
    store: SampleStore,
    *,
    siblings: int,
    top_k: int,
    max_new_tokens: int,
    temperature: float,
    pad_token_id: int,
    prompts_per_batch: int,
    generate_batch_size: int,
    seed: int,
    generation_kwargs: dict | None = None,
    progress: bool = True,
) -> list[Sample]:
    """Sibling rollouts of `samples` (the base's own, grouped by prompt), `siblings` per sample; see the module.
    `prompt_texts` maps each sample's prompt index to its text, as reward_fn saw it for the samples.

    Returns:
        The new Samples (each batch of prompts appended to `store` once scored), `siblings` per sample with at
        least one completion token, in the order of `samples`.
    """
    eos_token_ids = end_token_ids(base_model, tokenizer)
    sampling = sampling_kwargs(temperature, pad_token_id, eos_token_ids, generation_kwargs)
    by_prompt: dict[int, list[Sample]] = {}
    for sample in samples:
        if sample.completion_ids:
            by_prompt.setdefault(sample.prompt_index, []).append(sample)
    prompt_indices = sorted(by_prompt)
    batches = [prompt_indices[i : i + prompts_per_batch] for i in range(0, len(prompt_indices), prompts_per_batch)]
    rollouts = []
    for batch_index, batch in enumerate(tqdm(batches, desc="sibling rollouts", unit="batch", disable=not progress)):
        states = [(sample, _cut(sample, seed, number)) for index in batch
                  for number, sample in enumerate(by_prompt[index])]
        candidates = []
        for start in range(0, len(states), generate_batch_size):
            part = states[start : start + generate_batch_size]
            candidates += _candidates(base_model, part, siblings, top_k, pad_token_id, seed, sampling)
        rows = [(sample, cut, candidate) for (sample, cut), row in zip(states, candidates) for candidate in row]
        completions = _continue(base_model, rows, max_new_tokens, pad_token_id, eos_token_ids, sampling,
                                generate_batch_size)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        rewards = score_batch(reward_fn, [prompt_texts[sample.prompt_index] for sample, _, _ in rows], texts, store,
                              [(index, prompt_texts[index]) for index in batch], batch_index)
        new = [Sample(sample.prompt_index, sample.prompt_ids, completion, reward, first_state=cut + 1)
               for (sample, cut, _), completion, reward in zip(rows, completions, rewards)]
        store.append(new)
        rollouts.extend(new)
    return rollouts


def _generator(*key) -> torch.Generator:
    """A generator seeded from `key` the same way in every process and run (Python's hash() of str is salted)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (2**63))


def _cut(sample: Sample, seed: int, number: int) -> int:
    """The state s_t the siblings of a prompt's `number`-th sample branch from: t uniform in 0 .. T − 1."""
    generator = _generator(seed, "cut", sample.prompt_index, number)
    return int(torch.randint(len(sample.completion_ids), (1,), generator=generator))


def _candidates(base_model, states, siblings, top_k, pad_token_id, seed, sampling) -> list[list[int]]:
    """For each (sample, cut): `siblings` distinct tokens drawn uniformly from the base's top-k next tokens at the
    state, scored as generate() scores them (its logits processors, e.g. suppress_tokens, applied)."""
    prefixes = [sample.prompt_ids + sample.completion_ids[:cut] for sample, cut in states]
    input_ids, attention_mask = (t.to(base_model.device) for t in pad_batch(prefixes, pad_token_id))
    options = {key: value for key, value in sampling.items() if key not in ("do_sample", "temperature", "top_k",
                                                                            "top_p", "min_p")}
    output = base_model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=1, output_scores=True, return_dict_in_generate=True, **options)
    scores = output.scores[0].float().cpu()  # (N, V) the processed next-token scores (monotone in temperature)
    allowed = torch.isfinite(scores).sum(-1)  # tokens a processor did not forbid
    top = scores.topk(min(top_k, scores.shape[-1]), dim=-1).indices  # (N, k)
    chosen = []
    for row, ((sample, cut), available) in enumerate(zip(states, allowed.tolist())):
        pool = top[row, : max(1, min(top_k, available))]
        generator = _generator(seed, "siblings", sample.prompt_index, sample.completion_ids[:cut])
        order = torch.randperm(len(pool), generator=generator)
        chosen.append(pool[order[:siblings]].tolist())
    return chosen


def _continue(base_model, rows, max_new_tokens, pad_token_id, eos_token_ids, sampling, batch_size) -> list[list[int]]:
    """The completion of each (sample, cut, candidate) row: completion[:cut] + [candidate] + the base's rollout
    of the tokens left (max_new_tokens − cut − 1; none after an EOS). Rows are batched by tokens left."""
    completions: list[list[int] | None] = [None] * len(rows)
    pending = []
    for position, (sample, cut, candidate) in enumerate(rows):
        head = sample.completion_ids[:cut] + [candidate]
        left = max_new_tokens - cut - 1
        if candidate in eos_token_ids or left <= 0:
            completions[position] = head
        else:
            pending.append((left, position, head))
    pending.sort(key=lambda item: item[0])  # similar lengths together: little generated past a row's end
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        sequences = [rows[position][0].prompt_ids + head for _, position, head in chunk]
        input_ids, attention_mask = (t.to(base_model.device) for t in pad_batch(sequences, pad_token_id))
        longest = max(left for left, _, _ in chunk)
        output = base_model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=longest,
                                     **sampling)
        for (left, position, head), generated in zip(chunk, output[:, input_ids.shape[1] :].cpu()):
            completions[position] = head + cut_completion(generated[:left], eos_token_ids)
    return completions
