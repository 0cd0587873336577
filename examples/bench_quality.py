"""Reward, KL and cost of VAS against Best-of-N (and ARGS-style decoding) on SmolLM2-135M-Instruct + VADER.

Every method completes the same held-out movie-review openings (the 64 that examples/sentiment.py did not
train on, or --openings FILE), 24 new tokens, plain sampling at T=1, and is scored by the same reward (VADER compound):

    base      plain sampling.
    BoN-N     Best-of-N, N = 1, 2, 4, ... 32: the reward picks the best of N base samples. Its expected
              reward is estimated without bias from --best-of samples per prompt (the mean of the best of
              every N-subset); KL(BoN-N || base) = log N - (N-1)/N, the standard (upper-bound) formula.
    VAS       each value model (scalar and distributional heads, trained by examples/sentiment.py and reused
              from its cache), a sweep of beta, with outside_top_k="keep" (the closed form: tokens outside the
              top k keep their base score) and, for the first, "mask" (the library default: only the top k can
              be sampled, which alone is a top-k sampler far from the base in KL). KL is measured: the mean
              over samples of sum_t [log pi(a_t|s_t) - log pi_ref(a_t|s_t)] over the generated tokens. The gain
              ratio at equal KL is (reward - base) / (Best-of-N's reward at that KL - base), Best-of-N
              interpolated linearly in sqrt(KL) between its N (empty past N = 32).
    ARGS      the reward itself scores the decoded text of every top-k candidate at every token,
              pi(a|s) ∝ pi_ref(a|s) exp(w r(s∘a)) over the top k: VAS with Q replaced by r of the partial
              text (Khanov et al., 2024, sampled instead of greedy). Cheap here only because VADER is a lexicon.
              Every VAS row (stored ones re-read by the same rule) gets "− ARGS at equal KL": its reward minus ARGS's
              curve (interpolated linearly in sqrt(KL) between the two weights that bracket the row's KL), with a
              paired bootstrap s.e. over the prompts. The prompts' own spread cancels there; the sampling noise
              falls as 1 / sqrt(--samples-per-prompt) (16 samples: about ±0.01 on this benchmark).

Cost, relative to base sampling: base-model forward tokens; compute (forward tokens × matmul parameters,
base and value model together); and measured wall time (for BoN: N × the wall time of one base sample per
prompt, plus scoring). Writes quality.md (a markdown table), quality.png (reward vs KL, reward vs cost) and
quality.json to --output.

    python examples/sentiment.py                          # trains and caches the scalar value model
    python examples/sentiment.py --head distributional    # and the distributional one
    python examples/bench_quality.py      # ~15 min on 2 CPU cores
    python examples/bench_quality.py --value-models x2=PATH --baselines examples/results/quality.json \
        --args-weights --name quality_x2   # a new model against the stored curves, in minutes
    python examples/bench_quality.py --value-models "ens=PATH1,PATH2" --baselines examples/results/quality.json \
        --args-weights --name quality_ens  # an ensemble: VAS with both, each at beta / 2
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from common import (CACHE, EXAMPLES, add_threads_option, held_out_prompts, load_smollm2, mean_and_se, pad_token_id,
                    use_threads, vader_reward)
from tqdm.auto import tqdm
from transformers import LogitsProcessor

from vas_logits import VAS, ValueModel


@dataclass
class Result:
    method: str  # base, Best-of-N, VAS, ...
    setting: str  # N=4, β=2, ...
    reward: float  # mean over prompts of the per-prompt mean reward
    reward_se: float  # standard error over prompts
    kl: float  # nats per completion
    forward_tokens: float  # base-model forward tokens, relative to base sampling
    compute: float  # matmul FLOPs of base + value model, relative to base sampling
    wall: float  # seconds, relative to base sampling
    kl_kind: str = "measured"
    gain_ratio: float | None = None  # (reward - base) / (Best-of-N at the same KL - base)
    extra: dict = field(default_factory=dict)  # kl_se; per_prompt_reward and per_prompt_kl, (P,) each
    vs_args: list[float] | None = None  # [reward − ARGS's at the same KL, its paired bootstrap s.e.]


@dataclass
class Run:
    """The completions of one method, `per_prompt` samples for each prompt (prompt-major order)."""

    completions: list[str]
    log_ratio: torch.Tensor  # (n,) summed log pi - log pi_ref over each completion's generated tokens
    prompt_tokens: int  # real (unpadded) prompt tokens over all samples
    slots: int  # sum over generate() calls of rows × steps: the token slots forwarded while decoding
    seconds: float


class ArgsStyle(LogitsProcessor):
    """ARGS-style guidance: add w · reward(decoded prefix + candidate) to the k most likely next tokens."""

    def __init__(self, tokenizer, reward_fn, weight: float, top_k: int, outside_top_k: str = "keep"):
        self.tokenizer, self.reward_fn, self.weight, self.top_k = tokenizer, reward_fn, weight, top_k
        self.outside_top_k = outside_top_k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        top_scores, candidates = scores.topk(self.top_k, dim=-1)  # (B, k)
        batch_size, length = input_ids.shape
        extended = torch.cat([input_ids[:, None, :].expand(-1, self.top_k, -1), candidates[..., None]], dim=-1)
        texts = self.tokenizer.batch_decode(extended.reshape(-1, length + 1).tolist(), skip_special_tokens=True)
        rewards = torch.tensor(self.reward_fn([""] * len(texts), texts), dtype=scores.dtype, device=scores.device)
        rewards = rewards.view(batch_size, self.top_k)
        rewards = rewards - rewards.mean(-1, keepdim=True)  # centred over the k, as VAS centres Q
        out = torch.full_like(scores, float("-inf")) if self.outside_top_k == "mask" else scores.clone()
        return out.scatter_(-1, candidates, top_scores + self.weight * rewards)


@torch.no_grad()
def run_method(model, tokenizer, prompts, per_prompt, make_processors, args) -> Run:
    """Samples `per_prompt` completions of every prompt, in batches of --batch-size rows, and measures the
    log-ratio of the sampling distribution to the base's on the sampled tokens."""
    rows = [prompt for prompt in prompts for _ in range(per_prompt)]
    completions, log_ratios = [], []
    prompt_tokens = slots = 0
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    for first in tqdm(range(0, len(rows), args.batch_size), desc=getattr(args, "desc", "sampling"), unit="batch"):
        batch = tokenizer(rows[first : first + args.batch_size], return_tensors="pt", padding=True)
        out = model.generate(
            **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
            pad_token_id=pad_token_id(tokenizer), logits_processor=make_processors(),
            return_dict_in_generate=True, output_scores=True, output_logits=True,
        )
        new = out.sequences[:, batch["input_ids"].shape[1]:]  # (b, T)
        # Rows that finished keep receiving pad tokens; count a row's tokens up to and including its EOS.
        is_eos = new == tokenizer.eos_token_id
        alive = (is_eos.cumsum(-1) - is_eos.long()) == 0  # (b, T): True up to and including the first EOS
        policy = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, new[..., None])[..., 0]  # (b, T)
        reference = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, new[..., None])[..., 0]
        log_ratios.append(torch.where(alive, policy - reference, 0.0).sum(-1))  # forced pads may be -inf
        completions += tokenizer.batch_decode(new, skip_special_tokens=True)
        prompt_tokens += int(batch["attention_mask"].sum())
        slots += new.shape[0] * new.shape[1]
    seconds = time.perf_counter() - start
    return Run(completions, torch.cat(log_ratios), prompt_tokens, slots, seconds)


