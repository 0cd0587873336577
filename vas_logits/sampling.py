"""Samples from the frozen base model, scored once by the reward function and kept on disk.

A value model is trained only on pi_ref's own samples (plain sampling at temperature 1 unless asked
otherwise). Each batch is appended to a JSON-lines file as soon as it is scored, so a crash, a failing
reward function or a Ctrl-C loses nothing, and a rerun samples only the prompts still missing.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # rewards are trained in float32: larger ones overflow


@dataclass
class Sample:
    """One completion of one prompt. `completion_ids` ends with EOS unless it was cut at max_new_tokens.

    `first_state` > 0 marks a sibling rollout (siblings.py): its token at s_{first_state − 1} was not drawn by the
    base, so only the states s_{first_state} .. s_T are trained on it. `prefix_rewards` (prefix_rewards.py):
    r_0 .. r_T, the reward of each partial completion; `candidate_ids` / `candidate_rewards` / `candidate_probs`
    (candidate_rewards.py): (T, k) the base's top-k next tokens a at s_0 .. s_{T−1}, r(s_t∘a) and the probability
    that sampling drew a there. Those are kept in files of their own (never in the samples')."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    reward: float
    first_state: int = 0
    prefix_rewards: list[float] | None = None
    candidate_ids: list[list[int]] | None = None
    candidate_rewards: list[list[float]] | None = None
    candidate_probs: list[list[float]] | None = None

    def record(self) -> dict:
        """What a samples file stores of it."""
        record = asdict(self)
        for name in ("prefix_rewards", "candidate_ids", "candidate_rewards", "candidate_probs"):
            del record[name]
        return record


class SampleStore:
    """Samples as JSON lines, one per line, appended batch by batch."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None

    def load(self, samples_per_prompt: int | None = None) -> list[Sample]:
        """The stored samples. The file is repaired first: a last line cut short by a crash, unreadable lines
        and prompts with fewer than `samples_per_prompt` samples are dropped (and so sampled again)."""
        if self.path is None or not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # b"" when not even one line was finished
        samples, damaged = [], len(complete) < len(data)
        for line_number, line in enumerate(complete.decode(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                samples.append(Sample(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as error:
                logger.warning("Dropping unreadable line %d of %s: %s", line_number, self.path, error)
                damaged = True
        counts = Counter(sample.prompt_index for sample in samples)
        incomplete = {index for index, count in counts.items() if samples_per_prompt and count < samples_per_prompt}
        if damaged or incomplete:
            samples = [sample for sample in samples if sample.prompt_index not in incomplete]
            logger.warning("Repaired %s: kept %d complete samples; %d prompts with missing samples will be sampled "
                           "again", self.path, len(samples), len(incomplete))
            self._rewrite(samples)
        return samples

    def _rewrite(self, samples: Sequence[Sample]) -> None:
        """Replace the file atomically: a crash leaves either the old or the new file, never a mix."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        with temporary.open("w") as file:
            file.writelines(json.dumps(sample.record()) + "\n" for sample in samples)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)

    def append(self, samples: Sequence[Sample]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            file.writelines(json.dumps(sample.record()) + "\n" for sample in samples)
            file.flush()
            os.fsync(file.fileno())


def check_rewards(rewards, expected: int, batch_index: int) -> list[float]:
    """The reward function's output as floats, or a ValueError saying what is wrong with it."""
    try:
        rewards = [float(reward) for reward in rewards]
    except (TypeError, ValueError) as error:
        raise ValueError(f"reward_fn must return a list of floats, got {type(rewards).__name__}: {error}") from error
    if len(rewards) != expected:
        raise ValueError(f"reward_fn returned {len(rewards)} rewards for {expected} completions (batch {batch_index})")
    bad = [(index, reward) for index, reward in enumerate(rewards) if not abs(reward) < FLOAT32_MAX]
    if bad:
        raise ValueError(f"reward_fn returned non-finite rewards or rewards beyond float32's range (|reward| < "
                         f"{FLOAT32_MAX:.3g}), which would train a NaN value model: (completion, reward) "
                         f"{bad[:5]} of batch {batch_index}")
    return rewards


def score_batch(reward_fn: RewardFn, prompt_texts: list[str], completion_texts: list[str], store: "SampleStore",
                batch: Sequence[tuple[int, str]], batch_index: int) -> list[float]:
    """reward_fn on one sampling batch; its failure names the batch and where the earlier batches are kept."""
    try:
        return check_rewards(reward_fn(prompt_texts, completion_texts), len(completion_texts), batch_index)
    except Exception as error:
        kept = store.path is not None and store.path.exists() and store.path.stat().st_size > 0
        where = f"; the samples of earlier batches are kept in {store.path}" if kept else ""
        first, last = batch[0][0], batch[-1][0]
        raise RuntimeError(f"reward_fn failed on sampling batch {batch_index} (prompts {first}..{last}){where}") from error


def pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int, side: str = "left"):
    """(batch, max_len) ids and 0/1 attention mask; "left" as decoder-only generate() expects, "right" for training."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            columns = slice(width - len(sequence), width) if side == "left" else slice(0, len(sequence))
            ids[row, columns] = torch.tensor(sequence)
            mask[row, columns] = 1
    return ids, mask


def end_token_ids(base_model, tokenizer) -> set[int]:
    """The ids that end a completion: the base's generation_config EOS (one or a list) and the tokenizer's."""
    eos = base_model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids | ({tokenizer.eos_token_id} - {None})


def sampling_kwargs(temperature: float, pad_token_id: int, eos_token_ids: set[int],
                    generation_kwargs: dict | None = None) -> dict:
    """generate() arguments for pi_ref's own samples: plain sampling at `temperature` (no top-k/top-p unless
    generation_kwargs asks), stopping at any of `eos_token_ids`."""
    return dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=None, pad_token_id=pad_token_id,
                eos_token_id=sorted(eos_token_ids) or None, **(generation_kwargs or {}))


def cut_completion(ids: torch.Tensor, eos_token_ids: set[int]) -> list[int]:
    """The generated ids up to and including the first EOS (generate() pads the rest)."""
    completion = []
    for token in ids.tolist():
        completion.append(token)
        if token in eos_token_ids:
            break
    return completion


@torch.no_grad()
def sample_and_score(
    base_model,
    tokenizer,
    prompts: Sequence[tuple[int, str]],
    reward_fn: RewardFn,
    store: SampleStore,
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    prompts_per_batch: int,
    pad_token_id: int,
    generation_kwargs: dict | None = None,
    progress: bool = True,
) -> list[Sample]:
    """Sample `samples_per_prompt` completions of each (index, text) prompt, score them, store each batch."""
    eos_token_ids = end_token_ids(base_model, tokenizer)
    sampling = dict(num_return_sequences=samples_per_prompt, max_new_tokens=max_new_tokens,
                    **sampling_kwargs(temperature, pad_token_id, eos_token_ids, generation_kwargs))
    samples = []
    batches = [prompts[i : i + prompts_per_batch] for i in range(0, len(prompts), prompts_per_batch)]
    for batch_index, batch in enumerate(tqdm(batches, desc="sampling", unit="batch", disable=not progress)):
        prompt_ids = [tokenizer(text, add_special_tokens=True)["input_ids"] for _, text in batch]
        input_ids, attention_mask = (t.to(base_model.device) for t in pad_batch(prompt_ids, pad_token_id))
        output = base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **sampling)
        completions = [cut_completion(row, eos_token_ids) for row in output[:, input_ids.shape[1] :].cpu()]
        prompt_texts = [text for _, text in batch for _ in range(samples_per_prompt)]
        completion_texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        rewards = score_batch(reward_fn, prompt_texts, completion_texts, store, batch, batch_index)
        new = [
            Sample(index, ids, completion, reward)
            for (index, _), ids, completion, reward in zip(
                [item for item in batch for _ in range(samples_per_prompt)],
                [ids for ids in prompt_ids for _ in range(samples_per_prompt)],
                completions,
                rewards,
            )
        ]
        store.append(new)
        samples.extend(new)
    return samples
