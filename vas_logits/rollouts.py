"""fit()'s options for training data beyond the base's own samples, in one documented dataclass.

    fit(model, tokenizer, prompts, reward_fn, rollouts=Rollouts(siblings=2))           # sibling rollouts
    fit(model, tokenizer, prompts, reward_fn, rollouts=Rollouts(siblings=2, rounds=2))  # and a roll-in round

Both need a local transformers base model (they read its top-k and continue from chosen states). vas-fit's
options of the same names are generated from the fields below (their help is the field's `help`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class Rollouts:
    siblings: int = field(default=0, metadata={"help": (
        "sibling rollouts per training sample (siblings.py): at a random state of each sample, this many distinct "
        "tokens drawn uniformly from the base's top_k are each continued by the base and scored, so the value model "
        "learns the contrast between candidates at one state that VAS uses; 0: none")})
    top_k: int = field(default=10, metadata={"help": (
        "the candidates rollouts choose from, and the top_k of the roll-ins' VAS: match the processor's top_k")})
    rounds: int = field(default=1, metadata={"help": (
        "roll-in rounds (rollin.py): after the first, roll in with VAS under the value model so far, roll out "
        "max(1, siblings) candidates with the base from a random state of each roll-in, pool and train `epochs` more "
        "epochs (keep_best then picks among the last round's epochs)")})
    rollin_beta: float = field(default=2.0, metadata={"help": (
        "the VAS beta of the roll-ins, per standard deviation of the reward")})

    def __post_init__(self):
        for name in ("siblings", "top_k", "rounds"):
            value, least = getattr(self, name), 0 if name == "siblings" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = "a non-negative integer (0: no sibling rollouts)" if least == 0 else "a positive integer"
                raise ValueError(f"`{name}` must be {kind}, got {value!r}")
        if self.siblings > self.top_k:
            raise ValueError(f"`siblings` ({self.siblings}) must be at most `top_k` ({self.top_k}): siblings are "
                             f"distinct top-k candidates")
        beta = self.rollin_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or not math.isfinite(beta):
            raise ValueError(f"`rollin_beta` must be a finite number > 0, got {beta!r}")

    @property
    def active(self) -> bool:
        """Whether any data beyond the base's own samples is asked for."""
        return self.siblings > 0 or self.rounds > 1

    def settings(self) -> dict:
        """What a checkpoint records of them (empty when inactive, so older checkpoints resume unchanged)."""
        return {f.name: getattr(self, f.name) for f in fields(self)} if self.active else {}
