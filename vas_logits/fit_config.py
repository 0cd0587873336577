"""fit()'s options in one documented dataclass, as transformers' TrainingArguments gathers a Trainer's.

    fit(model, tokenizer, prompts, reward_fn, config=FitConfig(epochs=5, output_dir="runs/sentiment"))
    fit(model, tokenizer, prompts, reward_fn, epochs=5, output_dir="runs/sentiment")   # the same: fields as keywords

vas-fit's options are generated from the fields below: a field's `help` is its help there, `group` its section
(None: not on the command line) and `flags` extra option names kept for older command lines.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields, replace

from .prefix_rewards import PrefixRewards
from .rollouts import Rollouts

# fit()'s default PrefixRewards: applied where it can (a scalar or token head trained on a reward_fn; candidates
# with a local base model) and dropped with a log line elsewhere, whereas an explicit PrefixRewards there is an error.
DEFAULT_PREFIX_REWARDS = PrefixRewards()


def _option(default, help: str, group: str | None, *flags: str, type=None):
    return field(default=default, metadata={"help": help, "group": group, "flags": flags, "type": type})


@dataclass(frozen=True)
class FitConfig:
    # sampling from the base
    samples_per_prompt: int = _option(4, "completions sampled per prompt", "sampling")
    max_new_tokens: int = _option(64, "longest completion (EOS ends one earlier)", "sampling")
    temperature: float = _option(1.0, "sampling temperature of the base (no top-k/top-p unless generation_kwargs "
                                      "asks)", "sampling")
    sampling_batch_size: int = _option(64, "completions per generate() call while sampling; larger batches sample "
                                           "faster (sampling is most of fit()'s time for small value models)",
                                       "sampling")
    generation_kwargs: dict | None = _option(None, "extra arguments for the base model's generate() when sampling",
                                             None)
    # training
    epochs: int = _option(5, "passes over the samples; targets are recomputed from the current model at each visit "
                             "(5 since round 20: lookahead labels keep improving past epoch 3)", "training")
    batch_size: int = _option(16, "completions per optimisation step (and per process under DDP)", "training")
    learning_rate: float | None = _option(
        None, "AdamW learning rate (default: 0.09 / the value model's hidden size: 1.6e-4 for a 576-wide SmolLM2 cut, "
              "4.4e-5 for a 2048-wide 1B model; the paper used about 1e-5 at 1B)", "training", type=float)
    lam: float = _option(1.0, "TD(lambda) trace parameter in [0, 1]: 1 trains on the Monte-Carlo return (the reward "
                              "itself), lower values bootstrap from the model's own next prediction", "training")
    gamma: float = _option(1.0, "discount per token of the TD(lambda) returns (must be 1 for a distributional head)",
                           "training")
    max_grad_norm: float = _option(1.0, "gradient-norm clipping", "training")
    eval_fraction: float = _option(0.1, "share of prompts held out to report the value model's error and its "
                                        "correlation with the reward each epoch", "training")
    standardize_rewards: bool = _option(
        True, "train a fresh value model on (R - mean) / std of the training rewards and record both in its config, "
              "so beta is per standard deviation of the reward whatever its scale (a distributional head's atoms then "
              "span the standardised rewards)", "training", "--no-standardize")
    keep_best: bool = _option(True, "return the weights of the epoch with the lowest held-out error (squared error of "
                                    "V(s_t) against the reward, over every state) rather than the last epoch's",
                              "training", "--last-epoch")
    seed: int = _option(0, "seeds sampling, the held-out split and the shuffling", "training")
    # training data beyond the base's own samples
    rollouts: Rollouts = _option(Rollouts(), "sibling rollouts and roll-in rounds (vas_logits.Rollouts; local base "
                                             "models only); default: none", None)
    prefix_rewards: PrefixRewards | None = _option(
        DEFAULT_PREFIX_REWARDS, "score every partial completion (and, with candidates, the base's top-k next tokens "
        "at every state) with reward_fn too and learn those exact labels in a second head added into the value head "
        "(vas_logits.PrefixRewards); None: train on the returns alone. The default applies to a scalar or token head "
        "trained on a reward_fn, its candidates only with a local base model", None)
    # running
    output_dir: str | os.PathLike | None = _option(
        None, "where samples, checkpoints and the final model (value_model/) go; enables resuming. Its stored samples "
              "are reused only if the prompts, reward, base model, tokenizer and sampling settings are the same "
              "(recorded in sampling.json); otherwise fit() stops with the differences", "running", "--output",
        type=str)
    overwrite_output_dir: bool = _option(False, "delete the samples (and their scores), checkpoints and model "
                                                "already in output_dir and start over", "running",
                                         "--overwrite-output")
    keep_checkpoint: bool = _option(False, "keep output_dir/checkpoint (weights and optimizer state, about 3x the "
                                           "model's size) after the final model is saved, e.g. to train on later",
                                    "running")
    progress: bool = _option(True, "show tqdm progress bars", "running")
    reward_name: str | None = _option(None, "text recorded as the value model's `reward` (default: reward_fn's name)",
                                      None)

    def __post_init__(self):
        for name in ("samples_per_prompt", "max_new_tokens", "epochs", "batch_size", "sampling_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}")
        positive = (lambda value: 0 < value < math.inf, "> 0")
        ranges = {"temperature": positive, "max_grad_norm": positive,
                  "lam": (lambda value: 0 <= value <= 1, "in [0, 1]"),
                  "gamma": (lambda value: 0 <= value <= 1, "in [0, 1]"),
                  "eval_fraction": (lambda value: 0 <= value < 1, "in [0, 1)")}
        if self.learning_rate is not None:  # None: 0.09 / the value model's hidden size
            ranges["learning_rate"] = positive
        for name, (allowed, bounds) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not allowed(value):
                raise ValueError(f"`{name}` must be {bounds}, got {value!r}")
        if self.rollouts is None:  # None as well as Rollouts(): no data beyond the base's own samples
            object.__setattr__(self, "rollouts", Rollouts())
        if not isinstance(self.rollouts, Rollouts):
            raise ValueError(f"`rollouts` must be a vas_logits.Rollouts (e.g. Rollouts(siblings=2)), got "
                             f"{self.rollouts!r:.80}")
        if self.prefix_rewards is not None and not isinstance(self.prefix_rewards, PrefixRewards):
            raise ValueError(f"`prefix_rewards` must be a vas_logits.PrefixRewards or None, got "
                             f"{self.prefix_rewards!r:.80}")
        if self.generation_kwargs is not None and not isinstance(self.generation_kwargs, dict):
            raise ValueError(f"`generation_kwargs` must be a dict or None, got {self.generation_kwargs!r:.80}")

    @property
    def prompts_per_batch(self) -> int:
        """Prompts per generate() call while sampling: sampling_batch_size completions, at least one prompt."""
        return max(1, self.sampling_batch_size // self.samples_per_prompt)

    @classmethod
    def resolve(cls, config: FitConfig | None, options: dict) -> FitConfig:
        """`config` (default: FitConfig()) with `options`, fields given as keywords, replacing its values."""
        if config is None:
            config = cls()
        elif not isinstance(config, cls):
            raise ValueError(f"`config` must be a vas_logits.FitConfig, got {config!r:.80}")
        names = [option.name for option in fields(cls)]
        for name in options:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else " (see vas_logits.FitConfig for the options)"
                raise TypeError(f"fit() got an unexpected keyword argument {name!r}{hint}")
        return replace(config, **options) if options else config
