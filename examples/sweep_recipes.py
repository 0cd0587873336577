"""Which fit() recipe makes the best value model? Trains one recipe and measures VAS at equal KL against Best-of-N.

The experiment behind the defaults of fit() (README, "Finding the recipe"). Every recipe trains on the same
pool of base samples (SmolLM2-135M-Instruct, the 320 training movie openings × 8 samples of 24 tokens, VADER),
sampled once by the first run and copied into each recipe's folder, so recipes differ only in how they
train. Each is then measured like examples/bench_quality.py measures VAS (same 64 held-out openings, seeds,
4 samples each, T = 1, k = 10, outside_top_k="keep"): mean reward and measured KL for a sweep of beta, and the
gain ratio at equal KL, (VAS reward − base) / (Best-of-N reward − base) with Best-of-N interpolated at
VAS's KL from the Best-of-N rows of a bench_quality.py run (--reference, the same prompts and seeds).

    python examples/sweep_recipes.py --tag lam1 --lam 1.0
    python examples/sweep_recipes.py --tag dist --head distributional --lam 1.0
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from bench_quality import best_of_n_curve, gain_ratio, run_method
from common import (CACHE, EXAMPLES, NUM_TRAIN_PROMPTS, add_threads_option, held_out_prompts, load_smollm2, mean_and_se,
                    movie_prompts, use_threads, vader_reward)

from vas_logits import VAS, ValueModel, fit
from vas_logits.run_dir import FINGERPRINT_NAME, SAMPLES_NAME

POOL = CACHE / "recipes" / "pool"
POOL_SETTINGS = dict(samples_per_prompt=8, max_new_tokens=24, sampling_batch_size=64)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", required=True, help="name of this recipe's folder and result")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--head", default="scalar")
    parser.add_argument("--lam", type=float, default=0.95)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fit-options", type=json.loads, default={}, help="more fit() keyword arguments, as JSON")
    parser.add_argument("--betas", type=float, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--reference", type=Path, default=EXAMPLES / "results" / "quality.json",
                        help="a bench_quality.py result holding the Best-of-N rows")
    add_threads_option(parser)
    parser.add_argument("--output", type=Path, default=EXAMPLES / "results" / "recipes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    use_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_smollm2()
    train_prompts = movie_prompts()[:NUM_TRAIN_PROMPTS]

    def train(output_dir, value_model, epochs, **options):
        return fit(model, tokenizer, train_prompts, vader_reward, value_model, epochs=epochs,
                   output_dir=output_dir, reward_name="VADER compound sentiment", progress=False,
                   **POOL_SETTINGS, **options)

    if not (POOL / SAMPLES_NAME).exists():  # sample the pool once (about 8 minutes on 2 cores)
        train(POOL, ValueModel.from_backbone(model, num_layers=1), epochs=1)
    folder = CACHE / "recipes" / args.tag
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in (SAMPLES_NAME, FINGERPRINT_NAME):
        shutil.copy(POOL / name, folder / name)

    start = time.perf_counter()
    value_model = train(folder, ValueModel.from_backbone(model, num_layers=args.num_layers, **_head(args)),
                        args.epochs, lam=args.lam, learning_rate=args.learning_rate, batch_size=args.batch_size,
                        **args.fit_options)
    train_seconds = time.perf_counter() - start

    reference = json.loads(args.reference.read_text())
    curve = best_of_n_curve(reference)
    prompts = held_out_prompts()
    bench = argparse.Namespace(seed=1, batch_size=32, max_new_tokens=24)
    rows = []
    for beta in args.betas:
        run = run_method(model, tokenizer, prompts, 4, lambda: [VAS(value_model, beta=beta, outside_top_k="keep")],
                         bench)
        rewards = torch.tensor(vader_reward([p for p in prompts for _ in range(4)], run.completions))
        reward, se = mean_and_se(rewards.view(len(prompts), 4).mean(-1).tolist())
        kl = run.log_ratio.mean().item()
        rows.append(dict(beta=beta, reward=reward, reward_se=se, kl=kl, gain_ratio=gain_ratio(reward, kl, curve)))
        gain = "past Best-of-32's KL" if rows[-1]["gain_ratio"] is None else f"{rows[-1]['gain_ratio']:.2f}"
        print(f"{args.tag} beta={beta:g}: reward {reward:+.3f} ± {se:.3f}, KL {kl:.2f}, gain ratio {gain}", flush=True)
    result = dict(tag=args.tag, recipe=vars(args) | {"reference": str(args.reference), "output": str(args.output)},
                  train_seconds=train_seconds, config=value_model.config.to_dict() | {"backbone_config": None},
                  rows=rows)
    (args.output / f"{args.tag}.json").write_text(json.dumps(result, indent=1))


def _head(args) -> dict:
    return {} if args.head == "scalar" else {"head": args.head}


if __name__ == "__main__":
    main()
