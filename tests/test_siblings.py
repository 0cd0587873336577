"""Sibling rollouts (siblings.py): top-k candidates of sampled states, rolled out by the base; their returns are
Q's; only the states from the candidate on are trained; stored and resumed; bad input."""

import json
import sys
from pathlib import Path

import pytest
import torch

from vas_logits import PrefixRewards, Rollouts, fit
from vas_logits.run_dir import round_file_name, siblings_file_name
from vas_logits.sampling import Sample, SampleStore
from vas_logits.siblings import _continue, roll_out_siblings
from vas_logits.trainer import Trainer, collate

from .helpers import PAD, count_good_words, tiny_causal_lm, tiny_value_model, word_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import bench_value_learning as bench  # noqa: E402


@pytest.fixture(scope="module")
def bigram():
    base = bench.bigram_base(seed=0)
    return base, bench.word_tokenizer(), bench.transition_matrix(base), bench.make_tasks(seed=0)


def test_siblings_are_distinct_top_k_candidates_of_a_sampled_state_continued_to_full_length(bigram):
    base, tokenizer, transition, tasks = bigram
    task, new_tokens, top_k = tasks["lexicon"], 6, 5
    generator = torch.Generator().manual_seed(0)
    prompts = bench.random_prompts(6, seed=1)
    samples = [Sample(index, tokenizer(prompt)["input_ids"], torch.randint(4, 96, (new_tokens,),
                                                                            generator=generator).tolist(), 0.0)
               for index, prompt in enumerate(prompts) for _ in range(2)]
    rollouts = roll_out_siblings(base, tokenizer, samples, dict(enumerate(prompts)), task.reward_fn(),
                                 SampleStore(None), siblings=3, top_k=top_k, max_new_tokens=new_tokens,
                                 temperature=1.0, pad_token_id=PAD, prompts_per_batch=4, generate_batch_size=8, seed=0,
                                 progress=False)
    assert len(rollouts) == 3 * len(samples)
    cuts = set()
    for number, sample in enumerate(samples):
        mine = rollouts[3 * number : 3 * number + 3]
        cut = mine[0].first_state - 1
        cuts.add(cut)
        state_last = sample.completion_ids[cut - 1] if cut else sample.prompt_ids[-1]
        allowed = transition[state_last].clone()  # the special tokens are suppressed: probability 0
        top = set(allowed.topk(top_k).indices.tolist())
        candidates = [rollout.completion_ids[cut] for rollout in mine]
        assert len(set(candidates)) == 3 and set(candidates) <= top, (candidates, top)
        for rollout in mine:
            assert rollout.first_state == cut + 1 and rollout.prompt_ids == sample.prompt_ids
            assert rollout.completion_ids[:cut] == sample.completion_ids[:cut]
            assert len(rollout.completion_ids) == new_tokens  # nothing special is sampled, so never cut short
            assert rollout.reward == pytest.approx(task.rewards([rollout.completion_ids])[0])
    assert len(cuts) > 2  # the states branched from vary over the samples


def test_the_mean_return_of_a_candidates_rollouts_is_its_exact_q(bigram):
    base, tokenizer, transition, tasks = bigram
    task, new_tokens, cut, candidate = tasks["temporal"], 6, 2, 33  # a setup word: worth only what follows it
    prompt_ids = tokenizer("w5 w60 w7 w9")["input_ids"]
    sample = Sample(0, prompt_ids, [12, 70, 8, 9, 10, 11], 0.0)
    rows = [(sample, cut, candidate)] * 3000
    torch.manual_seed(0)
    completions = _continue(base, rows, new_tokens, PAD, {bench.EOS}, dict(do_sample=True, top_k=0, top_p=1.0,
                                                                          pad_token_id=PAD), batch_size=1000)
    returns = torch.tensor(task.rewards(completions), dtype=torch.float64)
    input_ids = torch.tensor([prompt_ids + sample.completion_ids[:cut]])
    exact = bench.ExactQ(transition, task, len(prompt_ids), new_tokens, beta=1.0).q_values(
        input_ids, torch.tensor([[candidate]]))[0, 0].item()
    standard_error = returns.std().item() / len(returns) ** 0.5
    assert abs(returns.mean().item() - exact) < 4 * standard_error, (returns.mean().item(), exact, standard_error)
    assert all(completion[: cut + 1] == [12, 70, candidate] for completion in completions)


