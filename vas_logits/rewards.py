"""Reward models as reward functions for fit(): a transformers sequence-classification model scores text.

The reward models people train for RLHF (a DeBERTa, a Llama with a scalar head, a sentiment classifier) are
`AutoModelForSequenceClassification`s. `reward_model_fn` wraps one into the `reward_fn(prompts, completions)
-> list[float]` that fit() calls: batched, on the model's device, without gradients, with the reward model's
own chat template when it has one (so a chat reward model sees the conversation the way it was trained).

>>> reward_fn = reward_model_fn("OpenAssistant/reward-model-deberta-v3-large-v2")   # doctest: +SKIP
>>> value_model = fit(base, tokenizer, prompts, reward_fn, output_dir="runs/helpful")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)


def reward_model_fn(
    model,
    tokenizer=None,
    *,
    label: int | str | None = None,
    output: str = "logit",
    chat_template: bool | None = None,
    batch_size: int = 16,
    max_length: int = 1024,
    device: str | torch.device | None = None,
):
    """A batched `reward_fn(prompts, completions) -> list[float]` backed by a sequence-classification model.

    Args:
        model: An `AutoModelForSequenceClassification`, or a local path / Hub id to load one from.
        tokenizer: Its tokenizer (default: loaded from the same path / id as the model).
        label: Which class scores the text: an index or a name in `config.id2label`. Required when the model
            has several labels (e.g. "POSITIVE" of a sentiment classifier); a one-label reward model needs none.
        output: "logit" (the label's logit, as reward models are trained) or "log_prob" (its log-softmax over
            the labels, in (−inf, 0]).
        chat_template: Format each pair as a user turn (the prompt) and an assistant turn (the completion) with
            the reward model's chat template. Default: when its tokenizer has one; otherwise prompt + completion.
        batch_size: Texts per forward.
        max_length: Longest input in tokens; longer ones are cut from the left (keeping the completion's end).
        device: Where to run the model (default: where it is).

    Returns:
        The reward function.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if isinstance(model, (str, os.PathLike)):
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
        model = AutoModelForSequenceClassification.from_pretrained(model)
    if tokenizer is None:
        raise ValueError("`tokenizer` is required when `model` is a loaded model")
    if output not in ("logit", "log_prob"):
        raise ValueError(f"`output` must be 'logit' or 'log_prob', got {output!r}")
    for name, value in dict(batch_size=batch_size, max_length=max_length).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    label_index = _label_index(model.config, label)
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None) is not None
    if device is not None:
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:  # classifiers read the last real token, found through the pad id
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.truncation_side = "left"

    def texts_of(prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
        if not chat_template:
            return [prompt + completion for prompt, completion in zip(prompts, completions)]
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
            )
            for prompt, completion in zip(prompts, completions)
        ]

    @torch.no_grad()
    def reward_fn(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts for {len(completions)} completions")
        texts, rewards = texts_of(prompts, completions), []
        add_special_tokens = not chat_template  # a chat template writes its own special tokens
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
                              max_length=max_length, add_special_tokens=add_special_tokens).to(model.device)
            logits = model(**batch).logits.float()  # (b, num_labels)
            if output == "log_prob":
                logits = logits.log_softmax(-1)
            rewards += logits[:, label_index].tolist()
        return rewards

    name = getattr(model.config, "_name_or_path", "") or "model"
    reward_fn.__qualname__ = reward_fn.__name__ = f"reward_model[{name}]"
    return reward_fn


def _label_index(config, label: int | str | None) -> int:
    num_labels = config.num_labels
    if label is None:
        if num_labels != 1:
            raise ValueError(
                f"The reward model has {num_labels} labels {list(config.id2label.values())}: pass `label` (a name "
                "or an index) to say which one scores the text"
            )
        return 0
    if isinstance(label, str):
        names = {name: int(index) for index, name in config.id2label.items()}
        if label not in names:
            raise ValueError(f"`label` {label!r} is not one of the reward model's labels {sorted(names)}")
        return names[label]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
        raise ValueError(f"`label` must be a label name or an index in [0, {num_labels}), got {label!r}")
    return label