def per_prompt_rewards(run: Run, prompts: list[str], per_prompt: int) -> tuple[torch.Tensor, float]:
    """(P, per_prompt) rewards and the seconds spent scoring them."""
    start = time.perf_counter()
    rewards = vader_reward([p for p in prompts for _ in range(per_prompt)], run.completions)
    return torch.tensor(rewards).view(len(prompts), per_prompt), time.perf_counter() - start


def best_of_n(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """(P,) expected max of n samples drawn without replacement from each prompt's M samples: with rewards
    sorted ascending, sum_i C(i-1, n-1) / C(M, n) · r_(i), the unbiased estimator used for pass@k."""
    sorted_rewards = rewards.sort(-1).values.double()
    total = rewards.shape[1]
    weights = torch.tensor([math.comb(i - 1, n - 1) / math.comb(total, n) for i in range(1, total + 1)],
                           dtype=torch.float64)
    return (sorted_rewards * weights).sum(-1).float()


def best_of_n_curve(results: list[dict]) -> list[tuple[float, float]]:
    """(KL, reward) of the Best-of-N rows of a result list (dicts or Results), by increasing N; the first is
    base sampling."""
    rows = [r if isinstance(r, dict) else asdict(r) for r in results]
    return sorted((r["kl"], r["reward"]) for r in rows if r["method"] == "Best-of-N")


def reward_at_kl(curve: list[tuple[float, float]], kl: float) -> float | None:
    """The reward of a (KL, reward) curve sorted by KL at `kl`, interpolated linearly in sqrt(KL) between the two
    points that bracket it; None outside the curve.

    Why sqrt: a tilt by beta·g gains about beta·Cov(Q, g) for a KL of about beta²·Var(g) / 2, so reward grows like
    sqrt(KL) and both curves here (Best-of-N, ARGS) are concave in KL. A chord in KL under-reads them between their
    points: left out in turn, each inner ARGS weight and Best-of-N size of quality_paired.json lies 0.011-0.093
    above the chord of its neighbours in KL and -0.003 to +0.009 off their chord in sqrt(KL)."""
    root = math.sqrt(max(kl, 0.0))
    for (kl_low, reward_low), (kl_high, reward_high) in zip(curve, curve[1:]):
        if kl_low <= kl <= kl_high:
            low, high = math.sqrt(max(kl_low, 0.0)), math.sqrt(max(kl_high, 0.0))
            return reward_low if high == low else reward_low + (reward_high - reward_low) * (root - low) / (high - low)
    return None


def gain_ratio(reward: float, kl: float, curve: list[tuple[float, float]]) -> float | None:
    """(reward − base) / (Best-of-N's reward at the same KL − base), Best-of-N interpolated (`reward_at_kl`)
    between its measured N; None beyond the largest N or without Best-of-N rows (nothing to compare with)."""
    if not curve:
        return None
    base, best_of = curve[0][1], reward_at_kl(curve, kl)
    return (reward - base) / (best_of - base) if best_of is not None and best_of > base else None


def difference_at_equal_kl(row: Result, reference: list[Result], draws: int = 2000,
                           seed: int = 0) -> list[float] | None:
    """[mean, s.e.] of `row`'s reward minus the `reference` curve's reward at `row`'s KL, paired over prompts.

    The reference curve (e.g. ARGS's weights) is interpolated (`reward_at_kl`, linearly in sqrt(KL)) between its
    two rows that bracket `row`'s KL. Every row must carry per-prompt rewards and KLs of the same prompts (`extra`,
    (P,) each): the s.e. comes from resampling the prompts together for every row (a paired bootstrap), so the
    between-prompt spread, which both methods share, cancels, and the KLs' own noise moves the interpolation point
    as it should. None where no two reference rows bracket the KL, or a row lacks per-prompt figures (rows loaded
    from an older JSON)."""
    rows = [row, *reference]
    if len(reference) < 2 or any("per_prompt_reward" not in r.extra or "per_prompt_kl" not in r.extra for r in rows):
        return None
    if len({len(r.extra[key]) for r in rows for key in ("per_prompt_reward", "per_prompt_kl")}) != 1:
        raise ValueError(f"{row.method} {row.setting} and its reference rows cover different numbers of prompts")
    rewards = torch.tensor([r.extra["per_prompt_reward"] for r in rows], dtype=torch.float64)  # (1 + R, P)
    kls = torch.tensor([r.extra["per_prompt_kl"] for r in rows], dtype=torch.float64)  # (1 + R, P)

    def difference(reward: torch.Tensor, kl: torch.Tensor) -> float | None:  # (1 + R,) means over prompts
        at = reward_at_kl(sorted(zip(kl[1:].tolist(), reward[1:].tolist())), kl[0].item())
        return None if at is None else reward[0].item() - at

    estimate = difference(rewards.mean(-1), kls.mean(-1))
    if estimate is None:
        return None
    generator = torch.Generator().manual_seed(seed)
    draws_made = [difference(rewards[:, picked].mean(-1), kls[:, picked].mean(-1))
                  for picked in torch.randint(rewards.shape[1], (draws, rewards.shape[1]), generator=generator)]
    draws_made = torch.tensor([d for d in draws_made if d is not None], dtype=torch.float64)
    return [estimate, float(draws_made.std())] if len(draws_made) > draws // 2 else [estimate, math.nan]


def matmul_parameters(module: torch.nn.Module) -> int:
    """Parameters that cost 2 FLOPs per token (every Linear, tied LM head included; embeddings are lookups)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


COLOURS = ["k", "tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple", "tab:gray", "tab:brown", "tab:pink",
           "tab:olive", "tab:cyan"]
MARKERS = "so^vDPX*hd"


def plot_styles(methods: list[str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) per method, in order. Cycled: a results file gathers rows across runs, so it may hold more
    methods than there are colours (11 and 10 of unequal length, so the pairs repeat only after 110)."""
    return dict(zip(methods, zip(itertools.cycle(COLOURS), itertools.cycle(MARKERS))))


def write_plot(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in results:
        groups.setdefault(r.method, []).append(r)
    styles = plot_styles(list(groups))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for name, rs in groups.items():
        colour, marker = styles[name]
        for ax, x in zip(axes, ("kl", "compute", "wall")):
            ax.errorbar([getattr(r, x) for r in rs], [r.reward for r in rs], yerr=[r.reward_se for r in rs],
                        color=colour, marker=marker, capsize=3, label=name, linestyle="-" if len(rs) > 1 else "")
            for r in rs:
                ax.annotate(r.setting, (getattr(r, x), r.reward), textcoords="offset points", xytext=(4, -10),
                            fontsize=7, color=colour)
    axes[0].set_xlabel("KL from the base (nats per completion; Best-of-N: log N - (N-1)/N; log scale)")
    axes[0].set_xscale("symlog", linthresh=0.1)
    axes[1].set_xlabel("compute relative to base sampling (matmul FLOPs, log scale)")
    axes[2].set_xlabel("wall time relative to base sampling (log scale)")
    for ax in axes[1:]:
        ax.set_xscale("log", base=2)
    for ax in axes:
        ax.set_ylabel("mean VADER reward (± s.e.)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(results: list[Result]) -> str:
    lines = ["| method | mean reward ± s.e. | KL (nats) | gain ratio at equal KL | − ARGS at equal KL (paired s.e.) "
             "| base forward tokens | compute | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        kl = f"≤ {r.kl:.2f}" if r.kl_kind == "formula" and r.kl > 0 else f"{r.kl:.2f}"
        gain = "" if r.gain_ratio is None else f"{r.gain_ratio:.2f}"
        versus = "" if r.vs_args is None else "{:+.3f} ± {:.3f}".format(*r.vs_args)
        lines.append(f"| {r.method} {r.setting} | {r.reward:+.3f} ± {r.reward_se:.3f} | {kl} | {gain} | {versus} "
                     f"| {r.forward_tokens:.1f}× "
                     f"| {r.compute:.2f}× | {r.wall:.2f}× |")
    return "\n".join(lines)


def write_results(results: list[Result], output: Path, name: str, title: str) -> None:
    """output/name.md (the table), name.json (every row) and name.png (reward vs KL, compute, wall time)."""
    table = markdown_table(results)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.md").write_text(f"{title}\n\n{table}\n")
    (output / f"{name}.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    write_plot(results, output / f"{name}.png", title)
    print(f"\n{table}\n\nWrote {output / name}.md, {name}.png, {name}.json")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--value-models", nargs="+", metavar="NAME=PATH[,PATH ..]",
                        default=[f"scalar={CACHE / 'sentiment-4layers' / 'value_model'}",
                                 f"distributional={CACHE / 'sentiment-4layers-distributional' / 'value_model'}"],
                        help="saved value models to compare (default: the two that examples/sentiment.py trains "
                             "with --head scalar and --head distributional); several paths make an ensemble, "
                             "VAS with each member at beta / n (the mean of their standardised Q)")
    parser.add_argument("--best-of", type=int, default=32, help="base samples per prompt; BoN-N for N = 1, 2, 4 ..")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="samples per prompt for VAS and ARGS")
    parser.add_argument("--betas", type=float, nargs="*", default=[0.5, 1, 2, 4, 8, 16, 32],
                        help="VAS with outside_top_k='keep': the closed form, other tokens keep their base score "
                             "(beta per standard deviation of the reward: the value models are standardised)")
    parser.add_argument("--masked-betas", type=float, nargs="*", default=None,
                        help="VAS with outside_top_k='mask' (the library default; first value model only): only "
                             "the top k can be sampled (default: 0 2, or none with --baselines)")
    parser.add_argument("--args-weights", type=float, nargs="*", default=[2, 4, 8],
                        help="ARGS-style reward weights (none: skip ARGS); with --baselines, these weights are "
                             "sampled again and the stored ARGS rows of other weights are kept")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=None, help="use the first N openings (default: all of them)")
    parser.add_argument("--openings", type=Path, default=None,
                        help="a text file of openings, one per line, instead of the 64 held-out ones (e.g. "
                             "examples/data/fresh_prompts.txt: 256 that neither training nor earlier runs used)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per generate() call, for every method")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--baselines", type=Path, default=None,
                        help="an earlier run's quality.json (same prompts, seed, k and tokens): reuse its rows "
                             "(Best-of-N, ARGS, other value models) instead of sampling --best-of per prompt again; "
                             "base sampling then runs once per prompt, only to measure the cost unit")
    add_threads_option(parser)
    parser.add_argument("--output", type=Path, default=EXAMPLES / "results")
    parser.add_argument("--name", default="quality", help="output file names: NAME.md, NAME.png, NAME.json")
    parser.add_argument("--rescore", type=Path, nargs="+", default=None, metavar="JSON",
                        help="only recompute the gain ratios and differences to ARGS of stored results files with "
                             "today's rules, and rewrite them (NAME.md, .json, .png); samples nothing")
    parser.add_argument("--pool", type=Path, nargs="+", default=None, metavar="JSON",
                        help="only print each VAS row's difference to ARGS at equal KL in stored results files of runs "
                             "on the same prompts (other seeds), and in all of them merged prompt by prompt; "
                             "samples nothing")
    args = parser.parse_args()
    if args.rescore:
        return rescore(args.rescore)
    if args.pool:
        return print(pooled_table(args.pool))
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    use_threads(args.threads)
    if args.masked_betas is None:
        args.masked_betas = [] if args.baselines else [0, 2]
    value_models = {name: load_ensemble(name, paths) for name, paths in map(parse_value_model, args.value_models)}
    args.output.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_smollm2()
    prompts = benchmark_prompts(args.openings, args.prompts)
    openings = openings_digest(prompts)  # stored with every per-prompt row, checked against --baselines
    base_params = matmul_parameters(model)
    value_params = {name: [matmul_parameters(member) for member in members] for name, members in value_models.items()}
    print(f"{len(prompts)} {openings_name(args.openings)}; {args.max_new_tokens} new tokens; matmul parameters: base "
          f"{base_params / 1e6:.1f}M, value models {({k: f'{sum(v) / 1e6:.1f}M' for k, v in value_params.items()})}")

    sweeps = {name: [("keep", args.betas)] + ([("mask", args.masked_betas)] if index == 0 and args.masked_betas else [])
              for index, name in enumerate(value_models)}  # (outside_top_k, betas) per value model
    stored = load_baselines(args.baselines, names=[vas_group(name, outside, args.top_k)
                                                   for name in value_models for outside, _ in sweeps[name]],
                            args_settings=[args_setting(weight) for weight in args.args_weights],
                            openings=openings)
    # Base samples: every Best-of-N is a selection from these; Best-of-1 is base sampling, the cost unit.
    base_per_prompt = 1 if stored else args.best_of
    args.desc = "base samples"
    base_run = run_method(model, tokenizer, prompts, base_per_prompt, lambda: None, args)
    per_sample = dict(  # base sampling's cost for one sample per prompt: the unit of every cost column
        tokens=(base_run.prompt_tokens + base_run.slots) / base_per_prompt,
        seconds=base_run.seconds / base_per_prompt,
    )
    print(f"base: {len(base_run.completions)} samples in {base_run.seconds:.0f} s "
          f"(max |log pi - log pi_ref| {base_run.log_ratio.abs().max():.1e}, must be 0)")

    results = stored or best_of_n_rows(base_run, prompts, args.best_of, per_sample["seconds"])

    curve = best_of_n_curve(results)

    def record(group, setting, run, per_prompt, value_compute=0.0):
        rewards, _ = per_prompt_rewards(run, prompts, per_prompt)
        reward, se = mean_and_se(rewards.mean(-1).tolist())
        base_tokens = (run.prompt_tokens + run.slots) / per_prompt
        compute = (base_tokens * base_params + value_compute / per_prompt) / (
            per_sample["tokens"] * base_params)
        kl = run.log_ratio.mean().item()
        result = Result(group, setting, reward, se, kl, base_tokens / per_sample["tokens"],
                        compute, run.seconds / per_prompt / per_sample["seconds"],
                        gain_ratio=gain_ratio(reward, kl, curve),
                        extra=dict(kl_se=(run.log_ratio.std() / len(run.log_ratio) ** 0.5).item(),
                                   per_prompt_reward=rewards.mean(-1).tolist(),
                                   per_prompt_kl=run.log_ratio.view(len(prompts), per_prompt).mean(-1).tolist(),
                                   openings=openings))
        results.append(result)
        gain = "" if result.gain_ratio is None else f", gain ratio {result.gain_ratio:.2f}"
        print(f"{group} {setting}: reward {reward:+.3f} ± {se:.3f}, KL {kl:.2f}{gain}, wall {result.wall:.2f}×",
              flush=True)

    for name, members in value_models.items():
        for outside, betas in sweeps[name]:
            group = vas_group(name, outside, args.top_k)
            for beta in betas:
                args.desc = f"{group} β={beta:g}"
                member_betas = [beta / len(members)] * len(members)
                run = run_method(model, tokenizer, prompts, args.samples_per_prompt,
                                 lambda: [VAS(members, beta=member_betas, top_k=args.top_k, outside_top_k=outside)],
                                 args)
                # Each value model forwards each real prompt token once, then per step the new token and (a V(s∘a)
                # head) the k candidates; a token head values them all from the one new position.
                value_compute = sum((run.prompt_tokens + run.slots * (1 if member.token_head else 1 + args.top_k))
                                    * params for member, params in zip(members, value_params[name]))
                record(group, f"β={beta:g}", run, args.samples_per_prompt, value_compute)
    for weight in args.args_weights:
        args.desc = f"ARGS {args_setting(weight)}"
        run = run_method(model, tokenizer, prompts, args.samples_per_prompt,
                         lambda: [ArgsStyle(tokenizer, vader_reward, weight, args.top_k)], args)
        record("ARGS", args_setting(weight), run, args.samples_per_prompt)

    compare(results)
    sizes = ", ".join(f"{name} {'+'.join(f'{p / 1e6:.0f}M' for p in params)}" for name, params in value_params.items())
    title = (f"SmolLM2-135M-Instruct + VADER, {len(prompts)} {openings_name(args.openings)}, {args.max_new_tokens} tokens, "
             f"T=1, k={args.top_k}; value models' matmul params: {sizes}")
    if stored:
        title += f"; Best-of-N, ARGS and other rows from {args.baselines.name}"
    write_results(results, args.output, args.name, title)


def benchmark_prompts(openings: Path | None, count: int | None) -> list[str]:
    """The first `count` (default: all) lines of `openings`, or of the 64 openings examples/sentiment.py held out."""
    prompts = openings.read_text().splitlines() if openings else held_out_prompts()
    if not prompts:
        raise ValueError(f"openings={str(openings)!r} holds no openings")
    if count is not None and not 1 <= count <= len(prompts):
        raise ValueError(f"prompts must be between 1 and {len(prompts)} (the openings there are), got {count}")
    return prompts[:count]


def openings_digest(prompts: list[str]) -> str:
    """A short fingerprint of the prompts (in order) that a row's per-prompt figures belong to."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


@functools.cache
def held_out_digest() -> str:
    return openings_digest(held_out_prompts())


def row_openings(row: Result) -> str:
    """The fingerprint of `row`'s prompts; rows written before --openings existed were all on the 64 held out."""
    return row.extra.get("openings") or held_out_digest()


def openings_name(openings: Path | None) -> str:
    return f"movie openings from {openings.name}" if openings else "held-out movie openings"


def compare(results: list[Result]) -> None:
    """Sets the gain ratio (against the Best-of-N rows) of every VAS and ARGS row and each VAS row's difference to
    the ARGS rows at equal KL (where all carry per-prompt figures of the same prompts), stored rows included, so
    one rule reads them all."""
    curve = best_of_n_curve(results)
    args_rows = [r for r in results if r.method == "ARGS"]
    for r in results:
        if r.method.startswith("VAS") or r.method == "ARGS":
            r.gain_ratio = gain_ratio(r.reward, r.kl, curve)
        if r.method.startswith("VAS"):
            r.vs_args = difference_at_equal_kl(r, args_rows)


def rescore(paths: list[Path]) -> None:
    """Recomputes the comparisons of stored results files (`compare`) and rewrites them, title kept."""
    for path in paths:
        results = load_baselines(path, names=[])
        markdown = path.with_suffix(".md")
        title = markdown.read_text().splitlines()[0] if markdown.exists() else path.stem
        compare(results)
        write_results(results, path.parent, path.stem, title)


def merge_runs(runs: list[list[Result]]) -> list[Result]:
    """The rows that every run (the same prompts, other seeds, as many samples per prompt) has with per-prompt
    figures, each prompt's reward and KL averaged over the runs: one run with their samples together. The paired
    bootstrap then resamples prompts once for all of them: the runs share their prompts, so their differences to
    ARGS are not independent, and an inverse-variance mean of them would under-state the error."""
    if len({row_openings(r) for run in runs for r in run if "per_prompt_reward" in r.extra}) > 1:
        raise ValueError("runs of different prompts cannot be merged prompt by prompt (see --openings, --prompts)")
    merged = []
    for row in runs[0]:
        same = [next((r for r in run if (r.method, r.setting) == (row.method, row.setting)), None) for run in runs]
        if any(r is None or "per_prompt_reward" not in r.extra or "per_prompt_kl" not in r.extra for r in same):
            continue
        extra = {key: torch.tensor([r.extra[key] for r in same], dtype=torch.float64).mean(0).tolist()
                 for key in ("per_prompt_reward", "per_prompt_kl")}
        extra["openings"] = row_openings(row)
        reward, reward_se = mean_and_se(extra["per_prompt_reward"])
        kl = sum(extra["per_prompt_kl"]) / len(extra["per_prompt_kl"])
        wall = sum(r.wall for r in same) / len(same)
        merged.append(Result(row.method, row.setting, reward, reward_se, kl, row.forward_tokens, row.compute, wall,
                             row.kl_kind, extra=extra))
    compare(merged)
    return merged


def pooled_table(paths: list[Path]) -> str:
    """A markdown table of each VAS row's difference to ARGS at equal KL in every stored results file and in all
    of them merged (`merge_runs`; no gain ratios: Best-of-N rows carry no per-prompt figures to merge)."""
    runs = [load_baselines(path, names=[]) for path in paths]
    try:
        merged = merge_runs(runs)
    except ValueError as error:
        raise SystemExit(f"--pool {' '.join(map(str, paths))}: {error}") from error
    alone = [{(r.method, r.setting): r for r in merge_runs([run])} for run in runs]  # each run by today's rule too
    lines = ["| VAS row | " + " | ".join(path.stem for path in paths) + " | merged |",
             "|---|" + "---|" * (len(paths) + 1)]
    for pooled in merged:
        if pooled.vs_args is None:
            continue
        each = [rows[pooled.method, pooled.setting] for rows in alone]
        cells = ["{:+.3f} ± {:.3f} @ {:.2f}".format(*r.vs_args, r.kl) if r.vs_args else "–" for r in each]
        lines.append(f"| {pooled.method} {pooled.setting} | " + " | ".join(cells) +
                     " | **{:+.3f} ± {:.3f} @ {:.2f}** |".format(*pooled.vs_args, pooled.kl))
    return "\n".join(lines)


def parse_value_model(entry: str) -> tuple[str, list[Path]]:
    """'NAME=PATH' or 'NAME=PATH,PATH ..' (an ensemble) -> (NAME, paths)."""
    name, sep, paths = entry.partition("=")
    if not sep or not name or not paths or "" in paths.split(","):
        raise SystemExit(f"--value-models entries are NAME=PATH or NAME=PATH,PATH .., got {entry!r}")
    return name, [Path(path) for path in paths.split(",")]


def load_ensemble(name: str, paths: list[Path]) -> list[ValueModel]:
    """The value models of one --value-models entry; their Q must share a unit (all standardised, or none)."""
    for path in paths:
        if not (path / "model.safetensors").exists():
            raise SystemExit(f"No value model at {path}: run examples/sentiment.py (--head {name}) first")
    members = [ValueModel.from_pretrained(path) for path in paths]
    if len({member.config.reward_std is None for member in members}) > 1:
        raise SystemExit(f"The ensemble {name!r} mixes standardised and raw value models; their Q cannot be averaged")
    return members


def best_of_n_rows(base_run: Run, prompts: list[str], best_of: int, seconds_per_sample: float) -> list[Result]:
    """Best-of-N for N = 1, 2, 4 .. best_of from `best_of` base samples per prompt (the unbiased estimate)."""
    base_rewards, base_scoring = per_prompt_rewards(base_run, prompts, best_of)
    rows, n = [], 1
    while n <= best_of:
        reward, se = mean_and_se(best_of_n(base_rewards, n).tolist())
        scoring = n * base_scoring / best_of if n > 1 else 0.0  # best-of-1 = base sampling: nothing to pick
        wall = (n * seconds_per_sample + scoring) / seconds_per_sample
        kl = math.log(n) - (n - 1) / n
        rows.append(Result("Best-of-N", f"N={n}", reward, se, kl, n, n, wall, kl_kind="formula"))
        n *= 2
    return rows


def vas_group(name: str, outside_top_k: str, top_k: int) -> str:
    """The method name of a value model's rows: "VAS scalar", or "VAS scalar, top-20 only" for outside_top_k="mask"."""
    return f"VAS {name}" + ("" if outside_top_k == "keep" else f", top-{top_k} only")


def args_setting(weight: float) -> str:
    """An ARGS row's setting, "w=4": how its rows are written and how --baselines finds the ones re-run."""
    return f"w={weight:g}"


def load_baselines(path: Path | None, names: list[str], args_settings: Sequence[str] = (),
                   openings: str | None = None) -> list[Result]:
    """The rows of an earlier run's JSON (`--baselines`) but those of the methods in `names` and the ARGS rows of
    `args_settings` (all re-run now); [] for None. It must hold the Best-of-N curve that gain ratios are measured
    against, and with `openings` (an `openings_digest`) its per-prompt rows must be of those prompts. A VAS method's
    rows go as a whole (a name may now stand for another value model); an ARGS row depends only on its weight, so
    the stored ARGS weights not re-run stay on the curve."""
    if path is None:
        return []

    def rerun(row: dict) -> bool:
        return row["method"] in names or (row["method"] == "ARGS" and row["setting"] in args_settings)

    try:
        rows = json.loads(Path(path).read_text())
        results = [Result(**row) for row in rows if not rerun(row)]
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise SystemExit(f"--baselines {path}: not a quality.json written by this script ({error})") from error
    if not any(r.method == "Best-of-N" for r in results):
        raise SystemExit(f"--baselines {path}: it has no Best-of-N rows to measure gain ratios against")
    if openings and any(row_openings(r) != openings for r in results if "per_prompt_reward" in r.extra):
        raise SystemExit(f"--baselines {path}: its rows are of other prompts than these (--openings, --prompts)")
    return results


if __name__ == "__main__":
    main()