def test_only_the_states_from_the_candidate_on_are_trained_on_a_sibling_rollout():
    value_model = tiny_value_model("llama")
    trainer = Trainer(value_model, 1e-3, 1.0, 1.0, 1.0, PAD, 0, 1, None, False, False)
    plain, sibling = Sample(0, [5, 6], [7, 8, 9, 10], 1.0), Sample(0, [5, 6], [7, 8, 11, 12], 2.0, first_state=3)
    _, _, _, mask = trainer.losses(collate([plain, sibling], PAD, value_model.device))
    assert mask[0].tolist() == [True] * 5
    assert mask[1].tolist() == [False, False, False, True, True]  # s_3 = s_2 ∘ candidate, and s_4


def counting(reward_fn):
    calls = []

    def reward(prompts, completions):
        calls.append(len(completions))
        return reward_fn(prompts, completions)

    return reward, calls


# no prefix rewards: these tests count the reward calls and completions of rollouts
FIT = dict(samples_per_prompt=2, max_new_tokens=4, epochs=1, batch_size=8, progress=False, seed=0, prefix_rewards=None)


def test_fit_with_siblings_stores_them_and_a_second_call_reuses_them(tmp_path):
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    prompts = [f"w{5 + i} w{40 + i}" for i in range(20)]  # 2 held out (eval_fraction 0.1)
    reward, calls = counting(count_good_words)
    fit(base, tokenizer, prompts, reward, rollouts=Rollouts(siblings=2, top_k=4), output_dir=tmp_path, **FIT)
    lines = (tmp_path / siblings_file_name(2, 4)).read_text().splitlines()
    assert len(lines) == 18 * 2 * 2  # training prompts × samples × siblings
    assert all(json.loads(line)["first_state"] >= 1 for line in lines)
    assert sum(calls) == 20 * 2 + len(lines)
    calls.clear()
    fit(base, tokenizer, prompts, reward, rollouts=Rollouts(siblings=2, top_k=4), output_dir=tmp_path,
        **{**FIT, "epochs": 2})
    assert calls == []  # the samples and the rollouts are reused


def test_rollouts_are_scored_with_the_prompt_text_the_samples_were_scored_with():
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    prompts = [f"w{5 + i}   w{40 + i} " for i in range(12)]  # spaces that decoding the ids would not give back
    seen = []

    def reward(prompt_texts, completions):
        seen.extend(prompt_texts)
        return count_good_words(prompt_texts, completions)

    fit(base, tokenizer, prompts, reward, rollouts=Rollouts(siblings=1, top_k=3, rounds=2), **FIT)
    assert len(seen) == 12 * 2 + 11 * 2 * 2 and set(seen) <= set(prompts)  # samples, siblings, round 2


@pytest.mark.parametrize("change,message", [
    (dict(siblings=-1), "`siblings` must be a non-negative integer"),
    (dict(siblings=True), "`siblings` must be a non-negative integer"),
    (dict(siblings=5, top_k=4), r"`siblings` \(5\) must be at most `top_k` \(4\)"),
    (dict(top_k=0), "`top_k` must be a positive integer"),
    (dict(rounds=0), "`rounds` must be a positive integer"),
    (dict(rollin_beta=0.0), "`rollin_beta` must be a finite number > 0"),
    (dict(rollin_beta=float("inf")), "`rollin_beta` must be a finite number > 0"),
])
def test_bad_rollout_options_are_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        Rollouts(**change)
    with pytest.raises(ValueError, match=r"`rollouts` must be a vas_logits.Rollouts \(e.g. Rollouts\(siblings=2\)\)"):
        fit(tiny_causal_lm("llama"), word_tokenizer(), ["w5 w6"], count_good_words, rollouts=change, **FIT)


@pytest.mark.parametrize("change,message", [(dict(siblings=2), "`siblings=2` needs a local transformers base model"),
                                            (dict(rounds=2), "`rounds=2` needs a local transformers base model")])
