"""Lookahead labels: one exact base step beyond every candidate and every drawn state, against a naive reference
of plain forwards; stored and resumed; refused where the sampling distribution is unknown; trained by fit()."""

import json
import logging

import pytest
import torch

from tests.helpers import ARCHITECTURES, count_good_words, tiny_causal_lm, word_tokenizer
from tests.test_candidate_rewards import samples_of
from tests.test_prefix_rewards import FIT, Recorder
from vas_logits import PrefixRewards, fit
from vas_logits.candidate_rewards import score_candidates
from vas_logits.lookahead import score_lookahead
from vas_logits.prefix_rewards import score_prefixes

PROMPTS = {i: f"prompt {i}" for i in range(3)}
TEMPERATURE = 0.8


def scored_samples(base, tokenizer):
    samples = score_prefixes(tokenizer, samples_of(tokenizer), PROMPTS, count_good_words, None, progress=False)
    return score_candidates(base, tokenizer, samples, PROMPTS, count_good_words, 3, None, pad_token_id=0,
                            temperature=TEMPERATURE, progress=False)


def naive_lookahead(base, tokenizer, sample, tokens, final, max_new_tokens):
    """l(s_t∘a) from a plain forward of prompt ∘ completion[:t] ∘ a: r(s_t∘a) + sum over the base's top-3 next
    tokens b of p(b) (r(s_t∘a∘b) − r(s_t∘a)), or r(s_t∘a) where nothing follows."""
    reward = count_good_words([""], tokenizer.batch_decode([tokens], skip_special_tokens=True))[0]
    if tokens[-1] in final or len(tokens) >= max_new_tokens:
        return reward
    with torch.no_grad():
        logits = base(torch.tensor([sample.prompt_ids + tokens])).logits[0, -1]
    top = logits.topk(3).indices.tolist()
    probs = (logits / TEMPERATURE).softmax(-1)[top].tolist()
    after = count_good_words([""] * 3, tokenizer.batch_decode([tokens + [b] for b in top], skip_special_tokens=True))
    return reward + sum(p * (r - reward) for p, r in zip(probs, after))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_lookahead_labels_are_one_exact_base_step_beyond_every_candidate_and_state(architecture, tmp_path):
    """Every candidate's label and every drawn state's level against plain forwards, with right padding, sliding
    windows and absolute positions; a candidate that ends generation (EOS) or reaches max_new_tokens keeps r."""
    tokenizer, base = word_tokenizer(), tiny_causal_lm(architecture)
    samples = scored_samples(base, tokenizer)
    base.generation_config.eos_token_id = [2, samples[1].candidate_ids[0][1]]  # one candidate that ends it
    max_new_tokens = 4  # the first sample (4 tokens) was cut there
    lifted = score_lookahead(base, tokenizer, samples, PROMPTS, count_good_words, max_new_tokens,
                             tmp_path / "l.jsonl", pad_token_id=0, temperature=TEMPERATURE, batch_size=2)
    final = {2, samples[1].candidate_ids[0][1]}
    followed = 0
    for sample, new in zip(samples, lifted):
        assert new.candidate_ids == sample.candidate_ids and new.candidate_probs == sample.candidate_probs
        for t, tokens in enumerate(sample.candidate_ids):
            for j, token in enumerate(tokens):
                prefix = sample.completion_ids[:t] + [token]
                expected = naive_lookahead(base, tokenizer, sample, prefix, final, max_new_tokens)
                assert new.candidate_rewards[t][j] == pytest.approx(expected, abs=1e-5)
                followed += token not in final and t + 1 < max_new_tokens
            if 0 < t:  # the drawn state's level, from the candidates already scored there
                level = sample.prefix_rewards[t]
                assert new.prefix_rewards[t] == pytest.approx(level + sum(
                    p * (r - level) for p, r in zip(sample.candidate_probs[t], sample.candidate_rewards[t])))
            if t + 1 < len(sample.completion_ids) and sample.completion_ids[t] in tokens:  # the drawn candidate
                drawn = tokens.index(sample.completion_ids[t])  # is the next state: the same label both ways
                assert new.candidate_rewards[t][drawn] == pytest.approx(new.prefix_rewards[t + 1], abs=1e-5)
        assert new.prefix_rewards[-1] == sample.prefix_rewards[-1] == sample.reward  # nothing follows s_T
    assert followed > 0 and any(new.candidate_rewards != old.candidate_rewards for new, old in zip(lifted, samples))


