"""How much of the exact value's steering does fit()'s value model capture? A yardstick with a known answer.

The base is a real transformers LlamaForCausalLM whose attention and MLP outputs are zeroed, so its next-token
distribution depends only on the current token: a bigram model P[x, y] with random, moderately peaked rows
(the special tokens are suppressed, so every completion has exactly --new-tokens tokens). For such a base the
value Q(s, a) = E_{pi_ref}[R | s∘a] of any reward below is exact by dynamic programming over P:

    count     R = number of completion words in a set of 12 "good" words (as tests/helpers.count_good_words)
    lexicon   R = sum of per-word weights: 48 words, each with its own weight in ±[0.25, 2] (as VADER or AFINN)
    temporal  R = number of "payoff" words (8 ids) that come after a "setup" word (8 other ids): a setup word
              earns nothing itself and a payoff word nothing before one, so the early choice gets its credit
              only from a later one (prompts never hold either kind, so the value model can tell them apart)

For each task: the exact-Q processor (the VAS closed form with the exact Q, the ceiling) and fit()'s value
model, each over a sweep of beta, both with outside_top_k="keep" and the same k; reward and KL measured on the
same unseen prompts and seeds (KL: mean over samples of sum_t log pi(a_t|s_t) - log pi_ref(a_t|s_t)). The gain
ratio of a fitted beta is (R - R_base) / (R_exact(KL) - R_base), the exact curve interpolated at its KL; the
headline is the best ratio over betas whose KL is at least 0.5 nats. The same sweep of the closed form with only
the exact reward of the text so far, r(s∘a) (ARGS-style decoding; all that exact prefix and candidate rewards can
teach), is the bar a value model clears only by learning the future part of Q. The learning curve repeats fit() at 1× to
16× the default sample budget (--prompts × fit()'s default 4 samples per prompt).

    python examples/bench_value_learning.py                     # the table, about 5 min on 2 CPU cores
    python examples/bench_value_learning.py --budgets 1 2 4 8 16 --plot   # and the learning curve (longer)

Writes value_learning.md / .json (and value_learning.png with --plot) to --output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_quality import best_of_n  # the same unbiased estimator as the real benchmark's
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, PreTrainedTokenizerFast

from vas_logits import VAS, PrefixRewards, Rollouts, ValueModel, fit

VOCAB_SIZE = 96
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL = [PAD, BOS, EOS, UNK]
WORDS = list(range(4, VOCAB_SIZE))  # ids of the words w4 .. w95
SETUP = list(range(30, 38))  # temporal task: the early choice
PAYOFF = list(range(40, 48))  # temporal task: the late one, worth 1 each after a setup word
PROMPT_WORDS = [i for i in WORDS if i not in SETUP + PAYOFF]


# ---------------------------------------------------------------------- the base, the tokenizer, the tasks


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: <pad>=0, <s>=1, </s>=2, <unk>=3, then w4 .. w95 (BOS prepended)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK, **{f"w{i}": i for i in WORDS}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def bigram_base(seed: int = 0, sharpness: float = 2.5, num_layers: int = 2) -> LlamaForCausalLM:
    """A LlamaForCausalLM whose logits depend only on the current token (attention and MLP outputs zeroed).

    `sharpness` scales the LM head: larger is more peaked (about 3 nats of entropy per row at the default)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS,
                         eos_token_id=EOS, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, sharpness / math.sqrt(config.hidden_size))
    model.generation_config.suppress_tokens = SPECIAL  # every completion runs to max_new_tokens
    return model


@torch.no_grad()
def transition_matrix(base: LlamaForCausalLM) -> torch.Tensor:
    """(V, V) float64 P[x, y] = pi_ref(y | last token x), the special tokens suppressed; checked to be context-free."""
    ids = torch.arange(VOCAB_SIZE)[:, None]
    logits = base(input_ids=ids).logits[:, -1].double()
    logits[:, SPECIAL] = -math.inf
    in_context = base(input_ids=torch.tensor([[5, 17, 40, 9]])).logits[0, -1].double()
    in_context[SPECIAL] = -math.inf
    if not torch.allclose(in_context.log_softmax(-1), logits[9].log_softmax(-1), atol=1e-6):
        raise RuntimeError("the base is not a bigram model: its logits depend on the context")
    return logits.softmax(-1)


