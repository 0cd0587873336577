"""examples/bench_value_learning.py: its exact Q is exact, and fit() keeps learning what it can learn there."""

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import bench_value_learning as bench  # noqa: E402


@pytest.fixture(scope="module")
def setting():
    base = bench.bigram_base(seed=0)
    return base, bench.word_tokenizer(), bench.transition_matrix(base), bench.make_tasks(seed=0)


def brute_force_q(transition, task, prefix, candidate, new_tokens, soft_beta=None):
    """E[R | completion starts with prefix + [candidate]], summing over every continuation; with soft_beta the
    soft value (1/beta) log E[exp(beta R) | ...]."""
    remaining = new_tokens - len(prefix) - 1
    total = 0.0
    for rest in itertools.product(bench.WORDS, repeat=remaining):
        completion = [*prefix, candidate, *rest]
        probability, previous = 1.0, candidate
        for token in rest:
            probability *= float(transition[previous, token])
            previous = token
        reward = task.rewards([completion])[0]
        total += probability * (reward if soft_beta is None else math.exp(soft_beta * reward))
    return total if soft_beta is None else math.log(total) / soft_beta


@pytest.mark.parametrize("task_name", ["count", "lexicon", "temporal"])
@pytest.mark.parametrize("generated", [0, 1, 2])
@pytest.mark.parametrize("soft", [False, True])
def test_exact_q_equals_the_sum_over_every_continuation(setting, task_name, generated, soft):
    base, tokenizer, transition, tasks = setting
    task, new_tokens, beta = tasks[task_name], 3, 1.7
    prompt = tokenizer(["w5 w60 w7 w33"], return_tensors="pt")["input_ids"]
    prefix = [32, 50][:generated]  # a setup word first: the temporal reward's both states are reached
    input_ids = torch.cat([prompt, torch.tensor([prefix], dtype=torch.long)], dim=1)
    processor = bench.ExactQ(transition, task, prompt.shape[1], new_tokens, beta=beta, soft=soft)
    candidates = torch.tensor([[11, 40, 95, 33]])
    q = processor.q_values(input_ids, candidates)[0]
    for value, candidate in zip(q.tolist(), candidates[0].tolist()):
        expected = brute_force_q(transition, task, prefix, candidate, new_tokens, beta if soft else None)
        assert value == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("task_name", ["count", "lexicon", "temporal"])
def test_the_immediate_q_is_the_reward_of_the_text_so_far(setting, task_name):
    """ARGS-style decoding's Q: the exact reward of prefix + [candidate], no future (for temporal, a setup
    candidate earns nothing and a payoff one 1 after a setup word)."""
    base, tokenizer, transition, tasks = setting
    task = tasks[task_name]
    prompt = tokenizer(["w5 w60 w7 w33"], return_tensors="pt")["input_ids"]
    candidates = torch.tensor([[11, 40, 95, 33]])
    for prefix in ([], [32], [32, 41], [50]):
        input_ids = torch.cat([prompt, torch.tensor([prefix], dtype=torch.long).view(1, -1)], dim=1)
        immediate = bench.ExactQ(transition, task, prompt.shape[1], 4, beta=1.0, immediate=True)
        q = immediate.q_values(input_ids, candidates)[0].tolist()
        assert q == pytest.approx(task.rewards([[*prefix, c] for c in candidates[0].tolist()]), abs=1e-12)
        full = bench.ExactQ(transition, task, prompt.shape[1], 4, beta=1.0).q_values(input_ids, candidates)[0]
        assert not torch.allclose(full, torch.tensor(q, dtype=torch.float64))  # the future is not zero here


@pytest.mark.parametrize("task_name", ["count", "lexicon", "temporal"])
def test_the_lookahead_q_is_the_reward_one_base_step_on_over_its_top_k(setting, task_name):
    """ExactQ(immediate=True, lookahead=4): r(s∘a) + sum over the base's top-4 next tokens b of P[a, b] ·
    (r(s∘a∘b) − r(s∘a)), by enumeration; nothing follows the last token."""
    base, tokenizer, transition, tasks = setting
    task, new_tokens = tasks[task_name], 4
    prompt = tokenizer(["w5 w60 w7 w33"], return_tensors="pt")["input_ids"]
    candidates = torch.tensor([[11, 40, 95, 33]])
    for prefix in ([], [32], [32, 41], [50, 31, 40]):
        input_ids = torch.cat([prompt, torch.tensor([prefix], dtype=torch.long).view(1, -1)], dim=1)
        processor = bench.ExactQ(transition, task, prompt.shape[1], new_tokens, beta=1.0, immediate=True,
                                 lookahead=4)
        q = processor.q_values(input_ids, candidates)[0].tolist()
        for value, candidate in zip(q, candidates[0].tolist()):
            reward = task.rewards([[*prefix, candidate]])[0]
            expected = reward
            if len(prefix) + 1 < new_tokens:
                for b in transition[candidate].topk(4).indices.tolist():
                    expected += float(transition[candidate, b]) * (task.rewards([[*prefix, candidate, b]])[0] - reward)
            assert value == pytest.approx(expected, abs=1e-9)


