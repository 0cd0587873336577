"""How alike do value models steer? Correlations of their within-state contrasts, and with the exact reward.

VAS moves probability between a state's top-k candidates by beta · (Q(s, a) − mean_K Q), so what matters of a
value model is its contrast between candidates of one state. An ensemble (the mean of several value models'
standardised Q) can only steer better than its members where they err in different places. This script measures
that, with no rollouts (seconds per value model on 2 CPU cores):

    states        bench_future_part.py's: a held-out opening plus t ~ U{0 .. --max-prefix} base-sampled tokens
    candidates    the base's top-k next tokens a, with weights w_a = p(a | s) renormalised over them
    scores        r(s∘a), the exact VADER reward of the text so far (what ARGS-style decoding tilts by), and each
                  value model's Q(s, a), and the mean of each --ensembles group (in reward units)
    statistic     the pooled correlation over states of the w-weighted within-state contrasts of two scores

    python examples/value_agreement.py --value-models a=PATH b=PATH --ensembles a+b

Writes NAME.md / NAME.json to --output.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch
from bench_future_part import held_out_states, top_candidates, value_scores, within_state_covariances
from common import EXAMPLES, add_threads_option, use_threads
from tqdm.auto import tqdm

from vas_logits import ValueModel


def contrast_correlations(states: list[dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Pooled correlations of w-weighted within-state contrasts between every two scores.

    Args:
        states: one dict per state: "w", the candidates' weights (k,), and each score's (k,) values.
    """
    names = [name for name in states[0] if name != "w"]
    covariance = {}
    for state in states:
        scores = {name: torch.tensor(state[name], dtype=torch.float64) for name in names}
        for (a, b), value in within_state_covariances(torch.tensor(state["w"]), scores).items():
            covariance[a, b] = covariance[b, a] = covariance.get((a, b), 0.0) + value
    return {a: {b: covariance[a, b] / math.sqrt(covariance[a, a] * covariance[b, b])
                if covariance[a, a] > 0 and covariance[b, b] > 0 else math.nan for b in names} for a in names}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--value-models", nargs="+", metavar="NAME=PATH", required=True)
    parser.add_argument("--ensembles", nargs="*", default=[], metavar="NAME+NAME",
                        help="groups of --value-models names whose mean Q is scored too")
    parser.add_argument("--states", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=20, help="candidates per state (bench_quality.py's k)")
    parser.add_argument("--max-prefix", type=int, default=12, help="states take t ~ U{0 .. this} base tokens")
    parser.add_argument("--seed", type=int, default=7)
    add_threads_option(parser)
    parser.add_argument("--output", type=Path, default=EXAMPLES / "results")
    parser.add_argument("--name", default="value_agreement")
    args = parser.parse_args()
    for name in ("states", "top_k"):  # a contrast needs two candidates; a correlation, two states
        if getattr(args, name) < 2:
            parser.error(f"--{name.replace('_', '-')} must be at least 2, got {getattr(args, name)}")
    if args.max_prefix < 0:
        parser.error(f"--max-prefix must be >= 0, got {args.max_prefix}")
    value_models, paths = {}, {}
    for entry in args.value_models:
        name, _, path = entry.partition("=")
        if not name or not (Path(path) / "model.safetensors").exists():
            parser.error(f"--value-models: no value model at {entry!r} (NAME=PATH)")
        if name in paths:
            parser.error(f"--value-models: the name {name!r} is given twice ({paths[name]!r}, {path!r})")
        paths[name] = path
        value_models[name] = ValueModel.from_pretrained(path).eval()
    ensembles = {group: group.split("+") for group in args.ensembles}
    for group, members in ensembles.items():
        if unknown := [member for member in members if member not in value_models]:
            parser.error(f"--ensembles {group!r}: {unknown} are not among --value-models {list(value_models)}")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    use_threads(args.threads)
    model, tokenizer, states = held_out_states(args.states, args.max_prefix, args.seed)

    scored = []
    for state in tqdm(states, desc="scoring", unit="state"):
        candidates, probs, immediate = top_candidates(model, tokenizer, state, args.top_k)
        record = {"w": probs, "r": immediate}
        for name, value_model in value_models.items():
            record[name] = value_scores(value_model, state, candidates)
        for group, members in ensembles.items():
            record[group] = [sum(values) / len(members) for values in zip(*(record[m] for m in members))]
        scored.append(record)
    correlations = contrast_correlations(scored)

    names = list(correlations)
    lines = [f"Pooled correlations of within-state contrasts (w = p renormalised over the base's top-{args.top_k}) "
             f"at {len(states)} states (held-out opening + t ~ U{{0..{args.max_prefix}}} base tokens); r: the exact "
             f"VADER reward of the text so far", "",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {a} | " + " | ".join(f"{correlations[a][b]:.3f}" for b in names) + " |" for a in names]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (args.output / f"{args.name}.json").write_text(json.dumps(dict(
        settings=dict(states=args.states, top_k=args.top_k, max_prefix=args.max_prefix, seed=args.seed),
        value_models=paths,
        ensembles=args.ensembles, correlations=correlations), indent=1))
    print("\n".join(lines) + f"\n\nWrote {args.output / args.name}.md, {args.name}.json")


if __name__ == "__main__":
    main()
