"""The files fit() keeps in its output_dir, and the rules that make reusing one safe.

    output_dir/
        sampling.json        what produced the samples: prompts (hash), reward, base model, tokenizer, settings
        samples.jsonl        the base model's scored samples, appended batch by batch (sampling.py)
        prefix-rewards.jsonl, candidate-rewards-top<k>.jsonl, siblings-*.jsonl, round-*.jsonl
                             more scores of the reward (prefix_rewards.py, candidate_rewards.py, siblings.py, rollin.py)
        checkpoint/          the latest training checkpoint (weights, optimizer, trainer state)
        value_model/         the final value model (save_pretrained)

A rerun with the same output_dir resumes; with other prompts, another reward or other sampling settings it
is refused with the differences named (never a silent reuse of old samples), unless asked to start over.
A checkpoint is written to checkpoint.partial/ and swapped in by renames; whatever point an interrupt hits,
the next run finds the newest complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .value_model import CONFIG_NAME

logger = logging.getLogger(__name__)

FINGERPRINT_NAME = "sampling.json"
SAMPLES_NAME = "samples.jsonl"
CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "value_model"
COMPLETE_MARKER = "trainer_state.json"  # written last: a checkpoint folder without it is incomplete
PREFIX_REWARDS_NAME = "prefix-rewards.jsonl"


def candidates_file_name(top_k: int) -> str:
    """The file for candidate rewards of this top_k (another top_k keeps its own file)."""
    return f"candidate-rewards-top{top_k}.jsonl"


def lookahead_file_name(top_k: int) -> str:
    """The file of lookahead labels (lookahead.py) for this top_k (another top_k keeps its own file)."""
    return f"lookahead-top{top_k}.jsonl"


def siblings_file_name(siblings: int, top_k: int) -> str:
    """The file for sibling rollouts of these settings (other settings keep their own file)."""
    return f"siblings-{siblings}-top{top_k}.jsonl"


def round_file_name(round_index: int, siblings: int, top_k: int, beta: float) -> str:
    """The file for the rollouts of roll-in round `round_index` (2, 3, ...)."""
    return f"round-{round_index}-siblings-{siblings}-top{top_k}-beta{beta:g}.jsonl"


# The reward's other scores (the files above) are keyed by the tokens they score, not by the reward: starting
# over (a new reward, say, on the same seeded samples) must delete them with the samples, or the old labels return.
SCORED_RECORDS = (PREFIX_REWARDS_NAME, candidates_file_name("*"), lookahead_file_name("*"),
                  siblings_file_name("*", "*"), "round-*.jsonl")
# Tokenised to fingerprint a tokenizer by what it does: words, digits, accents, emoji, whitespace, a chat marker.
PROBE_TEXT = "The movie was GREAT, 10/10!  Café naïve 😀\n\t<|im_start|>user end"


def describe_base_model(base_model, records: list[dict] | None = None) -> dict[str, Any]:
    """What identifies the source of the samples: a local model by name, type and size; an API endpoint by its
    URL and served model; samples given as text by their hash."""
    if records is not None:
        return {"samples": f"{len(records)} given samples, sha256 {_hash(records)}"}
    if hasattr(base_model, "base_url"):  # a CompletionsEndpoint
        return {"name": base_model.model, "endpoint": base_model.base_url}
    return {
        "name": _name(getattr(base_model.config, "_name_or_path", None)),
        "model_type": base_model.config.model_type,
        "parameters": sum(parameter.numel() for parameter in base_model.parameters()),
    }


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def sampling_fingerprint(base_model: dict[str, Any], tokenizer, prompts: list[str], reward: str,
                         **settings: Any) -> dict[str, Any]:
    """What determines the stored samples: change any of it and they are no longer samples of this run.
    `base_model` is `describe_base_model`'s description."""
    return {
        "prompts": f"{len(prompts)} prompts, sha256 {_hash(prompts)}",
        "reward": reward,
        "base_model": base_model,
        "tokenizer": {"name": _name(getattr(tokenizer, "name_or_path", None)), "size": len(tokenizer),
                      "ids": _tokenizer_hash(tokenizer)},
        **json.loads(json.dumps(settings, sort_keys=True, default=repr)),
    }


def _tokenizer_hash(tokenizer) -> str:
    """What the tokenizer does, not what it is called: its token -> id map, the ids of a probe text (normalisers
    and pre-tokenisers) and its special ids."""
    vocabulary = sorted(tokenizer.get_vocab().items())
    probe = tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]
    return _hash([vocabulary, probe, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id])


def _name(name_or_path: str | None) -> str | None:
    """A Hub id as it is; a local path by its last part, so moving a project keeps its fingerprints."""
    return Path(name_or_path).name if name_or_path and os.path.isabs(name_or_path) else name_or_path or None


