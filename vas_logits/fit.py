"""fit(): train a value model on samples of a frozen base model with TD(lambda) (Han et al., arXiv 2405.06639).

    samples  = the base model's own completions of the prompts, each scored once by reward_fn: drawn with
               generate(), an offline vLLM engine or an API endpoint, or given as text with rewards (samplers.py)
    targets  = TD(lambda) returns from the value model's current predictions                    (targets.py)
    loss     = 0.5 · masked MSE over the states s_0 .. s_T of each completion; AdamW   (trainer.py)
    prefixes = the reward of every partial completion, exact labels for a second head phi of V = phi + u,
               added into the value head at the end                                       (prefix_rewards.py)
    candidates = with `PrefixRewards(candidates=k)`, the same for the base's top-k next tokens at every state
                                                                                       (candidate_rewards.py)
                 and, with their sampling probabilities, zero-mean control variates for u's returns (targets.py)

The base model is only sampled from: its weights, their requires_grad and its train/eval mode are as they
were when fit() returns. With `output_dir` nothing is lost: samples are appended as they are scored, a
checkpoint is written each epoch and on Ctrl-C, and calling fit() again resumes. Under `torchrun` or
`accelerate launch` each process samples its shard of the prompts and DDP all-reduces the gradients.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections.abc import Iterable

import torch
import torch.distributed as dist

from .candidate_rewards import distribution_changing_settings, score_candidates
from .fit_config import DEFAULT_PREFIX_REWARDS, FitConfig
from .lookahead import score_lookahead
from .prefix_rewards import PrefixRewards, score_prefixes
from .run_dir import (PREFIX_REWARDS_NAME, RunDirectory, candidates_file_name, lookahead_file_name, round_file_name,
                      sampling_fingerprint, siblings_file_name)
from .samplers import make_sampler
from .sampling import RewardFn, SampleStore
from .rollin import RollInSampler
from .siblings import SiblingSampler
from .text_samples import read_text_samples
from .trainer import Trainer
from .value_model import ValueModel

logger = logging.getLogger(__name__)

GIVEN_REWARDS = "given rewards"  # the value model's `reward` when trained on given samples
DEFAULT_NUM_LAYERS = 4  # a value model cut from the base's first layers: cheap to query every step
# Default AdamW learning rate = this / the value model's hidden size. Adam moves every weight by about lr per
# step, so a layer's output moves by about lr × fan-in: keeping that fixed across widths (as muP does) needs
# lr ∝ 1 / width. 0.09 gives 1.6e-4 for SmolLM2's 576 and 2.8e-3 for the 32-wide models of
# examples/bench_value_learning.py. 0.03 (5.2e-5 at 576) undertrained the yardstick's credit across time
# (0.45 of the exact gain against 0.75) and steered the main job no better at equal KL (README, "Measured").
LEARNING_RATE_TIMES_WIDTH = 0.09


def fit(
    base_model,
    tokenizer,
    prompts: Iterable[str] | None = None,
    reward_fn: RewardFn | None = None,
    value_model: ValueModel | None = None,
    *,
    samples=None,
    config: FitConfig | None = None,
    **options,
) -> ValueModel:
    """Train a value model for `reward_fn` on completions sampled from the frozen `base_model`.

    Args:
        base_model: A transformers causal LM (never modified); a `vllm.LLM` engine (offline vLLM: fast sampling,
            on several GPUs with tensor_parallel_size / data_parallel_size); a `CompletionsEndpoint`, to sample a
            model reachable only through an OpenAI-compatible API; or None with `samples`.
        tokenizer: The value model's tokenizer (for a local base model, the base's: they share it). Text from an
            endpoint or `samples` is tokenised with it.
        prompts: Prompt strings, as they are fed to the base model (apply a chat template beforehand): a list,
            a `datasets` column such as `dataset["prompt"]`, or any iterable of strings.
        reward_fn: `reward_fn(prompts, completions) -> list[float]`, called once per sampling batch.
        value_model: The model to train; default: the base's first 4 layers with a zero head (required when the
            base model is a vLLM engine, an endpoint or None).
        samples: Instead of `prompts` and `reward_fn`: samples of the base model generated elsewhere (vLLM, another
            engine), as records {"prompt", "completion", "reward", optional "finish_reason": "stop" | "length"}
            in a JSON-lines file, a `datasets.Dataset` or a list of dicts. They are tokenised with `tokenizer`
            (text_samples.py); a "stop" completion (the default) ended with EOS.
        config: How to sample and train (`FitConfig`: samples_per_prompt, max_new_tokens, epochs, learning_rate,
            output_dir, rollouts, prefix_rewards, ...; each field is documented there). Default: FitConfig().
        **options: FitConfig fields as keywords, e.g. `epochs=5, output_dir="runs/sentiment"`; they replace the
            values of `config`.

    Returns:
        The trained ValueModel (eval mode), with `base_model`, `reward` and `pad_token_id` filled in.
    """
    config = FitConfig.resolve(config, options)
    prompts, records = _prompts_or_records(base_model, prompts, reward_fn, samples)
    _check_prompts(prompts)
    rollouts = config.rollouts
    siblings, top_k, rounds, rollin_beta = rollouts.siblings, rollouts.top_k, rollouts.rounds, rollouts.rollin_beta
    rank, world_size = _setup_distributed()
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampler = make_sampler(base_model, tokenizer, reward_fn, records, seed=config.seed,
                           samples_per_prompt=config.samples_per_prompt, max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
                           prompts_per_batch=config.prompts_per_batch,
                           pad_token_id=pad_token_id, generation_kwargs=config.generation_kwargs)
    local = sampler.local_model is not None
    if siblings and not local:
        raise ValueError(f"`siblings={siblings}` needs a local transformers base model to roll out from (it reads the "
                         f"base's top-k at sampled states); got {type(base_model).__name__}: pass Rollouts(siblings=0)")
    if rounds > 1 and not local:
        raise ValueError(f"`rounds={rounds}` needs a local transformers base model to roll in and out with; got "
                         f"{type(base_model).__name__}: pass Rollouts(rounds=1)")
    if value_model is None:
        if not local:
            raise ValueError(
                "Without a local base model there is no default value model: pass `value_model=ValueModel."
                "from_backbone(<a small causal LM that uses `tokenizer`>, num_layers=4)`"
            )
        num_layers = min(DEFAULT_NUM_LAYERS, base_model.config.get_text_config().num_hidden_layers)
        value_model = ValueModel.from_backbone(base_model, num_layers=num_layers)
    _check_vocabulary(value_model, sampler.vocab_size, tokenizer)
    if records is None and value_model.max_positions is not None:  # fail before sampling, not after it
        for index, prompt in enumerate(prompts):
            length = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
            value_model.check_length(length + config.max_new_tokens,
                                     f"Prompt {index} ({length} tokens) + max_new_tokens ({config.max_new_tokens})")
    learning_rate = config.learning_rate or \
        LEARNING_RATE_TIMES_WIDTH / value_model.backbone_config.get_text_config().hidden_size
    if value_model.distributional and config.gamma != 1:
        raise ValueError(
            f"`gamma` must be 1 for a distributional value model (atoms are not discounted), got {config.gamma!r}"
        )
    if local:
        value_model.to(base_model.device)
    base_description = sampler.description
    base_name = getattr(base_model.config, "_name_or_path", None) if local else base_description.get("name")
    value_model.config.base_model = base_name or value_model.config.base_model
    value_model.config.reward = config.reward_name or _reward_label(reward_fn)
    value_model.config.pad_token_id = pad_token_id

    run = RunDirectory(config.output_dir) if config.output_dir is not None else None
    if run is not None:  # before any sampling: a wrong or unwritable output_dir fails now, not in an hour
        if isinstance(samples, (str, os.PathLike)):
            run.check_not_inside(samples)  # the user's own file is never fit()'s to rewrite or delete
        fingerprint = sampling_fingerprint(
            base_description, tokenizer, prompts,
            config.reward_name or _reward_label(reward_fn, qualified=True),
            samples_per_prompt=config.samples_per_prompt, max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            generation_kwargs=config.generation_kwargs or {})
        run.check(fingerprint, config.overwrite_output_dir)
        if rank == 0:
            run.prepare(fingerprint, config.overwrite_output_dir)
            run.recover_checkpoint()
        if world_size > 1:
            dist.barrier()

    indexed = list(enumerate(prompts))
    random.Random(config.seed).shuffle(indexed)
    num_eval = int(len(indexed) * config.eval_fraction) if len(indexed) >= 10 else 0
    eval_indices = {index for index, _ in indexed[:num_eval]}

    prefix_rewards = _applicable(config.prefix_rewards, value_model, reward_fn, base_model if local else None)
    settings = {**rollouts.settings(), **(prefix_rewards.settings() if prefix_rewards else {})}
    trainer = Trainer(value_model, learning_rate, config.max_grad_norm, config.gamma, config.lam, pad_token_id, rank,
                      world_size, run, config.progress, config.keep_best, extra_settings=settings,
                      prefix_rewards=prefix_rewards)
    trainer.check_step()  # a value model that cannot train (or a transformers release that breaks it) fails now

    # Given samples are re-read from the user's own records at every call (tokenising is quick), never copied
    # into output_dir, so no half-written copy can be trained on.
    store = SampleStore(run.samples if run and records is None else None)
    samples = _collect_samples(sampler, indexed, store, rank, world_size, config.seed,
                               None if records else config.samples_per_prompt, config.progress)

    # the candidates' sampling probabilities are exact only for plain sampling at a temperature
    candidate_temperature = None
    if prefix_rewards is not None and prefix_rewards.candidates:
        changes = {**distribution_changing_settings(getattr(base_model, "generation_config", None)),
                   **(config.generation_kwargs or {})}
        candidate_temperature = None if changes else config.temperature
        if changes and prefix_rewards.lookahead:
            logger.info("No lookahead labels: %s change the base's sampling distribution, so p(b | x) is not "
                        "known", ", ".join(f"{k}={v!r}" for k, v in changes.items()))
        if changes and prefix_rewards.control_variates:
            logger.info("No control variates: %s change the base's sampling distribution, so the candidates' "
                        "sampling probabilities are not known", ", ".join(f"{k}={v!r}" for k, v in changes.items()))

    def with_prefix_rewards(new_samples):  # the same on every process: rank 0 scores and stores, then shares
        if prefix_rewards is None:
            return new_samples
        def score():
            prompt_texts = dict(indexed)
            scored = score_prefixes(tokenizer, new_samples, prompt_texts, reward_fn,
                                    run.path / PREFIX_REWARDS_NAME if run else None, progress=config.progress)
            if not prefix_rewards.candidates:
                return scored
            scored = score_candidates(base_model, tokenizer, scored, prompt_texts, reward_fn,
                                      prefix_rewards.candidates,
                                      run.path / candidates_file_name(prefix_rewards.candidates) if run else None,
                                      pad_token_id, candidate_temperature, progress=config.progress)
            if not prefix_rewards.lookahead or candidate_temperature is None:
                return scored
            return score_lookahead(base_model, tokenizer, scored, prompt_texts, reward_fn, config.max_new_tokens,
                                   run.path / lookahead_file_name(prefix_rewards.candidates) if run else None,
                                   pad_token_id, candidate_temperature, progress=config.progress)

        return _on_rank_zero(score, rank, world_size)

    samples = with_prefix_rewards(samples)
    train_samples = [sample for sample in samples if sample.prompt_index not in eval_indices]
    eval_samples = [sample for sample in samples if sample.prompt_index in eval_indices]
    rewards = torch.tensor([sample.reward for sample in samples])
    logger.info("%d samples (%d held out); reward mean %.4f, std %.4f", len(samples), len(eval_samples),
                rewards.mean(), rewards.std() if len(rewards) > 1 else 0.0)
    if config.standardize_rewards and not bool(value_model.head.weight.any()):  # a fresh head: set its units now
        _standardize(value_model, torch.tensor([sample.reward for sample in train_samples]))
    for sample in samples:  # given samples (or stored ones) past a GPT-2-like position table; they stay stored
        value_model.check_length(len(sample.prompt_ids) + len(sample.completion_ids),
                                 f"A sample of prompt {sample.prompt_index} (prompt + completion)")
    training_prompts = [item for item in indexed if item[0] not in eval_indices]
    rollout_options = dict(top_k=top_k, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                           pad_token_id=pad_token_id, generate_batch_size=config.sampling_batch_size,
                           prompts_per_batch=config.prompts_per_batch,
                           generation_kwargs=config.generation_kwargs)
    if siblings:  # rollouts of the training prompts only: the held-out error stays on the base's own samples
        sibling_sampler = SiblingSampler(base_model, tokenizer, reward_fn, train_samples, siblings=siblings,
                                         seed=config.seed, **rollout_options)
        sibling_store = SampleStore(run.path / siblings_file_name(siblings, top_k) if run else None)
        sibling_rollouts = _collect_samples(sibling_sampler, training_prompts, sibling_store, rank, world_size,
                                            config.seed, None, config.progress)
        logger.info("%d sibling rollouts (%d per sample)", len(sibling_rollouts), siblings)
        train_samples = train_samples + with_prefix_rewards(sibling_rollouts)
    for round_index in range(1, rounds + 1):
        if round_index > 1:  # roll in with VAS under the value model so far, roll out with the base
            round_sampler = RollInSampler(base_model, tokenizer, reward_fn, value_model, beta=rollin_beta,
                                          siblings=siblings, samples_per_prompt=config.samples_per_prompt,
                                          seed=config.seed + 1000 * round_index, **rollout_options)
            round_store = SampleStore(run.path / round_file_name(round_index, max(1, siblings), top_k, rollin_beta)
                                      if run else None)
            with trainer.merged():  # roll in with V = phi + u
                round_rollouts = _collect_samples(round_sampler, training_prompts, round_store, rank, world_size,
                                                  config.seed + 1000 * round_index, None, config.progress)
            round_rollouts = with_prefix_rewards(round_rollouts)
            logger.info("Round %d: %d rollouts from VAS roll-ins (beta %g)", round_index, len(round_rollouts),
                        rollin_beta)
            train_samples = train_samples + round_rollouts
        if value_model.distributional:
            _check_atoms_cover(value_model, train_samples)
        trainer.train(train_samples, eval_samples, config.epochs * round_index, config.batch_size, config.seed,
                      final=round_index == rounds, first_epoch=config.epochs * (round_index - 1))
    value_model.eval()
    if run is not None and rank == 0:
        value_model.save_pretrained(run.final)
        if not config.keep_checkpoint:
            run.remove_checkpoints()
        logger.info("Saved the value model to %s", run.final)
    return value_model


def _applicable(prefix_rewards: PrefixRewards | None, value_model: ValueModel, reward_fn,
                local_model) -> PrefixRewards | None:
    """The prefix rewards to use: the default where they apply, an explicit request or a clear error."""
    if prefix_rewards is None:
        return None
    why = ("the value model's head is 'distributional' (prefix rewards train a second head added into a scalar or "
           "token head)" if value_model.distributional else
           "given samples carry no reward_fn to score partial completions with" if reward_fn is None else None)
    default = prefix_rewards is DEFAULT_PREFIX_REWARDS
    if why is not None:
        if default:
            logger.info("Not scoring prefixes: %s", why)
            return None
        raise ValueError(f"`prefix_rewards` cannot be used here: {why}; pass prefix_rewards=None")
    if prefix_rewards.candidates and local_model is None:  # the base's top-k needs its logits
        if default:
            logger.info("Not scoring candidates: they need a local transformers base model")
            return dataclasses.replace(prefix_rewards, candidates=0)
        raise ValueError(f"`prefix_rewards.candidates={prefix_rewards.candidates}` needs a local transformers base "
                         f"model (it reads the base's top-k at every state): pass candidates=0")
    vocab_size = value_model.backbone_config.vocab_size
    if prefix_rewards.candidates > vocab_size:
        raise ValueError(f"`prefix_rewards.candidates={prefix_rewards.candidates}` exceeds the vocabulary "
                         f"({vocab_size} tokens)")
    return prefix_rewards


def _on_rank_zero(function, rank: int, world_size: int):
    """function() on rank 0 (which writes output_dir), its result broadcast to every process."""
    result = [function() if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


def _standardize(value_model: ValueModel, rewards: torch.Tensor) -> None:
    """Record the training rewards' mean and std in the config (the value model predicts (R − mean) / std); a
    distributional head's atoms span the standardised rewards seen."""
    mean = rewards.double().mean().item()
    std = rewards.double().std().item() if len(rewards) > 1 else 0.0
    if not std > 0:
        logger.warning("Every training reward is %.4g: not standardising", mean)
        return
    value_model.config.reward_mean, value_model.config.reward_std = mean, std
    if value_model.distributional:
        low, high = ((rewards.min().item() - mean) / std, (rewards.max().item() - mean) / std)
        value_model.set_value_range(low, high)
    logger.info("Standardised rewards: V predicts (R - %.4g) / %.4g", mean, std)


