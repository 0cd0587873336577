"""How much steering is there beyond the reward of the text so far? Monte-Carlo Q on the real task.

VAS tilts the base's next-token distribution by beta · Q(s, a); ARGS-style decoding tilts it by the reward of the
text so far, r(s∘a). Q(s, a) = r(s∘a) + f(s, a), where f, the future part, is all a value model can add over ARGS.
This script measures f on SmolLM2-135M-Instruct + VADER (bench_quality.py's setting: held-out movie openings, 24
tokens, T = 1) with many base rollouts per candidate, at states the base visits:

    state s      a held-out opening plus t ~ U{0 .. --max-prefix} base-sampled tokens
    candidates   the base's top-k next tokens a, with w_a = p(a | s) renormalised over them
    Q̂(s, a)     the mean VADER reward of --rollouts base continuations of s∘a to 24 tokens

At a state, tilting by a score g moves the expected Q by beta · Cov_w(Q, g) + O(beta²) for a KL of
beta² · Var_w(g) / 2, so the pooled (over states) correlation Cov_w(Q, g) / sqrt(Var_w(Q) · Var_w(g)) is g's
first-order steering efficiency: the share of the exact Q's gain per unit of sqrt(KL) that g gets (pooled, so
one beta for all states, as decoding uses). A future part proportional to r (positive words lead on to positive
text) leaves ARGS's efficiency at 1: a larger ARGS weight then steers as the exact Q does. Reported for
g = r (ARGS-style), g = the value model's V(s∘a), and g = the future part f alone. Var_w(Q̂) is corrected for
the rollouts' noise with each candidate's own sample variance (E Var_w(Q̂) = Var_w(Q) + sum_a w_a (1 − w_a)
s_a² / M); covariances with exact scores need no correction. Standard errors and 5th-95th percentiles by
bootstrap over states. First order: a guide to small tilts, not a bound at the 1-3 nats the benchmark steers at.

    python examples/bench_future_part.py                     # the README's figures: 128 states × top-4 × 64
                                                             # rollouts, about 47 min on 2 CPU cores
    python examples/bench_future_part.py --states 8 --rollouts 8    # a quick look

Rollout rewards are appended to --cache (one line per state) as they finish, so an interrupted run resumes.
Writes NAME.md / NAME.json to --output.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
from common import CACHE, EXAMPLES, add_threads_option, held_out_prompts, load_smollm2, use_threads, vader_reward
from tqdm.auto import tqdm

from vas_logits import ValueModel


def state_seed(seed: int, index: int) -> int:
    """The torch seed of state `index`'s sampling, so each state's draws stay the same whatever --states is."""
    return seed * 100_003 + index


@torch.no_grad()
def make_states(model, tokenizer, prompts: list[str], count: int, max_prefix: int, seed: int) -> list[dict]:
    """`count` states: opening i (cycling) plus t ~ U{0 .. max_prefix} base-sampled tokens (EOS never among them)."""
    generator = torch.Generator().manual_seed(seed)
    states = []
    for index in range(count):
        prompt = prompts[index % len(prompts)]
        t = int(torch.randint(0, max_prefix + 1, (1,), generator=generator))
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion: list[int] = []
        torch.manual_seed(state_seed(seed, index))
        while t and len(completion) < t:  # resample until the first t tokens hold no EOS
            output = model.generate(torch.tensor([prompt_ids]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=t, pad_token_id=tokenizer.eos_token_id)
            completion = output[0, len(prompt_ids):].tolist()
            if tokenizer.eos_token_id in completion:
                completion = []
        states.append(dict(index=index, prompt=prompt, prompt_ids=prompt_ids, completion=completion))
    return states


def held_out_states(count: int, max_prefix: int, seed: int) -> tuple:
    """(SmolLM2, its tokenizer, `make_states`' states on the held-out openings)."""
    model, tokenizer = load_smollm2()
    prompts = held_out_prompts()
    return model, tokenizer, make_states(model, tokenizer, prompts, count, max_prefix, seed)


@torch.no_grad()
def top_candidates(model, tokenizer, state: dict, top_k: int) -> tuple[list[int], list[float], list[float]]:
    """The base's top-k next tokens a at a state, their probabilities p(a | s) and r(s∘a), the exact reward of the
    text so far with each."""
    ids = state["prompt_ids"] + state["completion"]
    top = model(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1).topk(top_k)
    candidates = top.indices.tolist()
    candidate_texts = [tokenizer.decode(state["completion"] + [a], skip_special_tokens=True) for a in candidates]
    return candidates, top.values.tolist(), vader_reward([state["prompt"]] * top_k, candidate_texts)


@torch.no_grad()
def rollout_state(model, tokenizer, state: dict, top_k: int, rollouts: int, new_tokens: int, seed: int) -> dict:
    """The base's top-k candidates of one state, their probabilities, r(s∘a) and the rewards of the rollouts."""
    ids, prompt = state["prompt_ids"] + state["completion"], state["prompt"]
    candidates, probs, immediate = top_candidates(model, tokenizer, state, top_k)
    remaining = new_tokens - len(state["completion"]) - 1
    torch.manual_seed(state_seed(seed, state["index"]))
    rolled = [a for a in candidates if a != tokenizer.eos_token_id] if remaining > 0 else []
    texts = {}
    if rolled:  # every candidate's rollouts in one generate() call: the rows all have the same length
        start = torch.tensor([ids + [a] for a in rolled for _ in range(rollouts)])
        output = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, temperature=1.0,
                                top_k=0, top_p=1.0, max_new_tokens=remaining, pad_token_id=tokenizer.eos_token_id)
        decoded = tokenizer.batch_decode(output[:, len(state["prompt_ids"]):], skip_special_tokens=True)
        texts = {a: decoded[i * rollouts : (i + 1) * rollouts] for i, a in enumerate(rolled)}
    returns = [vader_reward([prompt] * rollouts, texts[a]) if a in texts else [r] * rollouts  # EOS: Q = r exactly
               for a, r in zip(candidates, immediate)]
    return dict(index=state["index"], t=len(state["completion"]), candidates=candidates,
                probs=probs, immediate=immediate, returns=returns)