@dataclass
class Task:
    """A reward over the completion's word ids, and the means to compute its exact Q under a bigram base."""

    name: str
    word_weights: torch.Tensor | None  # (V,) float64 for additive rewards (count, lexicon), else None

    def rewards(self, completions: list[list[int]]) -> list[float]:
        if self.word_weights is not None:
            return [float(self.word_weights[ids].sum()) if ids else 0.0 for ids in completions]
        rewards = []
        for ids in completions:
            set_up, reward = False, 0.0
            for token in ids:
                reward += float(set_up and token in PAYOFF)
                set_up = set_up or token in SETUP
            rewards.append(reward)
        return rewards

    def reward_fn(self):
        """reward_fn(prompts, completions) on text, as fit() calls it."""

        def reward(prompts, completions):
            return self.rewards([[int(word[1:]) for word in text.split()] for text in completions])

        reward.__qualname__ = f"bench_value_learning.{self.name}"
        return reward


def make_tasks(seed: int = 0) -> dict[str, Task]:
    generator = torch.Generator().manual_seed(seed + 1)
    count = torch.zeros(VOCAB_SIZE, dtype=torch.float64)
    count[10:22] = 1.0  # the 12 words of tests/helpers.GOOD_WORDS
    lexicon = torch.zeros(VOCAB_SIZE, dtype=torch.float64)
    chosen = torch.tensor(WORDS)[torch.randperm(len(WORDS), generator=generator)[:48]]
    magnitudes = 0.25 + 1.75 * torch.rand(48, generator=generator, dtype=torch.float64)
    signs = torch.where(torch.rand(48, generator=generator) < 0.5, -1.0, 1.0).double()
    lexicon[chosen] = magnitudes * signs
    return {"count": Task("count", count), "lexicon": Task("lexicon", lexicon), "temporal": Task("temporal", None)}


class ExactQ(LogitsProcessor):
    """The VAS closed form with the exact Q of `task` under the bigram base: on the top-k of the scores,
    scores + beta · (Q − mean_K Q); outside, "keep" or "mask" as the VAS processor does.

    Args:
        transition: (V, V) the base's P[x, y].
        task: The reward.
        prompt_length: Columns of input_ids before the completion (all prompts have this length here).
        new_tokens: The completion's length T (fixed: the special tokens are suppressed).
    """

    def __init__(self, transition: torch.Tensor, task: Task, prompt_length: int, new_tokens: int, beta: float,
                 top_k: int = 10, outside_top_k: str = "keep", soft: bool = False, immediate: bool = False,
                 lookahead: int = 0):
        self.task, self.prompt_length, self.new_tokens = task, prompt_length, new_tokens
        # immediate: Q is only the reward of the text so far, r(s∘a), the future dropped: ARGS-style decoding with
        # the exact reward, and all that exact prefix and candidate rewards can teach a value model
        self.immediate = immediate
        # lookahead (with immediate): plus one base step, the expected reward of the next token over the base's
        # top-`lookahead` (the others count as earning nothing): what lookahead labels (vas_logits/lookahead.py)
        # can teach a value model
        top = transition.topk(lookahead, dim=-1).indices if lookahead else None
        self.next_transition = None if top is None else \
            torch.zeros_like(transition).scatter(-1, top, transition.gather(-1, top))
        self.beta, self.top_k, self.outside_top_k = beta, top_k, outside_top_k
        # soft: Q is the soft value (1/beta) log E[exp(beta R) | s∘a] instead of E[R | s∘a]: then the closed form
        # is the token-level factorisation of the sequence-level optimum pi_ref(y) exp(beta R(y)) / Z
        # (on the top k). future[n] holds the expected (or soft) reward of the n tokens after the candidate.
        def expectation(values: torch.Tensor) -> torch.Tensor:  # over the next token y of each row x
            if not soft:
                return transition @ values
            shift = values.max()  # log-sum-exp over y of P[x, y] exp(beta values[y]), stably
            return shift + (transition @ (beta * (values - shift)).exp()).log() / beta

        if task.word_weights is not None and self.next_transition is not None:
            self.next_step = self.next_transition @ task.word_weights  # (x,)
        if task.word_weights is not None:
            self.future = [torch.zeros(VOCAB_SIZE, dtype=torch.float64)]
            for _ in range(new_tokens):
                self.future.append(expectation(task.word_weights + self.future[-1]))
            return
        # temporal: future[n][x, u]: the reward of the n tokens after x, u = 1 once a setup word was seen
        self.is_setup = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
        self.is_setup[SETUP] = True
        self.is_payoff = torch.zeros(VOCAB_SIZE, dtype=torch.float64)
        self.is_payoff[PAYOFF] = 1.0
        if self.next_transition is not None:  # (x, u): the next token's payoff once set up (u = 1)
            self.next_step = torch.stack([torch.zeros(VOCAB_SIZE, dtype=torch.float64),
                                          self.next_transition @ self.is_payoff], -1)
        self.future = [torch.zeros(VOCAB_SIZE, 2, dtype=torch.float64)]
        for _ in range(new_tokens):
            previous = self.future[-1]
            # token y in state u earns u · payoff(y); the state is then 1 if u = 1 or y is a setup word
            value_after = torch.stack([previous[:, 0].where(~self.is_setup, previous[:, 1]),
                                       self.is_payoff + previous[:, 1]], -1)  # (y, u)
            self.future.append(torch.stack([expectation(value_after[:, u]) for u in range(2)], -1))

    def q_values(self, input_ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, k) float64 exact Q of each candidate as completion token t (t tokens generated so far)."""
        completion = input_ids[:, self.prompt_length :]  # (B, t)
        t = completion.shape[1]
        remaining = self.new_tokens - t - 1  # tokens after the candidate
        if self.task.word_weights is not None:
            so_far = self.task.word_weights[completion].sum(-1, keepdim=True) if t else 0.0  # (B, 1)
            future = self._next_step(candidates, remaining) if self.immediate else self.future[remaining][candidates]
            return so_far + self.task.word_weights[candidates] + future
        so_far = torch.tensor(self.task.rewards(completion.tolist()), dtype=torch.float64)[:, None]  # (B, 1)
        set_up = self.is_setup[completion].any(-1, keepdim=True) if t else torch.zeros(len(completion), 1, dtype=bool)
        state = (set_up | self.is_setup[candidates]).long()  # (B, k) after the candidate
        earned = set_up.double() * self.is_payoff[candidates]  # the candidate's own reward
        return so_far + earned + (self._next_step((candidates, state), remaining) if self.immediate else
                                  self.future[remaining][candidates, state])

    def _next_step(self, index, remaining: int):
        """With lookahead: the next token's expected reward at `index` (0 when the candidate is the last token)."""
        return self.next_step[index] if self.next_transition is not None and remaining > 0 else 0.0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        top_k = min(self.top_k, scores.shape[-1])
        candidate_scores, candidates = scores.topk(top_k, dim=-1)
        q = self.q_values(input_ids, candidates)
        adjustment = (self.beta * (q - q.mean(-1, keepdim=True))).float()
        out = torch.full_like(scores, -math.inf) if self.outside_top_k == "mask" else scores.clone()
        return out.scatter(-1, candidates, candidate_scores + adjustment)