def _check_atoms_cover(value_model: ValueModel, samples) -> None:
    """A distributional head can only predict rewards within its atoms: refuse samples outside them (their
    targets would be clipped to the end atoms without a word). The samples stay stored for the next call."""
    mean, std = value_model.config.reward_mean or 0.0, value_model.config.reward_std or 1.0
    low, high = value_model.config.value_range
    outside = [sample for sample in samples if not low - 1e-6 <= (sample.reward - mean) / std <= high + 1e-6]
    if outside:
        first = outside[0]
        raise ValueError(
            f"{len(outside)} samples have rewards outside the distributional head's atoms ({low:g}..{high:g}"
            f"{'' if std == 1.0 and mean == 0.0 else f' in units of ({mean:.4g}, {std:.4g})'}), e.g. reward "
            f"{first.reward!r} of prompt {first.prompt_index}: pass standardize_rewards=True to a fresh value model, "
            f"or widen the atoms first with value_model.set_value_range(low, high)"
        )


def _prompts_or_records(base_model, prompts, reward_fn, samples) -> tuple[list[str], list[dict] | None]:
    """The prompts, and the text samples' records when `samples` are given instead of sampling."""
    if isinstance(base_model, (str, os.PathLike)):
        raise ValueError(f"`base_model` must be a loaded causal LM, a vllm.LLM or a CompletionsEndpoint, got the "
                         f"string {str(base_model)!r}: load it first, or wrap an API URL in CompletionsEndpoint(url)")
    if samples is not None:
        if prompts is not None or reward_fn is not None:
            raise ValueError("Pass either `samples` (which carry their rewards) or `prompts` and `reward_fn`, not both")
        records = read_text_samples(samples)
        return list(dict.fromkeys(record["prompt"] for record in records)), records
    if base_model is None:
        raise ValueError("`base_model` is None: pass a causal LM, a vllm.LLM, a CompletionsEndpoint, or `samples`")
    if not callable(reward_fn):
        raise ValueError(f"`reward_fn` must be a callable reward_fn(prompts, completions) -> floats, got {reward_fn!r}")
    return _as_prompt_list(prompts), None