@torch.no_grad()
def value_scores(value_model: ValueModel, state: dict, candidates: list[int]) -> list[float]:
    """The value model's Q(s, a) of each candidate, in reward units: V(s∘a), or the token head's Q(s, a)."""
    ids = state["prompt_ids"] + state["completion"]
    if value_model.token_head:  # one forward of s values every candidate
        state_ids = torch.tensor([ids])
        output = value_model(input_ids=state_ids, attention_mask=torch.ones_like(state_ids),
                             next_tokens=torch.tensor([[candidates]]))
        values = output.values[0, -1]
    else:
        with_candidates = torch.tensor([ids + [a] for a in candidates])
        values = value_model(input_ids=with_candidates, attention_mask=torch.ones_like(with_candidates)).values[:, -1]
    config = value_model.config
    if config.reward_std is not None:
        values = config.reward_mean + config.reward_std * values
    return values.tolist()


def within_state_covariances(weights: torch.Tensor, scores: dict[str, torch.Tensor]) -> dict[tuple[str, str], float]:
    """Cov_w(a, b) over one state's candidates for every pair of scores (a before or equal to b in `scores`'
    order), w = `weights` renormalised; each score is (k,)."""
    w = weights.double() / weights.double().sum()
    centred = {name: x.double() - (w * x.double()).sum() for name, x in scores.items()}
    names = list(centred)
    return {(a, b): float((w * centred[a] * centred[b]).sum()) for i, a in enumerate(names) for b in names[i:]}


def state_moments(record: dict) -> dict[str, float]:
    """Weighted within-state moments (w = p renormalised over the candidates); 'noise' is Var_w(Q̂)'s bias."""
    w = torch.tensor(record["probs"], dtype=torch.float64)
    w = w / w.sum()
    returns = torch.tensor(record["returns"], dtype=torch.float64)  # (k, M)
    q = returns.mean(-1)
    noise_per_mean = returns.var(-1, correction=1) / returns.shape[1]
    scores = {"q": q, "r": torch.tensor(record["immediate"], dtype=torch.float64)}
    scores["f"] = scores["q"] - scores["r"]
    if "value" in record:
        scores["v"] = torch.tensor(record["value"], dtype=torch.float64)
    moments = {"noise": float((w * (1 - w) * noise_per_mean).sum())}
    moments.update({a + b: value for (a, b), value in within_state_covariances(w, scores).items()})
    return moments