# ---------------------------------------------------------------------- measuring a policy


def random_prompts(count: int, seed: int, words: int = 4) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    choices = torch.tensor(PROMPT_WORDS)
    return [" ".join(f"w{int(i)}" for i in choices[torch.randint(len(choices), (words,), generator=generator)])
            for _ in range(count)]


@torch.no_grad()
def measure(base, tokenizer, transition, task: Task, prompts: list[str], processor, new_tokens: int,
            samples_per_prompt: int, seed: int) -> dict[str, float]:
    """Mean reward (and its s.e. over prompts) and mean KL(pi || pi_ref) per completion, from samples."""
    input_ids = torch.tensor(tokenizer(prompts)["input_ids"])
    torch.manual_seed(seed)
    output = base.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=0, top_p=1.0,
                           num_return_sequences=samples_per_prompt, max_new_tokens=new_tokens, pad_token_id=PAD,
                           logits_processor=[processor] if processor else [], output_scores=True,
                           return_dict_in_generate=True)
    sequences = output.sequences  # (N, prompt + T)
    completion = sequences[:, input_ids.shape[1] :]  # (N, T)
    previous = sequences[:, input_ids.shape[1] - 1 : -1]  # the token each completion token follows
    log_pi = torch.stack(output.scores, 1).double().log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)
    log_ref = transition.log()[previous, completion]  # (N, T)
    kl = (log_pi - log_ref).sum(-1)  # (N,)
    rewards = torch.tensor(task.rewards(completion.tolist()), dtype=torch.float64)
    per_prompt = rewards.view(len(prompts), samples_per_prompt).mean(-1)
    return {"reward": per_prompt.mean().item(), "reward_se": (per_prompt.std() / math.sqrt(len(prompts))).item(),
            "kl": kl.mean().item()}