def _as_prompt_list(prompts) -> list[str]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
        raise ValueError(f"`prompts` must be a list (or any iterable) of strings, got {prompts!r:.80}")
    return list(prompts)


def _reward_label(reward_fn, qualified: bool = False) -> str:
    """What trained the value model: the reward function's name, or GIVEN_REWARDS for given samples."""
    return GIVEN_REWARDS if reward_fn is None else _callable_name(reward_fn, qualified)


def _callable_name(function, qualified: bool = False) -> str:
    """A reward function's name: `module.qualname` when `qualified` (for the fingerprint), else its qualname."""
    target = function if hasattr(function, "__qualname__") else type(function)
    name = getattr(target, "__qualname__", None) or repr(function)
    return f"{getattr(target, '__module__', '')}.{name}" if qualified else name


def _check_prompts(prompts) -> None:
    if len(prompts) == 0:
        raise ValueError("`prompts` must hold at least one prompt, got an empty list")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            hint = " (a datasets.Dataset yields rows: pass one column, e.g. dataset['prompt'])" \
                if isinstance(prompt, dict) else ""
            raise ValueError(f"`prompts[{index}]` must be a non-empty string, got {prompt!r:.80}{hint}")


def _check_vocabulary(value_model: ValueModel, base_vocab: int | None, tokenizer) -> None:
    value_vocab = value_model.backbone_config.vocab_size
    if base_vocab is None:  # an endpoint or given samples: only the value model's tokenizer matters
        if len(tokenizer) > value_vocab:
            raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the value model's vocabulary only "
                             f"{value_vocab}: pass the value model's own tokenizer")
        return
    if value_vocab != base_vocab or len(tokenizer) > value_vocab:
        raise ValueError(
            f"The value model's vocabulary ({value_vocab}) must match the base model's ({base_vocab}) and cover "
            f"the tokenizer's ({len(tokenizer)}): they must share one tokenizer"
        )


def _setup_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group that torchrun / accelerate launch describe in the env."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collect_samples(sampler, indexed, store, rank, world_size, seed, samples_per_prompt, progress):
    """Stored samples plus new ones for the prompts not sampled yet; every process gets all of them."""
    stored = store.load(samples_per_prompt) if rank == 0 else []
    if world_size > 1:
        shared = [stored]
        dist.broadcast_object_list(shared, src=0)
        stored = shared[0]
    done = {sample.prompt_index for sample in stored}
    missing = [item for item in sorted(indexed) if item[0] not in done]
    if stored:
        logger.info("Reusing %d stored samples; sampling %d more prompts", len(stored), len(missing))
    # Each process samples its shard; only rank 0 writes, after gathering.
    torch.manual_seed(seed * 1000 + rank + len(done))
    shard_store = store if world_size == 1 else SampleStore(None)
    new = sampler(missing[rank::world_size], shard_store, progress and rank == 0)
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, new)
        new = [sample for part in gathered for sample in part]
        if rank == 0:
            store.append(new)
    return stored + new
