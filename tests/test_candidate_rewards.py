"""Candidate rewards: the base's top-k at every state scored, stored and resumed; the candidates appended to a
training batch are valued exactly as their own prefixes; the prefix head learns their contrasts."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import GenerationConfig

from tests.helpers import ARCHITECTURES, count_good_words, tiny_causal_lm, tiny_value_model, word_tokenizer
from tests.test_prefix_rewards import FIT, Recorder
from vas_logits import PrefixRewards, ValueModel, fit
from vas_logits.candidate_rewards import distribution_changing_settings, score_candidates
from vas_logits.prefix_rewards import score_prefixes
from vas_logits.processor import attention_layout
from vas_logits.sampling import Sample, SampleStore
from vas_logits.trainer import Trainer, additive_masks, collate, trained_states


def samples_of(tokenizer):
    texts = ["w10 w40 w10 w11", "w40 w41", "w10"]
    return [Sample(index, tokenizer(f"w{5 + index} w6")["input_ids"],
                   tokenizer(text, add_special_tokens=False)["input_ids"], float(text.split().count("w10")))
            for index, text in enumerate(texts)]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_appended_candidates_are_valued_as_their_own_prefixes_and_leave_the_sequence_unchanged(architecture):
    """V at a candidate's column of the extended batch = V(prefix ∘ a) from a plain forward, for every state, with
    right padding, sliding windows (Mistral, Qwen2) and absolute positions (GPT-2)."""
    value_model = tiny_value_model(architecture)
    samples = [Sample(0, [1, 5, 6, 7, 8], [10, 11, 12, 13, 14, 15, 16], 0.0),
               Sample(1, [1, 9], [20, 21, 2], 1.0)]
    samples = [Sample(s.prompt_index, s.prompt_ids, s.completion_ids, s.reward,
                      candidate_ids=[[30 + t, 40 + t, 50 + t] for t in range(len(s.completion_ids))],
                      candidate_rewards=[[0.0] * 3 for _ in s.completion_ids]) for s in samples]
    plain, extended = collate(samples, 0, "cpu"), collate(samples, 0, "cpu", candidates=True)
    mask = additive_masks(extended.allowed, extended.position_ids, attention_layout(value_model), value_model.dtype)
    with torch.no_grad():
        values = value_model(extended.input_ids, attention_mask=mask, position_ids=extended.position_ids).values
        real = trained_states(plain, plain.state_positions.shape[1])  # s_0 .. s_T (past s_T: padding)
        torch.testing.assert_close(values.gather(1, extended.state_positions)[real],
                                   value_model(plain.input_ids, attention_mask=plain.attention_mask).values
                                   .gather(1, plain.state_positions)[real], atol=1e-5, rtol=1e-5)
        for row, sample in enumerate(samples):
            for t, candidates in enumerate(sample.candidate_ids):
                for j, token in enumerate(candidates):
                    prefix = torch.tensor([sample.prompt_ids + sample.completion_ids[:t] + [token]])
                    expected = value_model(prefix).values[0, -1]
                    got = values[row, extended.candidate_columns[row, t, j]]
                    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert extended.candidate_valid[1].sum() == 3 * 3 and extended.candidate_valid[0].sum() == 7 * 3


def test_candidates_are_the_bases_top_k_at_every_state_scored_stored_and_reused(tmp_path):
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    samples, path, prompts = samples_of(tokenizer), tmp_path / "c.jsonl", {i: f"prompt {i}" for i in range(3)}
    reward = Recorder()
    scored = score_candidates(base, tokenizer, samples, prompts, reward, 3, path, pad_token_id=0, batch_size=2)
    for sample in scored:
        assert len(sample.candidate_ids) == len(sample.completion_ids)
        for t, (ids, rewards) in enumerate(zip(sample.candidate_ids, sample.candidate_rewards)):
            with torch.no_grad():
                logits = base(torch.tensor([sample.prompt_ids + sample.completion_ids[:t]])).logits[0, -1]
            assert ids == logits.topk(3).indices.tolist()
            texts = tokenizer.batch_decode([sample.completion_ids[:t] + [token] for token in ids],
                                           skip_special_tokens=True)
            assert rewards == count_good_words([""] * 3, texts)
    assert len(reward.seen) == 3 * (4 + 2 + 1)  # top-k at each of T states
    assert {prompt for prompt, _ in reward.seen} == set(prompts.values())
    again = Recorder()
    assert score_candidates(base, tokenizer, samples, prompts, again, 3, path, pad_token_id=0) == scored
    assert again.seen == []
    path.write_bytes(path.read_bytes()[:-10])  # the last record cut short by a crash
    assert score_candidates(base, tokenizer, samples, prompts, again, 3, path, pad_token_id=0) == scored
    assert len(again.seen) == 3 * 1  # only the last sample's one state, again
    assert all(json.loads(line) for line in path.read_text().splitlines()[-1:])


def test_candidate_probabilities_are_the_sampling_distribution_and_old_records_get_them(tmp_path):
    """p(a | s_t) of each candidate is softmax(logits / T) with generation_config.suppress_tokens removed; a record
    written before probabilities were stored gets them from a base forward, without calling the reward again."""
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    base.generation_config.suppress_tokens = [5, 6]
    samples, path, prompts = samples_of(tokenizer), tmp_path / "c.jsonl", {i: f"prompt {i}" for i in range(3)}
    scored = score_candidates(base, tokenizer, samples, prompts, Recorder(), 3, path, pad_token_id=0,
                              temperature=0.7)
    for sample in scored:
        for t, (ids, probs) in enumerate(zip(sample.candidate_ids, sample.candidate_probs)):
            with torch.no_grad():
                logits = base(torch.tensor([sample.prompt_ids + sample.completion_ids[:t]])).logits[0, -1] / 0.7
            logits[[5, 6]] = -float("inf")
            torch.testing.assert_close(torch.tensor(probs), logits.softmax(-1)[ids], atol=1e-6, rtol=1e-5)
            assert 0 < sum(probs) <= 1 + 1e-6
    old = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in record.items() if k != "probs"}) + "\n" for record in old))
    again = Recorder()
    assert score_candidates(base, tokenizer, samples, prompts, again, 3, path, pad_token_id=0,
                            temperature=0.7) == scored
    assert again.seen == []
    without = score_candidates(base, tokenizer, samples, prompts, again, 3, path, pad_token_id=0, temperature=None)
    assert all(sample.candidate_probs is None for sample in without) and again.seen == []
    batch = collate(scored, 0, "cpu", candidates=True)
    for row, sample in enumerate(scored):  # the drawn token is marked where it is among the candidates
        for t, ids in enumerate(sample.candidate_ids):
            assert batch.candidate_drawn[row, t, : len(ids)].tolist() == [i == sample.completion_ids[t] for i in ids]
            torch.testing.assert_close(batch.candidate_probs[row, t, : len(ids)], torch.tensor(
                sample.candidate_probs[t]))


def test_settings_that_change_the_sampling_distribution_are_named():
    assert distribution_changing_settings(GenerationConfig()) == {}
    assert distribution_changing_settings(GenerationConfig(repetition_penalty=1.0, no_repeat_ngram_size=0)) == {}
    changed = GenerationConfig(repetition_penalty=1.3, min_new_tokens=2, bad_words_ids=[[7]])
    assert distribution_changing_settings(changed) == {"repetition_penalty": 1.3, "min_new_tokens": 2,
                                                       "bad_words_ids": [[7]]}


@pytest.mark.parametrize("setting", [{}, {"repetition_penalty": 1.3}])
def test_fit_stores_sampling_probabilities_only_where_sampling_draws_from_them(tmp_path, caplog, setting):
    """A base whose generation_config penalises repeats samples from another distribution than softmax(logits / T):
    its candidates get no probabilities (so no control variates), and fit() says why, once."""
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    base.generation_config.update(**setting)
    prompts = [f"w{5 + i} w{40 + i}" for i in range(8)]
    with caplog.at_level("INFO", logger="vas_logits.fit"):
        fit(base, tokenizer, prompts, count_good_words, output_dir=tmp_path, **FIT)
    records = [json.loads(line) for line in (tmp_path / "candidate-rewards-top4.jsonl").read_text().splitlines()]
    assert len(records) == 8 * 2
    said = [record.getMessage() for record in caplog.records if "No control variates" in record.getMessage()]
    if setting:
        assert not any("probs" in record for record in records)
        assert len(said) == 1 and "repetition_penalty=1.3" in said[0]
    else:
        assert all(len(record["probs"]) == len(record["ids"]) for record in records) and said == []


def test_a_failing_reward_on_candidates_says_so(tmp_path):
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")

    def reward(prompts, completions):
        raise OSError("the judge is down")

    with pytest.raises(RuntimeError, match="candidate prefixes.*candidate batch 0.*kept in"):
        score_candidates(base, tokenizer, samples_of(tokenizer), {i: "p" for i in range(3)}, reward, 2,
                         tmp_path / "c.jsonl", pad_token_id=0)


def test_candidate_rewards_teach_the_contrast_between_siblings(tmp_path):
    """On count_good_words, one epoch with candidates brings V's contrasts V(s_t∘a) − V(s_{t+1}) between the top-8
    candidates and the drawn token nearer their exact r(s_t∘a) − r_{t+1} than prefix rewards alone (the tiny base's
    future barely depends on the token: 0.617 good against 0.636 other expected good words to come). Squared error
    over the variance of the exact contrasts, mean over three seeds: 0.34 with candidates, 0.54 without (the test
    that fails if the candidates' loss or their masks break)."""
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    prompts = [f"w{40 + i % 40} w{41 + i % 37}" for i in range(96)]
    errors = {0: [], 8: []}
    for seed in range(3):
        for candidates in (8, 0):
            torch.manual_seed(0)
            run = tmp_path / f"{seed}-{candidates}"
            value_model = fit(base, tokenizer, prompts, count_good_words, output_dir=run, seed=seed,
                              prefix_rewards=PrefixRewards(candidates=candidates),
                              **{**FIT, "learning_rate": 1e-2, "max_new_tokens": 8})
            if candidates:  # the training samples with their scored candidates, from this run's output_dir
                samples = score_candidates(base, tokenizer, score_prefixes(
                    tokenizer, SampleStore(run / "samples.jsonl").load(), dict(enumerate(prompts)), count_good_words,
                    run / "prefix-rewards.jsonl", progress=False), dict(enumerate(prompts)), count_good_words, 8,
                    run / "candidate-rewards-top8.jsonl", pad_token_id=0, progress=False)
                batch = collate(samples, 0, "cpu", candidates=True)
            mask = additive_masks(batch.allowed, batch.position_ids, attention_layout(value_model), value_model.dtype)
            with torch.no_grad():
                values = value_model(batch.input_ids, attention_mask=mask, position_ids=batch.position_ids).values
            values = values * value_model.config.reward_std
            rows, states, top_k = batch.candidate_columns.shape
            learned = values.gather(1, batch.candidate_columns.reshape(rows, -1)).view(rows, states, top_k) - \
                values.gather(1, batch.state_positions[:, 1:])[..., None]
            exact = (batch.candidate_rewards - batch.prefix_rewards[:, 1:, None])[batch.candidate_valid]
            errors[candidates].append(((learned[batch.candidate_valid] - exact) ** 2).mean() / (exact ** 2).mean())
    with_candidates, prefixes_only = sum(errors[8]) / 3, sum(errors[0]) / 3
    assert with_candidates < 0.85 * prefixes_only, errors


def test_bad_candidates_are_refused_by_name():
    for value in (-1, True, 2.5):
        with pytest.raises(ValueError, match="`candidates`"):
            PrefixRewards(candidates=value)
    for value in (1, "yes", None):
        with pytest.raises(ValueError, match="`control_variates`"):
            PrefixRewards(control_variates=value)
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="candidates=500.*vocabulary"):
        fit(base, tokenizer, ["w5 w6"], count_good_words, prefix_rewards=PrefixRewards(candidates=500), **FIT)
    records = [dict(prompt="w5 w6", completion="w10 w11", reward=1.0)] * 2
    with pytest.raises(ValueError, match="no reward_fn"):
        fit(None, tokenizer, samples=records, value_model=ValueModel.from_backbone(base, num_layers=1),
            prefix_rewards=PrefixRewards(candidates=2), **FIT)