def interpolate(curve: list[dict], kl: float) -> float:
    """The reward of a (kl, reward) curve at `kl` (linear between points, sorted by KL; flat past the last)."""
    points = sorted((point["kl"], point["reward"]) for point in curve)
    if kl <= points[0][0]:
        return points[0][1]
    for (kl0, r0), (kl1, r1) in zip(points, points[1:]):
        if kl <= kl1:
            return r0 + (r1 - r0) * (kl - kl0) / max(kl1 - kl0, 1e-12)
    return points[-1][1]


def gain_ratios(fitted: list[dict], exact: list[dict], base_reward: float) -> None:
    """Fill each fitted point's `ratio`: its gain over the base against the exact curve's gain at its KL."""
    for point in fitted:
        exact_gain = interpolate(exact, point["kl"]) - base_reward
        point["ratio"] = (point["reward"] - base_reward) / exact_gain if exact_gain > 1e-9 else float("nan")


def headline(fitted: list[dict], min_kl: float = 0.5) -> dict | None:
    """The fitted point with the best ratio among those at KL >= min_kl (None if none gets there)."""
    eligible = [point for point in fitted if point["kl"] >= min_kl and not math.isnan(point["ratio"])]
    return max(eligible, key=lambda point: point["ratio"]) if eligible else None


# ---------------------------------------------------------------------- one task


def run_task(task: Task, args, base, tokenizer, transition, budget: int, fit_options: dict) -> dict:
    train = random_prompts(round(args.prompts * budget), seed=100)
    unseen = random_prompts(args.eval_prompts, seed=200)
    prompt_length = len(tokenizer(unseen[0])["input_ids"])
    common = dict(new_tokens=args.new_tokens, samples_per_prompt=args.eval_samples, seed=args.seed)
    base_point = measure(base, tokenizer, transition, task, unseen, None, **common)

    def exact_sweep(**options) -> list[dict]:  # the closed form with an exact Q (ExactQ's options) at each beta
        return [dict(beta=beta, **measure(base, tokenizer, transition, task, unseen,
                                          ExactQ(transition, task, prompt_length, args.new_tokens, beta, args.top_k,
                                                 **options), **common)) for beta in args.exact_betas]

    exact = exact_sweep()
    # ARGS-style: the exact reward of the text so far, no future; what fit() must beat to show it learned any
    immediate = exact_sweep(immediate=True)
    gain_ratios(immediate, exact, base_point["reward"])
    ceiling = {}
    if getattr(args, "ceiling", False):  # the closed form's own limits: the soft value, and selection
        ceiling["soft"] = exact_sweep(soft=True)
        ceiling["best_of"] = best_of_n_curve(base, tokenizer, task, unseen, args)
        ceiling["lookahead"] = exact_sweep(immediate=True, lookahead=4)  # what lookahead labels can teach
        gain_ratios(ceiling["lookahead"], exact, base_point["reward"])
        ceiling["lookahead_headline"] = headline(ceiling["lookahead"], args.min_kl)
        for name, points in (("exact", exact), ("soft", ceiling["soft"])):
            ceiling[f"{name}_vs_best_of"] = [dict(beta=p["beta"], kl=p["kl"],
                                                  ratio=ratio_below(p, ceiling["best_of"], base_point))
                                             for p in points]
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    value_model = None
    if getattr(args, "head", "scalar") != "scalar":  # else fit()'s own default value model
        value_model = ValueModel.from_backbone(base, num_layers=min(4, base.config.num_hidden_layers),
                                               head=args.head)
    options = dict(fit_options)
    rollout_names = {option.name for option in dataclasses.fields(Rollouts)}
    rollouts = Rollouts(**{name: options.pop(name) for name in list(options) if name in rollout_names})
    prefix_names = {f"prefix_{option.name}": option.name for option in dataclasses.fields(PrefixRewards)}
    if any(name in options for name in prefix_names):  # e.g. {"prefix_increment_weight": 10}
        options["prefix_rewards"] = PrefixRewards(**{prefix_names[name]: options.pop(name)
                                                     for name in list(options) if name in prefix_names})
    value_model = fit(base, tokenizer, train, task.reward_fn(), value_model, max_new_tokens=args.new_tokens,
                      seed=args.seed, progress=False, rollouts=rollouts, **options)
    fit_seconds = time.perf_counter() - started
    # fit() standardises rewards: the model's beta is per reward std, the exact one per reward unit
    fitted = [dict(beta=beta, **measure(base, tokenizer, transition, task, unseen,
                                        VAS(value_model, beta=beta, top_k=args.top_k, outside_top_k="keep"),
                                        **common)) for beta in args.fit_betas]
    gain_ratios(fitted, exact, base_point["reward"])
    args_curve = [{"kl": 0.0, "reward": base_point["reward"]}, *immediate]  # from the base at KL 0
    for point in fitted:  # reward above the ARGS-style curve at the same KL (NaN past its last point)
        point["vs_immediate"] = point["reward"] - interpolate(args_curve, point["kl"]) \
            if point["kl"] <= max(p["kl"] for p in immediate) else float("nan")
    return {"task": task.name, "budget": budget, "samples": len(train) * fit_options.get("samples_per_prompt", 4),
            "fit_seconds": fit_seconds, "base": base_point, "exact": exact, "fitted": fitted,
            "headline": headline(fitted, args.min_kl), "immediate": immediate,
            "immediate_headline": headline(immediate, args.min_kl), **ceiling}