class RunDirectory:
    """fit()'s output_dir: the fingerprint check, the samples' path, checkpoints and the final model."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.samples = self.path / SAMPLES_NAME
        self.checkpoint = self.path / CHECKPOINT_DIR
        self.final = self.path / FINAL_DIR
        self._partial = self.path / (CHECKPOINT_DIR + ".partial")
        self._old = self.path / (CHECKPOINT_DIR + ".old")

    # ------------------------------------------------------------------ before sampling

    def check(self, fingerprint: dict[str, Any], overwrite: bool) -> None:
        """Refuse stored samples made otherwise (unless `overwrite`); read-only, so every process can run it."""
        if overwrite or not self._has_previous_run():
            return
        fingerprint_file = self.path / FINGERPRINT_NAME
        if not fingerprint_file.exists():
            raise ValueError(
                f"`output_dir` {self.path} holds samples or a model without a record of what produced them ({FINGERPRINT_NAME}, "
                "written since vas_logits 0.2): use a new output_dir, or overwrite_output_dir=True to start over"
            )
        stored = json.loads(fingerprint_file.read_text())
        if isinstance(stored.get("tokenizer"), dict) and "ids" not in stored["tokenizer"]:  # before vas_logits 0.4
            fingerprint = dict(fingerprint, tokenizer={k: v for k, v in fingerprint["tokenizer"].items() if k != "ids"})
        differences = [f"{key}: stored {stored.get(key)!r}, now {value!r}"
                       for key, value in fingerprint.items() if stored.get(key) != value]
        if differences:
            raise ValueError(
                f"`output_dir` {self.path} holds samples made with other settings ("
                + "; ".join(differences)
                + "). Use a new output_dir, or overwrite_output_dir=True to delete them and start over"
            )

    def check_not_inside(self, user_file: str | os.PathLike) -> None:
        """Refuse a user's file that is one of the files fit() itself writes or deletes in this directory."""
        own = {self.samples, self.path / FINGERPRINT_NAME}
        if Path(user_file).resolve() in {path.resolve() for path in own}:
            raise ValueError(
                f"`samples` {str(user_file)!r} is a file fit() keeps for itself in `output_dir` {str(self.path)!r}, "
                "which it may rewrite or delete. Your file is left as it is: move it out of output_dir (or rename "
                "it), or pick another output_dir"
            )

    def prepare(self, fingerprint: dict[str, Any], overwrite: bool) -> None:
        """Make sure the directory is writable, start over if asked, and record the fingerprint (rank 0 only)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise ValueError(f"`output_dir` {self.path} is not writable: {error}") from error
        if overwrite:
            for folder in (self.checkpoint, self._partial, self._old, self.final):
                shutil.rmtree(folder, ignore_errors=True)
            scored = [file for pattern in SCORED_RECORDS for file in self.path.glob(pattern)]
            for file in (self.samples, self.path / FINGERPRINT_NAME, *scored):
                file.unlink(missing_ok=True)
            logger.info("overwrite_output_dir: removed the samples, their scores, checkpoints and model of %s",
                        self.path)
        (self.path / FINGERPRINT_NAME).write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")

    def _has_samples(self) -> bool:
        return self.samples.exists() and self.samples.stat().st_size > 0

    def _has_previous_run(self) -> bool:
        """Samples, a checkpoint or a final model of an earlier call (given samples leave no samples file)."""
        return (self._has_samples() or (self.checkpoint / COMPLETE_MARKER).exists()
                or (self._partial / COMPLETE_MARKER).exists() or (self.final / CONFIG_NAME).exists())

    # ------------------------------------------------------------------ checkpoints

    def write_checkpoint(self, write: Callable[[Path], None]) -> None:
        """`write(folder)` fills a fresh folder, which then replaces the checkpoint; `write` must write
        COMPLETE_MARKER last."""
        shutil.rmtree(self._partial, ignore_errors=True)  # left over from an interrupted write
        write(self._partial)
        shutil.rmtree(self._old, ignore_errors=True)
        if self.checkpoint.exists():
            self.checkpoint.rename(self._old)
        self._partial.rename(self.checkpoint)  # an interrupt before this: latest_checkpoint() finishes the swap
        shutil.rmtree(self._old, ignore_errors=True)

    def recover_checkpoint(self) -> None:
        """Finish or undo a checkpoint swap that an interrupt cut short (rank 0, before training)."""
        if (self._partial / COMPLETE_MARKER).exists():  # written in full, not swapped in yet: the newest
            shutil.rmtree(self._old, ignore_errors=True)
            if self.checkpoint.exists():
                self.checkpoint.rename(self._old)
            self._partial.rename(self.checkpoint)
            logger.info("Finished swapping in the checkpoint of an interrupted save in %s", self.path)
        elif not self.checkpoint.exists() and (self._old / COMPLETE_MARKER).exists():
            self._old.rename(self.checkpoint)
            logger.info("Restored the previous checkpoint of an interrupted save in %s", self.path)
        for leftover in (self._partial, self._old):
            shutil.rmtree(leftover, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        """The complete checkpoint to resume from, if any."""
        return self.checkpoint if (self.checkpoint / COMPLETE_MARKER).exists() else None

    def remove_checkpoints(self) -> None:
        for folder in (self.checkpoint, self._partial, self._old):
            shutil.rmtree(folder, ignore_errors=True)