def test_a_token_head_trains_on_prefix_and_candidate_labels_and_saves_one_token_head(tmp_path):
    """head="token": phi is a second token head (W, c and per-token biases) read at each state for the drawn token
    and the candidates alike; the saved model is one token head, phi + u, loaded as today's format."""
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    prompts = [f"w{5 + i} w{40 + i}" for i in range(24)]
    value_model = fit(base, tokenizer, prompts, count_good_words, ValueModel.from_backbone(base, 1, head="token"),
                      output_dir=tmp_path, keep_checkpoint=True, keep_best=False,
                      **{**FIT, "epochs": 2, "learning_rate": 1e-2})
    saved = ValueModel.from_pretrained(tmp_path / "value_model")
    assert saved.token_head and set(load_file(str(tmp_path / "value_model" / "model.safetensors"))) == \
        set(value_model.state_dict())
    u = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    phi = load_file(str(tmp_path / "checkpoint" / "prefix_head.safetensors"))
    assert set(phi) == {"head.weight", "head.bias", "token_bias"} and phi["token_bias"].abs().sum() > 0
    for key in phi:
        torch.testing.assert_close(saved.state_dict()[key], u[key] + phi[key])
    assert (tmp_path / "candidate-rewards-top4.jsonl").exists()


def test_the_token_heads_candidate_values_are_its_full_vocabulary_values_at_each_state():
    """The training loss reads Q(s_t, a) for the drawn token and the listed candidates at s_t only; those numbers
    must be the model's own Q(s_t, ·) over the whole vocabulary at that position (no appended column, no shift)."""
    tokenizer = word_tokenizer()
    value_model = tiny_value_model("llama", head="token")  # random W, c and token biases
    samples = [Sample(index, sample.prompt_ids, sample.completion_ids, sample.reward,
                      prefix_rewards=[0.0] * (len(sample.completion_ids) + 1),
                      candidate_ids=[[7 + t, 20 + index, 3] for t in range(len(sample.completion_ids))],
                      candidate_rewards=[[0.5, 1.0, -1.0]] * len(sample.completion_ids))
               for index, sample in enumerate(samples_of(tokenizer))]
    trainer = Trainer(value_model, 1e-3, 1.0, 1.0, 1.0, 0, 0, 1, None, False, False,
                      prefix_rewards=PrefixRewards(candidates=3))
    with torch.no_grad():  # phi = u's weights: then phi at the candidates must equal Q at them too
        trainer.prefix_head.load_state_dict({key: value_model.state_dict()[key]
                                             for key in ("head.weight", "head.bias", "token_bias")})
    batch = trainer.collate(samples, candidates=True)
    assert batch.candidate_columns is None and batch.input_ids.shape[1] == batch.attention_mask.shape[1]
    captured = {}
    original = trainer._prefix_losses

    def capture(batch, phi, phi_candidates, u, rewards, mask):
        captured.update(phi=phi, phi_candidates=phi_candidates, u=u)
        return original(batch, phi, phi_candidates, u, rewards, mask)

    trainer._prefix_losses = capture
    with torch.no_grad():
        trainer.losses(batch)
        every = value_model(batch.input_ids, attention_mask=batch.attention_mask).values  # (B, L, V)
    positions = batch.state_positions[:, :-1]  # (B, S − 1)
    at_states = every.gather(1, positions[..., None].expand(-1, -1, every.shape[-1]))  # (B, S − 1, V)
    expected_candidates = at_states.gather(2, batch.candidate_ids)
    valid = batch.candidate_valid
    torch.testing.assert_close(captured["phi_candidates"][valid], expected_candidates[valid])
    drawn = batch.input_ids.gather(1, positions + 1)  # (B, S − 1) the token taken at s_t
    expected_taken = at_states.gather(2, drawn[..., None]).squeeze(-1)
    taken = trained_states(batch, positions.shape[1] + 1)[:, 1:]  # V(s_{t+1}) = Q(s_t, a_t) for t < T
    torch.testing.assert_close(captured["u"][:, 1:][taken], expected_taken[taken])
    torch.testing.assert_close(captured["phi"][:, 1:][taken], expected_taken[taken])