def test_lookahead_labels_are_stored_and_reused(tmp_path):
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    samples, path = scored_samples(base, tokenizer), tmp_path / "l.jsonl"
    first = Recorder()
    lifted = score_lookahead(base, tokenizer, samples, PROMPTS, first, 6, path, 0, TEMPERATURE, batch_size=2)
    assert len(first.seen) == 3 * 3 * (4 + 2 + 1)  # k continuations of k candidates at each of T states
    again = Recorder()
    assert score_lookahead(base, tokenizer, samples, PROMPTS, again, 6, path, 0, TEMPERATURE) == lifted
    assert again.seen == []
    path.write_bytes(path.read_bytes()[:-10])  # the last record cut short by a crash
    assert score_lookahead(base, tokenizer, samples, PROMPTS, again, 6, path, 0, TEMPERATURE) == lifted
    assert len(again.seen) == 3 * 3 * 1  # only the last sample's one state, again
    assert all(json.loads(line) for line in path.read_text().splitlines()[-1:])


def test_fit_trains_on_lookahead_labels_and_skips_them_where_sampling_is_not_the_bases(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vas_logits")
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    prompts = ["w5 w6", "w7 w8"]
    fit(base, tokenizer, prompts, count_good_words, output_dir=tmp_path / "run",
        prefix_rewards=PrefixRewards(candidates=3, lookahead=True), **FIT)
    records = [json.loads(line) for line in (tmp_path / "run" / "lookahead-top3.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(len(row) == 3 for record in records for row in record["values"])
    fit(base, tokenizer, prompts, count_good_words, output_dir=tmp_path / "run", overwrite_output_dir=True,
        prefix_rewards=PrefixRewards(candidates=3, lookahead=False), **FIT)
    assert not (tmp_path / "run" / "lookahead-top3.jsonl").exists()  # overwriting removes them with the samples
    base.generation_config.update(repetition_penalty=1.3)
    fit(base, tokenizer, prompts, count_good_words, output_dir=tmp_path / "penalised",
        prefix_rewards=PrefixRewards(candidates=3, lookahead=True), **FIT)
    assert "No lookahead labels: repetition_penalty=1.3" in caplog.text
    assert not (tmp_path / "penalised" / "lookahead-top3.jsonl").exists()


@pytest.mark.parametrize("options, named", [
    (dict(lookahead="yes"), "lookahead"),
    (dict(lookahead=1), "lookahead"),
])
def test_bad_lookahead_is_refused_by_name(options, named):
    with pytest.raises(ValueError, match=f"`{named}`"):
        PrefixRewards(**options)


def test_fit_defaults_to_lookahead_labels_and_candidates_0_turns_them_off(tmp_path):
    """Lookahead labels are fit()'s default (round 20); without candidates there is nothing to look ahead
    with, so PrefixRewards(candidates=0) neither scores them nor records them in its settings."""
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    prompts = ["w5 w6", "w7 w8"]
    fit(base, tokenizer, prompts, count_good_words, output_dir=tmp_path / "default", **FIT)
    assert (tmp_path / "default" / "lookahead-top4.jsonl").exists()
    assert PrefixRewards().settings()["prefix_lookahead"] is True
    assert "prefix_lookahead" not in PrefixRewards(candidates=0).settings()
    fit(base, tokenizer, prompts, count_good_words, output_dir=tmp_path / "no-candidates",
        prefix_rewards=PrefixRewards(candidates=0), **FIT)
    assert not list((tmp_path / "no-candidates").glob("lookahead-*.jsonl"))