def test_the_base_is_context_free_and_every_completion_has_the_full_length(setting):
    base, tokenizer, transition, tasks = setting
    assert torch.allclose(transition.sum(-1), torch.ones(bench.VOCAB_SIZE, dtype=torch.float64))
    point = bench.measure(base, tokenizer, transition, tasks["count"], bench.random_prompts(4, seed=3), None,
                          new_tokens=5, samples_per_prompt=2, seed=0)
    assert abs(point["kl"]) < 1e-6  # the base against itself: the KL estimator reads 0


def test_the_exact_processor_raises_the_reward_and_its_kl_grows_with_beta(setting):
    base, tokenizer, transition, tasks = setting
    prompts = bench.random_prompts(16, seed=4)
    prompt_length = len(tokenizer(prompts[0])["input_ids"])
    points = [bench.measure(base, tokenizer, transition, tasks["lexicon"], prompts,
                            bench.ExactQ(transition, tasks["lexicon"], prompt_length, 6, beta) if beta else None,
                            new_tokens=6, samples_per_prompt=4, seed=0) for beta in (0, 1, 4)]
    assert points[0]["reward"] < points[1]["reward"] < points[2]["reward"]
    assert points[0]["kl"] < points[1]["kl"] < points[2]["kl"]


def small_yardstick(task_name, budget=1.0, prompts=128, fit_betas=(1, 2, 4)):
    import argparse

    args = argparse.Namespace(prompts=prompts, eval_prompts=32, eval_samples=8, new_tokens=8, top_k=10,
                              exact_betas=[0.5, 1, 2, 4, 8], fit_betas=list(fit_betas), min_kl=0.5, seed=0)
    base = bench.bigram_base(seed=0)
    return bench.run_task(bench.make_tasks(seed=0)[task_name], args, base, bench.word_tokenizer(),
                          bench.transition_matrix(base), budget, fit_options={})


@pytest.mark.parametrize("task_name", ["count", "lexicon"])
def test_fit_at_its_defaults_captures_most_of_the_exact_gain(task_name):
    """fit() with no tuned options on 512 samples: measured 0.96 (count) and 0.97 (lexicon) of the exact-Q
    gain at equal KL (0.5-4.6 nats; round 20's defaults, 0.92 and 0.95 before); with the old fixed learning rate
    of 5e-5, KL stays below 0.1 nats."""
    torch.set_num_threads(1)
    result = small_yardstick(task_name)
    best = result["headline"]
    assert best is not None, result["fitted"]  # some beta <= 4 moves the policy at least 0.5 nats
    assert best["ratio"] >= 0.8, best


def test_fit_at_its_defaults_learns_credit_across_time():
    """The temporal task (a payoff word scores only after a setup word) on fit()'s default 1,024 samples:
    measured 0.76 of the exact-Q gain at round 20's defaults (lookahead labels, 5 epochs; 0.62-0.76 over β = 1-8;
    0.73 before, and over the full yardstick's ten seeds 0.82 against 0.64); at round 11's learning rate
    (0.03 / width) 0.44, so a change that slows value learning fails here."""
    torch.set_num_threads(1)
    result = small_yardstick("temporal", prompts=256, fit_betas=(1, 2, 4, 8))
    best = result["headline"]
    assert best is not None, result["fitted"]
    assert best["ratio"] >= 0.62, best


def test_best_of_n_is_the_mean_best_of_every_subset(setting):
    import argparse

    base, tokenizer, transition, tasks = setting
    args = argparse.Namespace(seed=0, new_tokens=4)
    curve = bench.best_of_n_curve(base, tokenizer, tasks["lexicon"], ["w5 w6", "w7 w8"], args, samples=8)
    input_ids = torch.tensor(tokenizer(["w5 w6", "w7 w8"])["input_ids"])
    torch.manual_seed(1)  # the curve's own draw, repeated
    output = base.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=0,
                           top_p=1.0, num_return_sequences=8, max_new_tokens=4, pad_token_id=bench.PAD)
    rewards = torch.tensor(tasks["lexicon"].rewards(output[:, input_ids.shape[1]:].tolist())).view(2, 8)
    for point in curve:
        subsets = list(itertools.combinations(range(8), point["n"]))
        expected = sum(max(row[list(subset)].tolist()) for row in rewards for subset in subsets) / (2 * len(subsets))
        assert point["reward"] == pytest.approx(expected, abs=1e-6)
        assert point["kl"] == pytest.approx(math.log(point["n"]) - (point["n"] - 1) / point["n"])
    assert [point["n"] for point in curve] == [1, 2, 4, 8]