def test_candidate_labels_teach_a_token_head_the_contrast_between_siblings(tmp_path):
    """On count_good_words, one epoch of a token head with prefix and candidate labels brings its contrasts
    Q(s_t, a) − Q(s_t, a_t) between the top-8 candidates and the drawn token nearer their exact r(s_t∘a) − r_{t+1}
    than the same epoch on the returns alone (the token head before prefix rewards applied to it). Squared error
    over the variance of the exact contrasts, mean over three seeds: 0.43 with the labels, 0.65 on the returns alone."""
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    prompts = [f"w{40 + i % 40} w{41 + i % 37}" for i in range(96)]
    errors = {"labels": [], "returns": []}
    for seed in range(3):
        for name, prefix_rewards in (("labels", PrefixRewards(candidates=8)), ("returns", None)):
            torch.manual_seed(0)
            run = tmp_path / f"{seed}-{name}"
            value_model = fit(base, tokenizer, prompts, count_good_words,
                              ValueModel.from_backbone(base, 1, head="token"), output_dir=run, seed=seed,
                              prefix_rewards=prefix_rewards, **{**FIT, "learning_rate": 1e-2, "max_new_tokens": 8})
            if name == "labels":  # the scored candidates of this run's samples, read back from its output_dir
                samples = score_candidates(base, tokenizer, score_prefixes(
                    tokenizer, SampleStore(run / "samples.jsonl").load(), dict(enumerate(prompts)), count_good_words,
                    run / "prefix-rewards.jsonl", progress=False), dict(enumerate(prompts)), count_good_words, 8,
                    run / "candidate-rewards-top8.jsonl", pad_token_id=0, progress=False)
                batch = collate(samples, 0, "cpu", candidates=True, append=False)
            with torch.no_grad():
                every = value_model(batch.input_ids, attention_mask=batch.attention_mask).values * \
                    value_model.config.reward_std  # (B, L, V) in reward units
            positions = batch.state_positions[:, :-1]
            at_states = every.gather(1, positions[..., None].expand(-1, -1, every.shape[-1]))
            drawn = batch.input_ids.gather(1, positions + 1)
            learned = at_states.gather(2, batch.candidate_ids) - at_states.gather(2, drawn[..., None])
            exact = batch.candidate_rewards - batch.prefix_rewards[:, 1:, None]
            valid = batch.candidate_valid & trained_states(batch, positions.shape[1] + 1)[:, :-1, None]
            errors[name].append((((learned - exact)[valid] ** 2).mean() / (exact[valid] ** 2).mean()).item())
    labels, returns = sum(errors["labels"]) / 3, sum(errors["returns"]) / 3
    assert labels < 0.8 * returns, errors
