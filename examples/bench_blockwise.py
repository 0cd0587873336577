"""Blockwise value-guided sampling against Best-of-N up to N=128 and token-level VAS, on bench_quality.py's task.

The same 64 held-out movie openings, 24 new tokens, T=1, VADER compound, the scalar value model of
examples/sentiment.py. Methods:

    Best-of-N    N = 1 .. 128 from 128 base samples per prompt (the unbiased estimator of bench_quality.py);
                 KL = log N - (N-1)/N.
    blockwise    BlockwiseSampler(value_model, B, M, beta): at each block boundary M base candidates of B
                 tokens, one kept by softmax(beta V) (beta = inf: the best). KL is the chain-rule bound
                 (BlockwiseSampler.kl_upper_bound) over each completion's blocks, so its points sit at or
                 right of their true KL: the gain ratio is conservative.
    VAS, DPO,    token-level VAS rows read from bench_quality.py's quality.json, DPO rows from bench_dpo.py's
    RLOO         dpo.json and RLOO rows from bench_rloo.py's rloo.json (the same prompts, reward and KL
                 estimator), their gain ratio recomputed against the 128-sample Best-of-N curve.

Cost relative to base sampling: matmul FLOPs (base + value model forward tokens) and measured wall time.
Every method's samples are cached as JSON lines under --cache (one line per generate() batch), so an
interrupted run resumes where it stopped and a rerun only rescores.

    python examples/sentiment.py            # the value model (cached)
    python examples/bench_blockwise.py      # ~40 min on 2 CPU cores, most of it Best-of-128's base samples
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
from bench_quality import Result, best_of_n, best_of_n_curve, gain_ratio, matmul_parameters, write_results
from common import (CACHE, EXAMPLES, add_threads_option, held_out_prompts, load_smollm2, mean_and_se, pad_token_id,
                    use_threads, vader_reward)
from tqdm.auto import tqdm

from vas_logits import BlockwiseSampler, ValueModel


def cached_generate(path: Path, model, tokenizer, prompts: list[str], per_prompt: int, generate_kwargs: dict,
                    args, desc: str) -> tuple[list[str], list[int], float]:
    """`per_prompt` completions of every prompt: (texts, generated token counts incl. EOS, seconds), prompt-major.

    Batches already in `path` (one JSON line each, with the seconds they took) are reused; the rest are
    sampled, each seeded by its index, and appended as they finish."""
    rows = [prompt for prompt in prompts for _ in range(per_prompt)]
    starts = list(range(0, len(rows), args.batch_size))
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = {entry["start"]: entry for entry in done if entry.get("end") == min(entry["start"] + args.batch_size,
                                                                               len(rows))}
    path.parent.mkdir(parents=True, exist_ok=True)
    for start in tqdm([s for s in starts if s not in done], desc=desc, unit="batch"):
        batch = tokenizer(rows[start : start + args.batch_size], return_tensors="pt", padding=True)
        torch.manual_seed(args.seed * 1_000_003 + start)
        began = time.perf_counter()
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=args.max_new_tokens, pad_token_id=pad_token_id(tokenizer),
                             **generate_kwargs)
        seconds = time.perf_counter() - began
        new = out[:, batch["input_ids"].shape[1]:]
        is_eos = new == tokenizer.eos_token_id
        lengths = ((is_eos.cumsum(-1) - is_eos.long()) == 0).sum(-1)  # tokens up to and including the first EOS
        entry = dict(start=start, end=start + len(new), seconds=seconds, lengths=lengths.tolist(),
                     texts=tokenizer.batch_decode(new, skip_special_tokens=True))
        with path.open("a") as file:
            file.write(json.dumps(entry) + "\n")
        done[start] = entry
    entries = [done[start] for start in starts]
    return ([t for e in entries for t in e["texts"]], [n for e in entries for n in e["lengths"]],
            sum(e["seconds"] for e in entries))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--value-model", type=Path, default=CACHE / "sentiment-4layers" / "value_model")
    parser.add_argument("--best-of", type=int, default=128, help="base samples per prompt")
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--settings", nargs="+", default=["8x2", "4x2", "8x4", "12x4", "4x4", "8x8", "8x4@4"],
                        metavar="BxM[@beta]", help="block size x candidates, optional finite beta (default inf)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32, help="prompt rows per generate() call")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quality-json", type=Path, default=EXAMPLES / "results" / "quality.json",
                        help="bench_quality.py's results, whose token-level VAS rows join the table")
    parser.add_argument("--dpo-json", type=Path, default=EXAMPLES / "results" / "dpo.json",
                        help="bench_dpo.py's results (DPO fine-tuned on VAS's samples), which join the table too")
    parser.add_argument("--rloo-json", type=Path, default=EXAMPLES / "results" / "rloo.json",
                        help="bench_rloo.py's results (TRL RLOO with the true reward, online), which join the table")
    parser.add_argument("--cache", type=Path, default=CACHE / "bench_blockwise")
    parser.add_argument("--output", type=Path, default=EXAMPLES / "results")
    add_threads_option(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    use_threads(args.threads)
    if not (args.value_model / "model.safetensors").exists():
        raise SystemExit(f"No value model at {args.value_model}: run examples/sentiment.py first")
    value_model = ValueModel.from_pretrained(args.value_model).eval()
    model, tokenizer = load_smollm2()
    prompts = held_out_prompts()[: args.prompts]
    base_params, value_params = matmul_parameters(model), matmul_parameters(value_model)
    prompt_tokens = sum(len(ids) for ids in tokenizer(prompts)["input_ids"]) / len(prompts)

    def rewards_of(texts, per_prompt):
        rows = [p for p in prompts for _ in range(per_prompt)]
        return torch.tensor(vader_reward(rows, texts)).view(len(prompts), per_prompt)

    tag = f"p{args.prompts}-t{args.max_new_tokens}-s{args.seed}"
    texts, lengths, seconds = cached_generate(args.cache / f"base-{args.best_of}-{tag}.jsonl", model, tokenizer,
                                              prompts, args.best_of, {}, args, f"base samples ({args.best_of}/prompt)")
    base_rewards = rewards_of(texts, args.best_of)
    unit_seconds = seconds / args.best_of  # one base sample per prompt: the cost unit
    unit_tokens = prompt_tokens + sum(lengths) / len(lengths)
    results, n = [], 1
    while n <= args.best_of:
        reward, se = mean_and_se(best_of_n(base_rewards, n).tolist())
        results.append(Result("Best-of-N", f"N={n}", reward, se, math.log(n) - (n - 1) / n, n, n, n,
                              kl_kind="formula"))
        n *= 2
    curve = best_of_n_curve(results)
    print(f"base {base_rewards.mean():+.3f}; Best-of-{args.best_of} {results[-1].reward:+.3f}; "
          f"{unit_seconds:.1f} s per base sample per prompt")

    for setting in args.settings:
        shape, _, beta = setting.partition("@")
        block_size, num_candidates = (int(x) for x in shape.split("x"))
        beta = float(beta) if beta else math.inf
        sampler = BlockwiseSampler(value_model, block_size, num_candidates, beta)
        label = f"B={block_size} M={num_candidates} β={'∞' if math.isinf(beta) else f'{beta:g}'}"
        texts, lengths, seconds = cached_generate(
            args.cache / f"blockwise-{block_size}x{num_candidates}@{beta:g}-{tag}.jsonl", model, tokenizer, prompts,
            args.samples_per_prompt, {"custom_generate": sampler}, args, f"blockwise {label}")
        rewards = rewards_of(texts, args.samples_per_prompt)
        reward, se = mean_and_se(rewards.mean(-1).tolist())
        blocks = torch.tensor([math.ceil(length / block_size) for length in lengths], dtype=torch.float64)
        kl = float(sampler.kl_upper_bound(blocks).mean())
        generated = sum(lengths) / len(lengths)
        # forward tokens: the prompt once, then M candidates' tokens per generated token, in both models
        forward = prompt_tokens + num_candidates * generated
        compute = forward * (base_params + value_params) / (unit_tokens * base_params)
        wall = seconds / args.samples_per_prompt / unit_seconds
        results.append(Result("blockwise", label, reward, se, kl, forward / unit_tokens, compute, wall,
                              kl_kind="formula", gain_ratio=gain_ratio(reward, kl, curve)))
        gain = results[-1].gain_ratio
        print(f"blockwise {label}: reward {reward:+.3f} ± {se:.3f}, KL ≤ {kl:.2f}, compute {compute:.1f}×, "
              f"wall {wall:.1f}×" + ("" if gain is None else f", gain ratio {gain:.2f}"), flush=True)

    # token-level VAS (bench_quality.py), DPO (bench_dpo.py) and RLOO (bench_rloo.py), re-rated on this curve
    for path, wanted in ((args.quality_json, "VAS scalar"), (args.dpo_json, "DPO"), (args.rloo_json, "RLOO")):
        for row in json.loads(path.read_text()) if path.exists() else []:
            if row["method"].startswith(wanted) and "only" not in row["method"]:
                row["gain_ratio"] = gain_ratio(row["reward"], row["kl"], curve)
                results.append(Result(**row))

    title = (f"SmolLM2-135M-Instruct + VADER, {len(prompts)} held-out movie openings, {args.max_new_tokens} "
             f"tokens, T=1; value model {value_params / 1e6:.0f}M matmul params; blockwise KL: upper bound")
    write_results(results, args.output, "blockwise", title)


if __name__ == "__main__":
    main()