def efficiencies(moments: list[dict[str, float]]) -> dict[str, float]:
    """Pooled statistics over states; the noise-dominated variances (qq, ff) corrected by their noise."""
    total = {key: sum(m[key] for m in moments) / len(moments) for key in moments[0]}
    var_q, var_f, var_r = total["qq"] - total["noise"], total["ff"] - total["noise"], total["rr"]
    out = {"std_q": math.sqrt(max(var_q, 0.0)), "std_r": math.sqrt(var_r), "std_f": math.sqrt(max(var_f, 0.0)),
           "noise_std": math.sqrt(total["noise"]), "share_f": var_f / var_q if var_q > 0 else math.nan,
           "eff_r": total["qr"] / math.sqrt(var_r * var_q) if var_q > 0 and var_r > 0 else math.nan}
    out["oracle_over_r"] = 1 / out["eff_r"] if out["eff_r"] > 0 else math.nan
    if "vv" in total:
        out["std_v"] = math.sqrt(total["vv"])
        out["eff_v"] = total["qv"] / math.sqrt(total["vv"] * var_q) if var_q > 0 else math.nan
        out["r_minus_v"] = out["eff_r"] - out["eff_v"]  # paired: bootstrapped on the same states
        out["corr_v_r"] = total["rv"] / math.sqrt(total["vv"] * var_r) if var_r > 0 else math.nan
        # does V carry the future part? Cov_w(V, f) is unbiased (f's noise is independent of V); Var_w(f) corrected
        out["corr_v_f"] = total["fv"] / math.sqrt(total["vv"] * var_f) if var_f > 0 else math.nan
    out["eff_f"] = total["qf"] / math.sqrt(var_f * var_q) if var_f > 0 and var_q > 0 else math.nan
    return out


