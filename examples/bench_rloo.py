"""An online PPO-family baseline (TRL's RLOOTrainer) with the true reward, measured like bench_quality.py's methods.

TRL 1.x no longer ships PPOTrainer; RLOO (REINFORCE leave-one-out, Ahmadian et al. 2024) is its PPO-family
online trainer: it samples `--generations` completions of each training opening from the current policy,
scores them with the reward (VADER compound, the benchmark's own reward, so RLOO sees the true reward
online), uses the others' mean as each sample's baseline, and penalises the KL to the frozen base with
coefficient `--kl-coef` (TRL's `beta`). SmolLM2-135M-Instruct is fine-tuned in full (float32) on the same
320 training openings as the value model, 24-token completions at T=1.

One run, checkpointed every `--eval-every` optimizer steps; every checkpoint samples 4 completions of each of
the 64 held-out openings (seed 1) and its KL is measured as VAS's: the mean over samples of
sum_t [log pi(a_t|s_t) - log pi_ref(a_t|s_t)] over the generated tokens. So one run gives a reward-vs-KL
curve. Sample budget: every checkpoint's row states how many completions (and reward calls) RLOO had drawn
by then; VAS's value model was trained on 1,280 (320 × 4) base samples.

Writes rloo.json (rows in bench_quality's Result format, training cost in `extra`); bench_blockwise.py
draws them on the headline chart. A rerun skips the checkpoints already measured and the training already done.

    pip install trl
    python examples/bench_rloo.py        # ~25 min on 2 CPU cores (training), ~1 min per checkpoint
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from bench_dpo import sample_and_measure
from bench_quality import Result, matmul_parameters
from common import (CACHE, EXAMPLES, NUM_TRAIN_PROMPTS, add_threads_option, held_out_prompts, load_smollm2, mean_and_se,
                    movie_prompts, use_threads, vader_reward)


def vader(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """TRL reward function: the benchmark's reward of each completion."""
    return vader_reward(prompts, completions)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kl-coef", type=float, default=0.05, help="TRL's beta: the KL penalty per nat")
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--generations", type=int, default=4, help="completions per opening per step")
    parser.add_argument("--train-batch-size", type=int, default=16, help="completions per optimizer step")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=CACHE / "bench_rloo")
    parser.add_argument("--output", type=Path, default=EXAMPLES / "results")
    add_threads_option(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    use_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    reference, tokenizer = load_smollm2()
    setting = f"kl {args.kl_coef:g}, lr {args.learning_rate:g}"
    folder = args.cache / f"kl{args.kl_coef:g}-lr{args.learning_rate:g}-g{args.generations}-b{args.train_batch_size}"
    checkpoints = [folder / f"step{step}" for step in range(args.eval_every, args.steps + 1, args.eval_every)]

    if not all((c / "cost.json").exists() for c in checkpoints):
        started = time.perf_counter()

        class SaveEvery(TrainerCallback):
            """Saves the policy (and the cost so far) at every --eval-every steps, for the curve."""

            def on_step_end(self, train_args, state, control, model=None, **kwargs):
                if state.global_step % args.eval_every == 0:
                    target = folder / f"step{state.global_step}"
                    model.save_pretrained(target)
                    (target / "cost.json").write_text(json.dumps({
                        "seconds": time.perf_counter() - started, "steps": state.global_step,
                        "completions": state.global_step * args.train_batch_size}))

        # Training from scratch each time keeps the run simple; a partial run's checkpoints are kept.
        policy = AutoModelForCausalLM.from_pretrained(CACHE / "smollm2-135m-instruct", dtype=torch.float32)
        train = Dataset.from_list([{"prompt": p} for p in movie_prompts()[:NUM_TRAIN_PROMPTS]])
        config = RLOOConfig(
            output_dir=str(folder / "run"), beta=args.kl_coef, learning_rate=args.learning_rate,
            num_generations=args.generations, per_device_train_batch_size=args.train_batch_size,
            max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, max_steps=args.steps,
            logging_steps=10, save_strategy="no", report_to=[], seed=args.seed,
            use_cpu=not torch.cuda.is_available())
        trainer = RLOOTrainer(policy, reward_funcs=vader, args=config, train_dataset=train,
                              processing_class=tokenizer, callbacks=[SaveEvery()])
        trainer.train()

    results_path = args.output / "rloo.json"
    results = [Result(**row) for row in json.loads(results_path.read_text())] if results_path.exists() else []
    prompts = held_out_prompts()[: args.prompts]
    for checkpoint in checkpoints:
        cost = json.loads((checkpoint / "cost.json").read_text())
        row_setting = f"{setting}, step {cost['steps']}"
        if any(r.setting == row_setting for r in results):
            print(f"RLOO {row_setting}: already in {results_path}")
            continue
        policy = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        texts, log_ratios = sample_and_measure(policy, reference, tokenizer, prompts, args.samples_per_prompt, args)
        rewards = torch.tensor(vader_reward([p for p in prompts for _ in range(args.samples_per_prompt)], texts))
        reward, se = mean_and_se(rewards.view(len(prompts), -1).mean(-1).tolist())
        kl = log_ratios.mean().item()
        results.append(Result("RLOO", row_setting, reward, se, kl, 1.0, 1.0, 1.0, extra=dict(
            train_seconds=cost["seconds"], train_steps=cost["steps"], completions=cost["completions"],
            reward_calls=cost["completions"], trainable_parameters=sum(p.numel() for p in policy.parameters()),
            matmul_parameters=matmul_parameters(policy), kl_coef=args.kl_coef, learning_rate=args.learning_rate,
            generations=args.generations, kl_se=(log_ratios.std() / len(log_ratios) ** 0.5).item())))
        print(f"RLOO {row_setting}: reward {reward:+.3f} ± {se:.3f}, KL {kl:.2f} (trained {cost['seconds']:.0f} s, "
              f"{cost['completions']} completions)", flush=True)
        args.output.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(f"Wrote {results_path}")


if __name__ == "__main__":
    main()