def test_siblings_and_rounds_need_a_local_base_model(change, message):
    records = [{"prompt": "w5 w6", "completion": " w7 w8", "reward": 1.0}] * 2
    with pytest.raises(ValueError, match=message):
        fit(None, word_tokenizer(), samples=records, value_model=tiny_value_model("llama"), epochs=1, progress=False,
            rollouts=Rollouts(**change))


# ---------------------------------------------------------------------- roll-in rounds (rollin.py)


def test_rounds_roll_in_with_vas_roll_out_with_the_base_and_more_rounds_continue_the_run(tmp_path):
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    prompts = [f"w{5 + i} w{40 + i}" for i in range(20)]  # 18 training prompts
    reward, calls = counting(count_good_words)
    options = dict(FIT, output_dir=tmp_path, keep_checkpoint=True)
    fit(base, tokenizer, prompts, reward, rollouts=Rollouts(siblings=1, top_k=4, rounds=2, rollin_beta=3.0), **options)
    round_two = (tmp_path / round_file_name(2, 1, 4, 3.0)).read_text().splitlines()
    assert len(round_two) == 18 * 2  # training prompts × samples per prompt × 1 rollout
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["epoch"] == 2  # 1 per round
    assert sum(calls) == 20 * 2 + 18 * 2 + len(round_two)
    calls.clear()
    more = Rollouts(siblings=1, top_k=4, rounds=3, rollin_beta=3.0)
    fit(base, tokenizer, prompts, reward, rollouts=more, **options)  # one more round, nothing redone
    assert sum(calls) == len((tmp_path / round_file_name(3, 1, 4, 3.0)).read_text().splitlines()) == 18 * 2
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["epoch"] == 3


def test_a_roll_in_is_steered_by_the_value_model(bigram):
    base, tokenizer, transition, tasks = bigram
    from vas_logits import ValueModel
    from vas_logits.rollin import RollInSampler

    value_model = ValueModel.from_backbone(base, num_layers=1)
    with torch.no_grad():  # V = 50 × [the last token is w10]: VAS at beta 1 all but forces w10 when it is top-k
        value_model.head.weight.zero_()
    hidden = value_model.backbone(input_ids=torch.tensor([[10]])).last_hidden_state[0, -1].detach()
    with torch.no_grad():
        value_model.head.weight[0] = 50 * hidden / hidden.norm() ** 2
    sampler = RollInSampler(base, tokenizer, tasks["count"].reward_fn(), value_model, beta=1.0, siblings=1, top_k=96,
                            samples_per_prompt=4, max_new_tokens=6, temperature=1.0, pad_token_id=PAD,
                            prompts_per_batch=8, generate_batch_size=32, seed=0)
    prompts = list(enumerate(bench.random_prompts(8, seed=3)))
    torch.manual_seed(0)
    roll_ins = sampler._roll_in(prompts, progress=False)
    steered = sum(sample.completion_ids.count(10) for sample in roll_ins) / len(roll_ins)
    assert steered > 3, steered  # the base alone draws w10 about 6 × 1/92 times in 6 tokens


def test_keep_best_chooses_among_the_last_rounds_epochs(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    errors = iter([1.0, 5.0])  # round 1's epoch looks better on the held-out base samples than round 2's
    monkeypatch.setattr(Trainer, "evaluate", lambda self, samples, batch_size: {
        "loss": 0.0, "error": next(errors), "correlation": 0.0})
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    prompts = [f"w{5 + i} w{40 + i}" for i in range(20)]
    value_model = fit(base, tokenizer, prompts, count_good_words, rollouts=Rollouts(rounds=2), output_dir=tmp_path,
                      keep_checkpoint=True, **{**FIT, "prefix_rewards": PrefixRewards()})
    last_epoch = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))  # u, the prefix head phi apart:
    prefix_head = load_file(str(tmp_path / "checkpoint" / "prefix_head.safetensors"))  # returned as one head
    last_epoch = {**last_epoch, "head.weight": last_epoch["head.weight"] + prefix_head["weight"],
                  "head.bias": last_epoch["head.bias"] + prefix_head["bias"]}
    assert prefix_head["weight"].abs().sum() > 0
    returned = value_model.state_dict()
    assert all(torch.equal(returned[name].cpu(), tensor) for name, tensor in last_epoch.items())