@torch.no_grad()
def best_of_n_curve(base, tokenizer, task: Task, prompts: list[str], args, samples: int = 32) -> list[dict]:
    """Best-of-N for N = 1, 2, 4 .. `samples`: the expected best reward of N base samples per prompt, estimated
    without bias from `samples` per prompt (the mean best of every N-subset), at KL = log N − (N − 1) / N."""
    input_ids = torch.tensor(tokenizer(prompts)["input_ids"])
    torch.manual_seed(args.seed + 1)
    output = base.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=0, top_p=1.0,
                           num_return_sequences=samples, max_new_tokens=args.new_tokens, pad_token_id=PAD)
    rewards = torch.tensor(task.rewards(output[:, input_ids.shape[1] :].tolist()), dtype=torch.float64)
    per_prompt = rewards.view(len(prompts), samples)
    curve, n = [], 1
    while n <= samples:
        curve.append(dict(n=n, kl=math.log(n) - (n - 1) / n, reward=best_of_n(per_prompt, n).mean().item()))
        n *= 2
    return curve


def ratio_below(point: dict, curve: list[dict], base_point: dict) -> float:
    """A point's gain over base sampling against Best-of-N's gain over its own N = 1 at the same KL (each gain
    from its own samples of the base); NaN past the curve's last KL."""
    if point["kl"] > max(p["kl"] for p in curve):
        return float("nan")
    gain = interpolate(curve, point["kl"]) - curve[0]["reward"]
    return (point["reward"] - base_point["reward"]) / gain if gain > 1e-9 else float("nan")