def bootstrap(moments: list[dict[str, float]], draws: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Each statistic's standard error and 5th / 95th percentiles over `draws` resamplings of the states."""
    generator = torch.Generator().manual_seed(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(draws):
        picks = torch.randint(0, len(moments), (len(moments),), generator=generator).tolist()
        for key, value in efficiencies([moments[i] for i in picks]).items():
            if math.isfinite(value):
                samples.setdefault(key, []).append(value)
    out = {}
    for key, values in samples.items():
        values = torch.tensor(values, dtype=torch.float64)
        low, high = torch.quantile(values, torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
        out[key] = {"se": float(values.std()), "p5": low, "p95": high}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--states", type=int, default=128)
    parser.add_argument("--rollouts", type=int, default=64, help="base continuations per candidate (M)")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--max-prefix", type=int, default=12, help="states take t ~ U{0 .. this} base tokens")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="completion length, as bench_quality.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--value-models", nargs="*", metavar="NAME=PATH",
                        default=[f"main job={CACHE / 'sentiment-4layers' / 'value_model'}"],
                        help="saved value models whose Q(s, a) to score as well (those missing are skipped)")
    parser.add_argument("--cache", type=Path, default=CACHE / "future-part" / "rollouts.jsonl")
    add_threads_option(parser)
    parser.add_argument("--output", type=Path, default=EXAMPLES / "results")
    parser.add_argument("--name", default="future_part_mc")
    args = parser.parse_args()
    for name, least in (("states", 2), ("rollouts", 2), ("top_k", 2), ("max_new_tokens", 1)):
        if getattr(args, name) < least:  # one rollout has no sample variance to correct the noise with
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if not 0 <= args.max_prefix < args.max_new_tokens:
        parser.error(f"--max-prefix must be in [0, --max-new-tokens), got {args.max_prefix}")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    use_threads(args.threads)
    model, tokenizer, states = held_out_states(args.states, args.max_prefix, args.seed)

    settings = dict(top_k=args.top_k, rollouts=args.rollouts, max_new_tokens=args.max_new_tokens,
                    max_prefix=args.max_prefix, seed=args.seed)
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.cache.exists():
        for line in args.cache.read_text().splitlines():
            record = json.loads(line)
            if record["settings"] == settings:
                done[record["index"]] = record
    start = time.perf_counter()
    with args.cache.open("a") as cache:
        for state in tqdm(states, desc="rollouts", unit="state"):
            if state["index"] in done:
                continue
            record = rollout_state(model, tokenizer, state, args.top_k, args.rollouts, args.max_new_tokens, args.seed)
            record["settings"] = settings
            cache.write(json.dumps(record) + "\n")
            cache.flush()
            done[state["index"]] = record
    seconds = time.perf_counter() - start
    records = [done[state["index"]] for state in states]
    moments = [state_moments(record) for record in records]
    result, errors = efficiencies(moments), bootstrap(moments)
    mass = sum(sum(record["probs"]) for record in records) / len(records)
    result.update(states=len(records), top_k_mass=mass, rollout_seconds_this_run=seconds, settings=settings,
                  errors=errors, value_models={})
    for entry in args.value_models:
        name, _, path = entry.partition("=")
        if not (Path(path) / "model.safetensors").exists():
            logging.getLogger("examples").warning("No value model at %s: skipped", path)
            continue
        value_model = ValueModel.from_pretrained(path).eval()
        scored = [dict(record, value=value_scores(value_model, state, record["candidates"]))
                  for state, record in zip(states, records)]
        scored_moments = [state_moments(record) for record in scored]
        stats, stat_errors = efficiencies(scored_moments), bootstrap(scored_moments)
        keys = ("eff_v", "r_minus_v", "corr_v_r", "corr_v_f", "std_v")
        result["value_models"][name] = dict(path=path, **{key: stats[key] for key in keys},
                                            errors={key: stat_errors[key] for key in keys if key in stat_errors})

    def cell(key, stats=result):  # value ± s.e. [5th, 95th percentile], bootstrap over states
        value, error = stats[key], stats["errors"].get(key, dict(se=math.nan, p5=math.nan, p95=math.nan))
        return f"{value:.3f} ± {error['se']:.3f} [{error['p5']:.2f}, {error['p95']:.2f}]"

    lines = [f"Monte-Carlo Q on SmolLM2-135M-Instruct + VADER: {len(records)} states (held-out opening + t ~ U{{0.."
             f"{args.max_prefix}}} base tokens), the base's top-{args.top_k} candidates (mean mass {mass:.2f}), "
             f"{args.rollouts} base rollouts each to {args.max_new_tokens} tokens; weights w = p renormalised; "
             f"± bootstrap s.e. [5th, 95th percentile] over states",
             "", "| quantity | value |", "|---|---|",
             f"| within-state std of Q (noise-corrected) | {cell('std_q')} |",
             f"| within-state std of r(s∘a) (ARGS's score) | {cell('std_r')} |",
             f"| within-state std of the future part f = Q − r (noise-corrected) | {cell('std_f')} |",
             f"| rollout noise in Q̂'s within-state std | {result['noise_std']:.3f} |",
             f"| Var_w(f) / Var_w(Q) | {cell('share_f')} |",
             f"| ARGS-style's steering efficiency corr_w(Q, r) | {cell('eff_r')} |",
             f"| first-order gain at equal KL, exact Q over ARGS-style (1 / efficiency) | {cell('oracle_over_r')} |",
             f"| the future part's own efficiency corr_w(Q, f) | {cell('eff_f')} |"]
    if result["value_models"]:
        lines += ["", "| value model | steering efficiency corr_w(Q, V) | ARGS-style's minus V's | corr_w(V, r) | "
                      "corr_w(V, f) |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {cell('eff_v', stats)} | {cell('r_minus_v', stats)} | {cell('corr_v_r', stats)} | "
                  f"{cell('corr_v_f', stats)} |" for name, stats in result["value_models"].items()]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (args.output / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
