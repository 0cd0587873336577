"""Prefix rewards: every partial completion scored, stored and resumed; V = phi + u trained and saved as one head."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import count_good_words, tiny_causal_lm, word_tokenizer
from vas_logits import PrefixRewards, ValueModel, fit
from vas_logits.prefix_rewards import score_prefixes
from vas_logits.sampling import Sample
from vas_logits.trainer import Trainer, collate

FIT = dict(samples_per_prompt=2, max_new_tokens=6, epochs=1, batch_size=4, sampling_batch_size=8, progress=False)


class Recorder:
    """count_good_words, recording every (prompt, completion) it scores."""

    def __init__(self):
        self.seen = []

    def __call__(self, prompts, completions):
        self.seen += list(zip(prompts, completions))
        return count_good_words(prompts, completions)


def samples_of(tokenizer):
    texts = ["w10 w40 w10 w11", "w40 w41", "w10", "w42 w10 w10"]
    return [Sample(index, tokenizer("w5 w6")["input_ids"], tokenizer(text, add_special_tokens=False)["input_ids"],
                   float(text.split().count("w10")), first_state=2 if index == 3 else 0)
            for index, text in enumerate(texts)]


def test_every_prefix_is_scored_with_its_prompt_and_the_last_is_the_samples_own_reward(tmp_path):
    tokenizer = word_tokenizer()
    samples = samples_of(tokenizer)
    reward = Recorder()
    scored = score_prefixes(tokenizer, samples, {i: f"prompt {i}" for i in range(4)}, reward, tmp_path / "p.jsonl",
                            texts_per_call=3)
    assert scored[0].prefix_rewards == [1.0, 1.0, 1.0, 2.0, 2.0]  # r_0 (= r_1), r_1 .. r_3, r_4 = R
    assert scored[1].prefix_rewards == [0.0, 0.0, 0.0]
    assert scored[2].prefix_rewards == [1.0, 1.0]  # one token: nothing to score, r_1 = R
    assert scored[3].prefix_rewards == [0.0, 0.0, 1.0, 2.0]  # a rollout's early prefixes are scored too
    assert ("prompt 0", "w10 w40 w10") in reward.seen and ("prompt 3", "w42") in reward.seen
    assert len(reward.seen) == 3 + 1 + 0 + 2  # T − 1 per sample
    assert [sample.completion_ids for sample in scored] == [sample.completion_ids for sample in samples]


def test_stored_prefix_rewards_are_reused_and_a_line_cut_by_a_crash_is_scored_again(tmp_path):
    tokenizer = word_tokenizer()
    samples, path, prompts = samples_of(tokenizer), tmp_path / "p.jsonl", {i: "p" for i in range(4)}
    first = score_prefixes(tokenizer, samples, prompts, Recorder(), path, texts_per_call=1)
    reward = Recorder()
    assert score_prefixes(tokenizer, samples, prompts, reward, path) == first and reward.seen == []
    path.write_bytes(path.read_bytes()[:-10])  # the last record, sample 3's, cut short
    again = score_prefixes(tokenizer, samples, prompts, reward, path)
    assert again == first and len(reward.seen) == 2  # only sample 3 again
    assert all(json.loads(line) for line in path.read_text().splitlines()[-1:])  # the file reads again


def test_a_failing_reward_on_prefixes_says_so_and_keeps_what_was_scored(tmp_path):
    tokenizer = word_tokenizer()
    calls = []

    def reward(prompts, completions):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("the judge is down")
        return count_good_words(prompts, completions)

    with pytest.raises(RuntimeError, match="partial completions.*prefix batch 1.*kept in") as error:
        score_prefixes(tokenizer, samples_of(tokenizer), {i: "p" for i in range(4)}, reward, tmp_path / "p.jsonl",
                       texts_per_call=1)
    assert "the judge is down" in str(error.value.__cause__)
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 1


def test_the_prefix_head_learns_the_prefix_rewards_and_is_added_into_one_scalar_head(tmp_path):
    """phi is trained on r_t, u on the returns; the value model returned and saved is one head: V = phi + u."""
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    prompts = [f"w{5 + i} w{40 + i}" for i in range(24)]
    value_model = fit(base, tokenizer, prompts, count_good_words, output_dir=tmp_path, keep_checkpoint=True,
                      keep_best=False, **{**FIT, "epochs": 2, "learning_rate": 1e-2})  # the last epoch's phi + u
    saved = ValueModel.from_pretrained(tmp_path / "value_model")  # today's format: one scalar head
    assert set(load_file(str(tmp_path / "value_model" / "model.safetensors"))) == set(value_model.state_dict())
    u = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    phi = load_file(str(tmp_path / "checkpoint" / "prefix_head.safetensors"))
    assert phi["weight"].abs().sum() > 0 and not torch.equal(phi["weight"], torch.zeros_like(phi["weight"]))
    torch.testing.assert_close(saved.head.weight, u["head.weight"] + phi["weight"])
    torch.testing.assert_close(saved.head.bias, u["head.bias"] + phi["bias"])
    records = [json.loads(line) for line in (tmp_path / "prefix-rewards.jsonl").read_text().splitlines()]
    assert len(records) == 24 * 2 and all(len(record["rewards"]) <= 5 for record in records)


def test_starting_over_scores_the_prefixes_and_candidates_with_the_new_reward(tmp_path):
    """The scores are keyed by the tokens they score; a new reward on the same (seeded) samples must not reuse them."""
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    prompts = [f"w{5 + i} w{40 + i}" for i in range(12)]

    def fewer_good_words(prompts, completions):
        return [-reward for reward in count_good_words(prompts, completions)]

    def records():
        return {name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
                for name in ("samples.jsonl", "prefix-rewards.jsonl", "candidate-rewards-top4.jsonl")}

    fit(base, tokenizer, prompts, count_good_words, output_dir=tmp_path, **FIT)
    first = records()
    fit(base, tokenizer, prompts, fewer_good_words, output_dir=tmp_path, overwrite_output_dir=True, **FIT)
    second = records()
    completions = [[sample["completion_ids"] for sample in run["samples.jsonl"]] for run in (first, second)]
    assert completions[0] == completions[1]  # the same seeded samples
    flat = [reward for record in first["prefix-rewards.jsonl"] for reward in record["rewards"]]
    assert any(flat), "no prefix scored a good word: the test would not tell old scores from new"
    for old, new in zip(first["prefix-rewards.jsonl"], second["prefix-rewards.jsonl"], strict=True):
        assert new["rewards"] == [-reward for reward in old["rewards"]]
    for old, new in zip(first["candidate-rewards-top4.jsonl"], second["candidate-rewards-top4.jsonl"], strict=True):
        assert new["rewards"] == [[-reward for reward in state] for state in old["rewards"]]


def test_prefix_rewards_teach_a_lexicon_faster_than_returns_alone(tmp_path):
    """On count_good_words (each w10-w19 in the completion is worth 1), one epoch with prefix rewards values the
    next good word better than one without: V(s∘good) − V(s∘other) nearer the true +1 (in reward units)."""
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    prompts = [f"w{40 + i % 40} w{41 + i % 37}" for i in range(96)]
    contrasts = {}
    # prefix rewards alone: what the candidates add is test_candidate_rewards.py's
    for name, prefix_rewards in (("returns", None), ("prefixes", PrefixRewards(candidates=0))):
        torch.manual_seed(0)
        value_model = fit(base, tokenizer, prompts, count_good_words, output_dir=tmp_path / name,
                          prefix_rewards=prefix_rewards, **{**FIT, "learning_rate": 1e-2, "max_new_tokens": 8})
        good = tokenizer(["w50 w51 w12", "w50 w51 w15"], add_special_tokens=True, return_tensors="pt")
        other = tokenizer(["w50 w51 w60", "w50 w51 w70"], add_special_tokens=True, return_tensors="pt")
        with torch.no_grad():
            gap = value_model(**good).values[:, -1] - value_model(**other).values[:, -1]
        contrasts[name] = (gap.mean() * value_model.config.reward_std).item()
    assert abs(contrasts["prefixes"] - 1) < abs(contrasts["returns"] - 1), contrasts
    assert contrasts["prefixes"] > 0.3, contrasts


def test_the_prefix_loss_leaves_u_to_the_returns():
    """V's TD loss trains u with phi held fixed: with r_t equal to R everywhere, phi's gradient comes from its own
    loss only, so it is zero once phi = r_t, whatever u is."""
    value_model = ValueModel.from_backbone(tiny_causal_lm("llama"), num_layers=1)
    trainer = Trainer(value_model, 1e-3, 1.0, 1.0, 1.0, 0, 0, 1, None, False, False, prefix_rewards=PrefixRewards())
    samples = [Sample(0, [1, 5], [10, 11, 12], 2.0, prefix_rewards=[2.0] * 4)]
    with torch.no_grad():
        trainer.prefix_head.bias.fill_(2.0)  # phi = 2 = r_t at every state
        value_model.head.bias.fill_(5.0)  # u far off: V = 7, R = 2
    loss = trainer.losses(collate(samples, 0, "cpu"))[0]
    loss.backward()
    assert trainer.prefix_head.bias.grad.abs().max() < 1e-6  # no pull from V's error
    assert value_model.head.bias.grad.abs().max() > 1.0  # u takes it all


def test_bad_prefix_rewards_are_refused_by_name():
    for kwargs, name in ((dict(weight=-1.0), "weight"), (dict(increment_weight=float("nan")), "increment_weight"),
                         (dict(weight=True), "weight"), (dict(weight=0, increment_weight=0), "prefix_rewards=None")):
        with pytest.raises(ValueError, match=name):
            PrefixRewards(**kwargs)
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="`prefix_rewards` must be a vas_logits.PrefixRewards"):
        fit(base, tokenizer, ["w5 w6"], count_good_words, prefix_rewards=True, **FIT)
    distributional = ValueModel.from_backbone(base, num_layers=1, head="distributional")
    with pytest.raises(ValueError, match="head is 'distributional'.*prefix_rewards=None"):
        fit(base, tokenizer, ["w5 w6"], count_good_words, distributional, prefix_rewards=PrefixRewards(), **FIT)
    records = [dict(prompt="w5 w6", completion="w10 w11", reward=1.0)] * 2
    with pytest.raises(ValueError, match="no reward_fn to score"):
        fit(None, tokenizer, samples=records, value_model=ValueModel.from_backbone(base, num_layers=1),
            prefix_rewards=PrefixRewards(), **FIT)


def test_the_default_applies_only_where_it_can():
    """fit()'s default object: skipped (not refused) for a distributional head and for given samples."""
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    distributional = ValueModel.from_backbone(base, num_layers=1, head="distributional")
    fit(base, tokenizer, [f"w{5 + i} w6" for i in range(4)], count_good_words, distributional, **FIT)
    records = [dict(prompt=f"w{5 + i} w6", completion="w10 w11", reward=float(i)) for i in range(4)]
    fit(None, tokenizer, samples=records, value_model=ValueModel.from_backbone(base, num_layers=1), **FIT)
