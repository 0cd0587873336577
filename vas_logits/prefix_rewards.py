"""Prefix rewards: the reward of every partial completion, exact labels that teach the value model the reward.

A Monte-Carlo return R says little about one token: most of its variance comes from the tokens after it. Yet
VAS moves probability between candidates by how much each changes Q (VAS_NOTES.md), and for most rewards
(lexicons, classifiers, rubric scores) much of that change is already visible in the reward of the text so far.
reward_fn can score any text, so fit() scores every prefix of each training completion,

    r_t = reward_fn(prompt, completion[:t])       t = 1 .. T − 1 (r_T = R, the sample's own reward)

and trains the value head in two parts on the same backbone features h (trainer.py):

    V(s_t) = phi(h_t) + u(h_t)
    phi    learns r_t and its increments r_t − r_{t−1}: exact, noise-free labels, one per token
    u      learns the rest from the TD(lambda) targets of V (phi held fixed there): E[R | s_t] − phi(s_t)

Both are linear, so the trained model is one scalar head, phi + u, saved in today's format. A token head
(Q(s, a) for every next token from s alone) gets a second token head as phi, read at s_t for the drawn token
(phi(s_t, a_t) learns r_(t+1)) and for the candidates, and is saved as one token head in the same way. Nothing is lost
where prefixes say nothing (a reward of the finished answer only): phi then learns little and u all of it.
The labels are unbiased: Q is still learned from the returns; phi only carries what the prefixes make exact.

Cost: T − 1 reward calls per completion (VADER: about 20,000 a second), scored in batches and appended to
`prefix-rewards.jsonl` in output_dir, so an interrupted run resumes with the samples not scored yet.
`candidates=k` also scores the base's top-k next tokens at every state (candidate_rewards.py): k · T more calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .sampling import RewardFn, Sample, check_rewards

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class PrefixRewards:
    """fit()'s prefix rewards (see the module): `fit(..., prefix_rewards=PrefixRewards())` (the default) or None."""

    weight: float = field(default=1.0, metadata={"help": (
        "loss weight of the prefix head on the prefix rewards r_t themselves (in the value model's units)")})
    increment_weight: float = field(default=30.0, metadata={"help": (
        "loss weight of the prefix head on the increments r_t − r_(t−1): the per-token changes VAS steers by, "
        "rare and small next to the levels, hence the larger weight (10 and 100 steered less on the sentiment "
        "benchmark)")})
    candidates: int = field(default=4, metadata={"help": (
        "also score the base's top-N next tokens at every sampled state (N · T more reward calls per sample) and "
        "train the prefix head on their contrasts to the drawn token (candidate_rewards.py; a local base model "
        "only; 0: off)")})
    control_variates: bool = field(default=True, metadata={"help": (
        "with candidates: correct the returns that train u by the candidates' rewards, sum over the top-N of "
        "(p(a|s) − [a drawn]) · (r(s∘a) − r(s)) at every later state, which has mean zero under the base and "
        "removes the noise of which of them was drawn (targets.control_variates)")})
    lookahead: bool = field(default=True, metadata={"help": (
        "with candidates: replace every label of the prefix head by its expectation one base step further, "
        "r(x) + sum over the base's top-N next tokens b of p(b|x) · (r(x∘b) − r(x)) (lookahead.py: one more base "
        "forward and N² · T more reward calls per sample), so phi also learns what a token sets up (the default "
        "since round 20: 0.82 of the exact gain on the yardstick's temporal task against 0.68 without, a tie on the "
        "sentiment benchmark; False for a costly reward_fn)")})

    def __post_init__(self):
        for name in ("weight", "increment_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or \
                    not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 0:
            raise ValueError(f"`candidates` must be an int >= 0, got {self.candidates!r}")
        for name in ("control_variates", "lookahead"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        if self.weight == 0 and self.increment_weight == 0:
            raise ValueError("`weight` and `increment_weight` are both 0: pass prefix_rewards=None to fit() instead")

    def settings(self) -> dict:
        """What a checkpoint records of them (candidates only when used: older checkpoints resume unchanged)."""
        with_candidates = ("candidates", "control_variates", "lookahead")
        return {f"prefix_{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)
                if (f.name not in with_candidates or self.candidates) and (f.name != "lookahead" or self.lookahead)}


def sample_key(sample: Sample) -> str:
    """A short digest of a sample's tokens: which stored prefix rewards belong to which sample."""
    return hashlib.sha256(json.dumps([sample.prompt_ids, sample.completion_ids]).encode()).hexdigest()[:24]


def prefix_ends(sample: Sample) -> range:
    """The prefix lengths t scored for a sample: 1 .. T − 1 (r_T is its reward). A sibling rollout's earlier
    prefixes are scored too, though never trained: the same tokens then always have the same stored rewards."""
    return range(1, len(sample.completion_ids))


def score_prefixes(
    tokenizer,
    samples: Sequence[Sample],
    prompt_texts: Mapping[int, str],
    reward_fn: RewardFn,
    path: str | os.PathLike | None,
    texts_per_call: int = 2048,
    progress: bool = True,
) -> list[Sample]:
    """`samples` with `prefix_rewards` filled in: [r_0, r_1, .., r_T] (r_0, never trained, repeats r_1). Rewards
    stored in `path` are reused.

    Args:
        samples: Samples with completions as ids; `prompt_texts[sample.prompt_index]` is the prompt text that
            reward_fn saw for the sample.
        path: A JSON-lines file of {"key", "rewards"} records (None: keep nothing).
        texts_per_call: Prefixes per reward_fn call.
    """
    path = Path(path) if path is not None else None
    stored = load_records(path)
    missing = [sample for sample in samples  # (a stored record of another length is scored again)
               if len(prefix_ends(sample)) and len(stored.get(sample_key(sample), ())) != len(prefix_ends(sample))]
    if missing:
        logger.info("Scoring the prefixes of %d completions (%d stored)", len(missing), len(stored))
    batches, batch, size = [], [], 0
    for sample in missing:  # whole samples per call, so each stored record is complete
        batch.append(sample)
        size += len(prefix_ends(sample))
        if size >= texts_per_call:
            batches.append(batch)
            batch, size = [], 0
    batches += [batch] if batch else []
    for number, batch in enumerate(tqdm(batches, desc="prefix rewards", unit="batch", disable=not progress)):
        rows = [(sample, end) for sample in batch for end in prefix_ends(sample)]
        texts = tokenizer.batch_decode([sample.completion_ids[:end] for sample, end in rows], skip_special_tokens=True)
        try:
            rewards = check_rewards(reward_fn([prompt_texts[sample.prompt_index] for sample, _ in rows], texts),
                                    len(rows), number)
        except Exception as error:
            where = f"; the prefix rewards scored so far are kept in {path}" if path is not None else ""
            raise RuntimeError(f"reward_fn failed on partial completions (prefix batch {number}){where}") from error
        records, position = [], 0
        for sample in batch:
            count = len(prefix_ends(sample))
            stored[sample_key(sample)] = rewards[position : position + count]
            records.append({"key": sample_key(sample), "rewards": rewards[position : position + count]})
            position += count
        append_records(path, records)
    return [dataclasses.replace(sample, prefix_rewards=_full(sample, stored.get(sample_key(sample), [])))
            for sample in samples]


def _full(sample: Sample, scored: list[float]) -> list[float]:
    """r_0 .. r_T: r_0 (never trained) as r_1, the scored r_1 .. r_(T−1), and r_T = the sample's reward."""
    values = list(scored) + [sample.reward]
    return values[:1] + values


def load_records(path: Path | None, parse=lambda record: [float(value) for value in record["rewards"]]) -> dict:
    """The stored records, {key: parse(record)}; a last line cut short by a crash, or one that does not read
    (or parse), is scored again."""
    if path is None or not path.exists():
        return {}
    stored = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            stored[record["key"]] = parse(record)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.warning("Skipping an unreadable line of %s (its sample is scored again)", path)
    return stored


def append_records(path: Path | None, records: list[dict]) -> None:
    """Append JSON lines to `path` and sync them to disk (a line cut short by an earlier crash is ended first)."""
    if path is None or not records:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as file:
        if file.tell() > 0:
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":  # a line cut short by a crash: end it, so it is skipped
                file.write(b"\n")
        file.writelines((json.dumps(record) + "\n").encode() for record in records)
        file.flush()
        os.fsync(file.fileno())