def markdown(results: list[dict], args, label: str) -> str:
    lines = [f"Value learning yardstick ({label}): bigram base, {args.new_tokens} new tokens, k = {args.top_k}, "
             f"{args.eval_prompts} unseen prompts × {args.eval_samples} samples; torch threads "
             f"{torch.get_num_threads()}.", "",
             "| task | samples | fit s | base R | exact: R at KL (β) | fit(): best ratio at KL ≥ "
             f"{args.min_kl} (β, KL, R) | fit(): every β (KL → ratio) | exact reward so far only (ARGS-style): "
             f"best ratio | fit() − ARGS-style at the headline's KL |", "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        exact = ", ".join(f"{p['reward']:.2f}@{p['kl']:.2f} ({p['beta']:g})" for p in result["exact"])
        best = result["headline"]
        best_text = (f"**{best['ratio']:.2f}** (β {best['beta']:g}, {best['kl']:.2f} nats, R {best['reward']:.2f})"
                     if best else "never reaches the KL")
        every = ", ".join(f"{p['kl']:.2f}→{p['ratio']:.2f}" for p in result["fitted"])
        args_best = result["immediate_headline"]
        args_text = f"{args_best['ratio']:.2f} ({args_best['kl']:.2f} nats)" if args_best else "never reaches the KL"
        versus = f"{best['vs_immediate']:+.3f}" if best else ""
        lines.append(f"| {result['task']} | {result['samples']} | {result['fit_seconds']:.0f} | "
                     f"{result['base']['reward']:.3f} | {exact} | {best_text} | {every} | {args_text} | {versus} |")
    ceilings = [result for result in results if "best_of" in result]
    if ceilings:
        lines += ["", "The closed form's own ceiling against Best-of-N (32 base samples per prompt, unbiased; KL "
                  "log N − (N−1)/N, an upper bound), gain ratios at each β's measured KL (blank past N = 32):", "",
                  "| task | Best-of-N: R at KL (N) | exact Q: KL → ratio to Best-of-N | exact soft Q: KL → ratio |",
                  "|---|---|---|---|"]
        for result in ceilings:
            bon = ", ".join(f"{p['reward']:.2f}@{p['kl']:.2f} ({p['n']})" for p in result["best_of"])
            cells = [", ".join(f"{p['kl']:.2f}→{p['ratio']:.2f}" for p in result[f"{name}_vs_best_of"]
                               if not math.isnan(p["ratio"])) for name in ("exact", "soft")]
            lines.append(f"| {result['task']} | {bon} | {cells[0]} | {cells[1]} |")
        lines += ["", "The exact reward so far plus one base step over its top-4 (what lookahead labels can teach, "
                  "vas_logits/lookahead.py) against the exact Q: " + ", ".join(
                      f"{result['task']} {result['lookahead_headline']['ratio']:.2f}" if result["lookahead_headline"]
                      else f"{result['task']} never reaches the KL" for result in ceilings)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["count", "lexicon", "temporal"])
    parser.add_argument("--prompts", type=int, default=256, help="training prompts at budget 1× (4 samples each)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1], help="sample budgets, × the default")
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--exact-betas", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    parser.add_argument("--fit-betas", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    parser.add_argument("--min-kl", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fit", default="{}",
                        help='fit() options as JSON, as \'{"epochs": 10}\'; Rollouts fields too: \'{"siblings": 2}\'; '
                             'PrefixRewards fields as \'{"prefix_increment_weight": 10}\' '
                             '(\'{"prefix_rewards": null}\': none)')
    parser.add_argument("--head", default="scalar", choices=["scalar", "distributional", "token"],
                        help="the value model's head (default: fit()'s own, scalar)")
    parser.add_argument("--label", default="fit() defaults")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="value_learning")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--ceiling", action="store_true",
                        help="also measure the closed form with the exact soft value, and Best-of-N")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    tokenizer, base = word_tokenizer(), bigram_base(args.seed)
    transition = transition_matrix(base)
    tasks = make_tasks(args.seed)
    fit_options = json.loads(args.fit)
    results = []
    for budget in args.budgets:
        for name in args.tasks:
            result = run_task(tasks[name], args, base, tokenizer, transition, budget, fit_options)
            results.append(result)
            best = result["headline"]
            args_best = result["immediate_headline"]
            versus = f"; ARGS-style {args_best['ratio']:.2f}" if args_best else ""
            print(f"{name} ×{budget:g}: base {result['base']['reward']:.3f}; best ratio "
                  f"{best['ratio']:.2f} at {best['kl']:.2f} nats (β {best['beta']:g}){versus}" if best else
                  f"{name} ×{budget:g}: never reaches {args.min_kl} nats{versus}", flush=True)
    table = markdown(results, args, args.label)
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{args.name}.md").write_text(table)
    (args.output / f"{args.name}.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": results},
        indent=1))
    if args.plot:
        plot(results, args.output / f"{args.name}.png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(result["task"] for result in results))
    figure, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.2 * (len(tasks) + 1), 3.6))
    for axis, name in zip(axes, tasks):
        mine = [result for result in results if result["task"] == name]
        exact = sorted(mine[0]["exact"], key=lambda p: p["kl"])
        axis.plot([0] + [p["kl"] for p in exact], [mine[0]["base"]["reward"]] + [p["reward"] for p in exact],
                  "k-o", label="exact Q")
        for result in mine:
            points = sorted(result["fitted"], key=lambda p: p["kl"])
            axis.plot([p["kl"] for p in points], [p["reward"] for p in points], "-o", ms=3,
                      label=f"fit() {result['samples']} samples")
        axis.set(title=name, xlabel="KL(pi || pi_ref), nats", ylabel="reward")
        axis.legend(fontsize=7)
    curve = axes[-1]
    for name in tasks:
        mine = sorted((result for result in results if result["task"] == name), key=lambda r: r["samples"])
        curve.plot([r["samples"] for r in mine], [r["headline"]["ratio"] if r["headline"] else float("nan")
                                                  for r in mine], "-o", label=name)
    curve.axhline(0.8, color="grey", ls="--", lw=1)
    curve.set(xscale="log", title="learning curve", xlabel="training samples", ylabel="gain ratio at equal KL")
    curve.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
