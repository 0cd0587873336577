"""fit(): TD(lambda) targets, learning a synthetic reward, the frozen base, resuming, failures, two processes."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vas_logits import VAS, PrefixRewards, ValueModel, fit, td_lambda_targets
from vas_logits.targets import control_variates
from vas_logits.trainer import Trainer, collate

from .helpers import PAD, count_good_words, tiny_causal_lm, tiny_config, word_tokenizer


def random_prompts(count, seed=0, words=4):
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(4, 96, (words,), generator=generator)) for _ in range(count)]


# ---------------------------------------------------------------------- TD(lambda)


def hand_written_targets(values, reward, length, gamma, lam, step_rewards=None):
    """One episode, straight from the definitions: states 0..T, reward on the last transition (plus any step
    rewards on each), s_T terminal."""
    targets = [0.0] * len(values)
    advantage = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        r = (reward if t == length - 1 else 0.0) + (step_rewards[t] if step_rewards is not None else 0.0)
        delta = r + gamma * next_value - values[t]
        advantage = delta + gamma * lam * advantage
        targets[t] = advantage + values[t]
    targets[length] = reward
    return targets


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_td_lambda_targets_match_a_hand_written_loop(lam, gamma):
    torch.manual_seed(0)
    lengths = torch.tensor([1, 3, 6, 6, 2])  # short and long episodes, some ending in EOS, some cut
    values = torch.randn(5, 7)
    rewards = torch.randn(5)
    targets = td_lambda_targets(values, rewards, lengths, gamma=gamma, lam=lam)
    for row in range(5):
        length = int(lengths[row])
        expected = hand_written_targets(values[row].tolist(), float(rewards[row]), length, gamma, lam)
        assert torch.allclose(targets[row, : length + 1], torch.tensor(expected[: length + 1]), atol=1e-5)


@pytest.mark.parametrize("lam", [0.0, 0.7, 1.0])
def test_td_lambda_targets_with_step_rewards_match_the_hand_written_loop(lam):
    torch.manual_seed(1)
    lengths, values, rewards = torch.tensor([1, 4, 6]), torch.randn(3, 7), torch.randn(3)
    steps = torch.randn(3, 7)
    targets = td_lambda_targets(values, rewards, lengths, gamma=1.0, lam=lam, step_rewards=steps)
    for row in range(3):
        length = int(lengths[row])
        expected = hand_written_targets(values[row].tolist(), float(rewards[row]), length, 1.0, lam,
                                        steps[row].tolist())
        assert torch.allclose(targets[row, : length + 1], torch.tensor(expected[: length + 1]), atol=1e-5)
    if lam == 1.0:  # the Monte-Carlo return plus the step rewards still to come
        suffix = steps[1, :4].flip(0).cumsum(0).flip(0)
        assert torch.allclose(targets[1, :4], rewards[1] + suffix, atol=1e-5)


def test_control_variates_have_mean_zero_under_the_sampling_distribution():
    """E over the drawn token a ~ p (the whole vocabulary, top-k or not) of c_t is exactly 0, whatever the
    estimates and the baseline; a single draw's c_t is not."""
    torch.manual_seed(2)
    vocab, top_k = 7, 3
    probabilities = torch.randn(vocab).softmax(-1).double()
    candidates = probabilities.topk(top_k).indices
    estimates, baseline = torch.randn(1, 1, top_k).double(), torch.randn(1, 1).double()
    valid = torch.ones(1, 1, top_k, dtype=torch.bool)
    expectation = torch.zeros((), dtype=torch.float64)
    draws = []
    for token in range(vocab):
        drawn = (candidates == token)[None, None, :]
        c = control_variates(estimates, probabilities[candidates][None, None, :], drawn, valid, baseline)
        assert c.shape == (1, 2) and c[0, 1] == 0  # nothing after the last state
        expectation += probabilities[token] * c[0, 0].double()
        draws.append(float(c[0, 0]))
    assert abs(float(expectation)) < 1e-6
    assert max(abs(value) for value in draws) > 0.05
    # at a state past the episode's end (not valid) there is no correction
    assert control_variates(estimates, probabilities[candidates][None, None, :], valid, ~valid, baseline).eq(0).all()


def test_td_lambda_one_is_the_monte_carlo_return_and_zero_bootstraps():
    values, rewards, lengths = torch.randn(2, 5), torch.tensor([2.0, -1.0]), torch.tensor([4, 2])
    monte_carlo = td_lambda_targets(values, rewards, lengths, gamma=1.0, lam=1.0)
    assert torch.allclose(monte_carlo[0], torch.full((5,), 2.0))
    assert torch.allclose(monte_carlo[1, :3], torch.full((3,), -1.0))
    bootstrap = td_lambda_targets(values, rewards, lengths, gamma=1.0, lam=0.0)
    assert torch.allclose(bootstrap[0, :3], values[0, 1:4]) and bootstrap[0, 3] == 2.0 and bootstrap[0, 4] == 2.0


def test_td_lambda_rejects_bad_lengths():
    with pytest.raises(ValueError, match="length"):
        td_lambda_targets(torch.zeros(1, 3), torch.zeros(1), torch.tensor([3]))


# ---------------------------------------------------------------------- learning


@torch.no_grad()
def mean_reward(base, tokenizer, prompts, processors, seed=0):
    input_ids = torch.tensor(tokenizer(prompts)["input_ids"])
    torch.manual_seed(seed)
    output = base.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=0,
                           max_new_tokens=16, pad_token_id=PAD, eos_token_id=None, logits_processor=processors)
    completions = tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
    return sum(count_good_words(prompts, completions)) / len(completions)


@pytest.mark.slow
def test_fit_then_vas_raises_the_reward_several_fold_on_unseen_prompts():
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    prompts = random_prompts(320)
    train, unseen = prompts[:256], prompts[256:]  # 64 unseen prompts: a mean over 1,024 tokens
    value_model = fit(base, tokenizer, train, count_good_words, samples_per_prompt=4, max_new_tokens=16, epochs=10,
                      batch_size=16, learning_rate=3e-3, progress=False)
    assert value_model.config.reward == "count_good_words" and value_model.config.pad_token_id == PAD
    without = mean_reward(base, tokenizer, unseen, [VAS(value_model, beta=0.0, top_k=20)])
    steered = mean_reward(base, tokenizer, unseen, [VAS(value_model, beta=10.0, top_k=20)])
    assert steered >= 3 * without, (without, steered)  # measured: 1.92 -> 7.34


def test_the_base_model_is_left_as_it_was():
    tokenizer, base = word_tokenizer(), tiny_causal_lm("gpt2")
    base.train()
    base.transformer.wte.weight.requires_grad_(False)
    before = {key: tensor.clone() for key, tensor in base.state_dict().items()}
    flags = {name: parameter.requires_grad for name, parameter in base.named_parameters()}
    fit(base, tokenizer, random_prompts(8), count_good_words, samples_per_prompt=2, max_new_tokens=4, epochs=1,
        batch_size=4, learning_rate=1e-2, progress=False)
    assert base.training
    assert flags == {name: parameter.requires_grad for name, parameter in base.named_parameters()}
    assert all(parameter.grad is None for parameter in base.parameters())
    for key, tensor in base.state_dict().items():
        assert torch.equal(tensor, before[key]), key


# ---------------------------------------------------------------------- nothing is lost


class CountingReward:
    def __init__(self, fail_on_call=None):
        self.calls, self.fail_on_call = 0, fail_on_call

    def __call__(self, prompts, completions):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("the judge is down")
        return count_good_words(prompts, completions)


FIT_OPTIONS = dict(samples_per_prompt=2, max_new_tokens=6, batch_size=4, sampling_batch_size=4, learning_rate=1e-2,
                   progress=False)
NO_PREFIXES = dict(FIT_OPTIONS, prefix_rewards=None)  # for tests that count reward calls made while sampling


def test_resuming_continues_from_the_checkpoint_without_resampling(tmp_path):
    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(12)
    straight = fit(base, tokenizer, prompts, CountingReward(), epochs=2, output_dir=tmp_path / "a", **FIT_OPTIONS)
    fit(base, tokenizer, prompts, CountingReward(), epochs=1, output_dir=tmp_path / "b", keep_checkpoint=True,
        **FIT_OPTIONS)
    reward = CountingReward()
    resumed = fit(base, tokenizer, prompts, reward, epochs=2, output_dir=tmp_path / "b", keep_checkpoint=True,
                  **FIT_OPTIONS)
    assert reward.calls == 0  # the stored samples were reused
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["epoch"] == 2
    assert not (tmp_path / "a" / "checkpoint").exists()  # removed once the final model was saved (the default)
    for (key, tensor), (_, other) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(tensor, other, atol=1e-6), key
    loaded = ValueModel.from_pretrained(tmp_path / "b" / "value_model")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), resumed.state_dict().values()))


def test_ctrl_c_writes_a_checkpoint_and_fit_resumes_from_it(tmp_path, monkeypatch):
    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(12)
    original, calls = Trainer.losses, {"count": 0}

    def interrupted(self, batch):
        calls["count"] += 1
        if calls["count"] == 4:  # call 1 is fit()'s dry-run step before sampling; 4 is the third training step
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Trainer, "losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(base, tokenizer, prompts, CountingReward(), epochs=2, output_dir=tmp_path, **FIT_OPTIONS)
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert {key: state[key] for key in ("epoch", "samples_in_epoch", "global_step", "best_error")} == {
        "epoch": 0, "samples_in_epoch": 2 * FIT_OPTIONS["batch_size"], "global_step": 2, "best_error": None}
    assert state["training"]["lam"] == 1.0 and state["training"]["batch_size"] == FIT_OPTIONS["batch_size"]
    monkeypatch.setattr(Trainer, "losses", original)
    reward = CountingReward()
    fit(base, tokenizer, prompts, reward, epochs=2, output_dir=tmp_path, keep_checkpoint=True, **FIT_OPTIONS)
    assert reward.calls == 0
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["epoch"] == 2


def test_a_value_model_that_cannot_train_fails_before_any_sampling(tmp_path):
    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(12)
    value_model = ValueModel.from_backbone(base, num_layers=1)
    value_model.requires_grad_(False)  # nothing to train: the backward pass fails (only the prefix head learns)
    reward = CountingReward()
    for prefix_rewards, cause in ((None, "does not require grad"), (PrefixRewards(), "received a gradient")):
        with pytest.raises(RuntimeError, match="dummy batch failed before sampling") as error:
            fit(base, tokenizer, prompts, reward, value_model, epochs=1, output_dir=tmp_path, **FIT_OPTIONS,
                prefix_rewards=prefix_rewards)
        assert cause in str(error.value.__cause__)
    assert reward.calls == 0 and not (tmp_path / "samples.jsonl").exists()


def test_the_dry_run_step_leaves_weights_gradients_and_mode_as_they_were():
    base = tiny_causal_lm("qwen2")
    value_model = ValueModel.from_backbone(base, num_layers=1, head="distributional")
    value_model.eval()
    before = {key: tensor.clone() for key, tensor in value_model.state_dict().items()}
    trainer = Trainer(value_model, 1e-2, 1.0, 1.0, 1.0, PAD, 0, 1, None, False, True)
    trainer.check_step()
    assert not value_model.training
    assert all(parameter.grad is None for parameter in value_model.parameters())
    assert all(torch.equal(tensor, before[key]) for key, tensor in value_model.state_dict().items())


def test_a_crash_after_sampling_leaves_the_samples_for_the_next_call(tmp_path, monkeypatch):
    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(12)
    original, crashed = Trainer.losses, {"done": False}

    def incompatible(self, batch):  # as a transformers release that breaks only the full training batches would
        if self.model.training and len(batch.rewards) == FIT_OPTIONS["batch_size"] and not crashed["done"]:
            crashed["done"] = True
            raise TypeError("unexpected keyword argument 'cache'")
        return original(self, batch)

    monkeypatch.setattr(Trainer, "losses", incompatible)
    with pytest.raises(TypeError, match="cache"):
        fit(base, tokenizer, prompts, CountingReward(), epochs=1, output_dir=tmp_path, **FIT_OPTIONS)
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 12 * 2
    reward = CountingReward()
    fit(base, tokenizer, prompts, reward, epochs=1, output_dir=tmp_path, **FIT_OPTIONS)
    assert reward.calls == 0  # every sample was reused
    assert (tmp_path / "value_model" / "model.safetensors").exists()


def test_a_failing_reward_keeps_earlier_samples_and_names_the_batch(tmp_path):
    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(12)
    with pytest.raises(RuntimeError, match="sampling batch 2") as error:
        fit(base, tokenizer, prompts, CountingReward(fail_on_call=3), epochs=1, output_dir=tmp_path, **NO_PREFIXES)
    assert "the judge is down" in str(error.value.__cause__)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * 2  # two batches of two prompts, two samples each
    reward = CountingReward()
    fit(base, tokenizer, prompts, reward, epochs=1, output_dir=tmp_path, **NO_PREFIXES)
    assert reward.calls == 4  # only the 8 prompts not sampled yet, two per batch
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 12 * 2


def test_sampling_batch_size_sets_the_completions_per_generate_call(tmp_path):
    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(12)
    reward = CountingReward()
    fit(base, tokenizer, prompts, reward, epochs=1, output_dir=tmp_path, **{**NO_PREFIXES, "sampling_batch_size": 8})
    assert reward.calls == 3  # 12 prompts, 4 per call (8 completions); training batches stay at 4
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 12 * 2


def test_samples_of_other_prompts_reward_or_settings_are_never_reused(tmp_path):
    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(12)
    fit(base, tokenizer, prompts, CountingReward(), epochs=1, output_dir=tmp_path, **NO_PREFIXES)

    def other_reward(prompts, completions):
        return [1.0] * len(completions)

    changes = [
        (dict(prompts=random_prompts(12, seed=1)), "prompts: stored '12 prompts, sha256"),
        (dict(reward_fn=other_reward), r"reward: stored 'tests\.test_fit\.CountingReward', now .*other_reward"),
        (dict(max_new_tokens=5), "max_new_tokens: stored 6, now 5"),
        (dict(base_model=tiny_causal_lm("gpt2")), "base_model: stored"),
    ]
    for change, message in changes:
        arguments = dict(base_model=base, tokenizer=tokenizer, prompts=prompts, reward_fn=CountingReward(),
                         output_dir=tmp_path, epochs=1, **NO_PREFIXES)
        arguments.update(change)
        with pytest.raises(ValueError, match=f"other settings.*{message}.*overwrite_output_dir=True"):
            fit(**arguments)
    reward = CountingReward()
    fit(base, tokenizer, random_prompts(12, seed=1), reward, epochs=1, output_dir=tmp_path, overwrite_output_dir=True,
        **NO_PREFIXES)
    assert reward.calls == 6  # sampled afresh
    (tmp_path / "sampling.json").unlink()  # as written by vas_logits 0.1: samples with no record
    with pytest.raises(ValueError, match="without a record"):
        fit(base, tokenizer, prompts, CountingReward(), epochs=1, output_dir=tmp_path, **NO_PREFIXES)


def test_a_samples_file_cut_mid_line_is_repaired_and_the_prompt_sampled_again(tmp_path):
    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(12)
    with pytest.raises(RuntimeError):
        fit(base, tokenizer, prompts, CountingReward(fail_on_call=3), epochs=1, output_dir=tmp_path, **NO_PREFIXES)
    samples_file = tmp_path / "samples.jsonl"
    data = samples_file.read_bytes()
    samples_file.write_bytes(data[:-25])  # a crash while writing the last line
    last_prompt = json.loads(data.decode().splitlines()[-1])["prompt_index"]
    reward = CountingReward()
    fit(base, tokenizer, prompts, reward, epochs=1, output_dir=tmp_path, **NO_PREFIXES)
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]  # every line parses
    assert len(samples) == 12 * 2
    counts = {index: sum(s["prompt_index"] == index for s in samples) for index in range(12)}
    assert counts == dict.fromkeys(range(12), 2)
    assert reward.calls == 5  # the 8 prompts never sampled and the one whose sample was cut, two per call
    assert last_prompt in counts


def rename_that_fails(after: int):
    """Path.rename that raises KeyboardInterrupt from its `after`-th call on (a Ctrl-C during a checkpoint swap)."""
    original, calls = Path.rename, {"count": 0}

    def rename(self, target):
        calls["count"] += 1
        if calls["count"] >= after:
            raise KeyboardInterrupt
        return original(self, target)

    return rename


@pytest.mark.parametrize("fail_from", ["rename 2", "rename 3", "training_state"])
def test_an_interrupt_at_any_point_of_the_checkpoint_swap_resumes(tmp_path, monkeypatch, fail_from):
    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(12)
    straight = fit(base, tokenizer, prompts, CountingReward(), epochs=2, output_dir=tmp_path / "a", **FIT_OPTIONS)
    # The first save (epoch 1) renames once; the second (epoch 2) renames checkpoint -> old, partial -> checkpoint.
    with monkeypatch.context() as patch:
        if fail_from == "training_state":  # the second save dies while writing its folder
            original_save, saves = torch.save, {"count": 0}

            def save(*args, **kwargs):
                saves["count"] += 1
                if saves["count"] >= 2:
                    raise KeyboardInterrupt
                return original_save(*args, **kwargs)

            patch.setattr(torch, "save", save)
        else:
            patch.setattr(Path, "rename", rename_that_fails(int(fail_from.split()[1])))
        with pytest.raises(KeyboardInterrupt):
            fit(base, tokenizer, prompts, CountingReward(), epochs=2, output_dir=tmp_path / "b", **FIT_OPTIONS)
    resumed = fit(base, tokenizer, prompts, CountingReward(), epochs=2, output_dir=tmp_path / "b", **FIT_OPTIONS)
    for (key, tensor), (_, other) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(tensor, other, atol=1e-6), key
    assert sorted(path.name for path in (tmp_path / "b").iterdir()) == [
        "candidate-rewards-top4.jsonl", "lookahead-top4.jsonl", "prefix-rewards.jsonl", "samples.jsonl",
        "sampling.json", "value_model"]


def test_an_unwritable_output_dir_fails_before_sampling(tmp_path):
    (tmp_path / "a_file").write_text("")
    reward = CountingReward()
    with pytest.raises(ValueError, match="`output_dir` .*a_file/run is not writable"):
        fit(tiny_causal_lm("llama"), word_tokenizer(), random_prompts(4), reward,
            output_dir=tmp_path / "a_file" / "run", **FIT_OPTIONS)
    assert reward.calls == 0


def test_a_failing_first_batch_names_no_samples_file(tmp_path):
    with pytest.raises(RuntimeError, match="sampling batch 0") as error:
        fit(tiny_causal_lm("llama"), word_tokenizer(), random_prompts(4), CountingReward(fail_on_call=1),
            output_dir=tmp_path, **FIT_OPTIONS)
    assert "kept in" not in str(error.value)


def test_prompts_from_any_iterable_and_a_clear_error_for_dataset_rows():
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    value_model = fit(base, tokenizer, (prompt for prompt in random_prompts(4)), count_good_words, epochs=1,
                      **FIT_OPTIONS)
    assert value_model.config.reward == "count_good_words"
    with pytest.raises(ValueError, match=r"`prompts\[0\]`.*dataset\['prompt'\]"):
        fit(base, tokenizer, [{"prompt": "w5 w6"}], count_good_words, **FIT_OPTIONS)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(prompts=[]), "`prompts`"),
        (dict(prompts="w5 w6"), "`prompts` must be a list"),
        (dict(prompts=["w5", ""]), r"`prompts\[1\]`"),
        (dict(temperature=0.0), "`temperature`"),
        (dict(lam=1.5), "`lam`"),
        (dict(epochs=0), "`epochs`"),
        (dict(sampling_batch_size=0), "`sampling_batch_size` must be a positive integer, got 0"),
        (dict(reward_fn=lambda p, c: [1.0]), "returned 1 rewards for 4 completions"),
        (dict(reward_fn=lambda p, c: [float("nan")] * len(c)), "non-finite"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    arguments = dict(base_model=tiny_causal_lm("llama"), tokenizer=word_tokenizer(), prompts=random_prompts(2),
                     reward_fn=count_good_words)
    arguments.update(change)
    with pytest.raises((ValueError, RuntimeError)) as error:
        fit(**arguments, samples_per_prompt=2, max_new_tokens=3, progress=False)
    text = str(error.value) + str(error.value.__cause__ or "")
    assert __import__("re").search(message, text), text


def test_a_value_model_with_another_vocabulary_is_refused():
    config = tiny_config("llama")
    config.vocab_size = 128
    with pytest.raises(ValueError, match=r"vocabulary \(128\).*base model's \(96\)"):
        fit(tiny_causal_lm("llama"), word_tokenizer(), random_prompts(2), count_good_words,
            value_model=ValueModel.from_backbone(config), progress=False)


# ---------------------------------------------------------------------- two processes


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_gloo(tmp_path):
    script = Path(__file__).with_name("fit_two_processes.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(script), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert sorted({sample["prompt_index"] for sample in samples}) == list(range(12))
    assert len(samples) == 12 * 2
    value_model = ValueModel.from_pretrained(tmp_path / "value_model")
    assert value_model.head.weight.abs().sum() > 0  # it trained
    # Both processes ended with the same weights (DDP all-reduced the gradients).
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert all(torch.equal(ranks[0][key], ranks[1][key]) for key in ranks[0])
    assert all(torch.equal(ranks[0][key], value) for key, value in value_model.state_dict().items())


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_token_head_loss_trains_q_of_each_taken_token_toward_the_next_states_target(lam):
    """Q(s_t, a_t) is the value of s_{t+1}: TD(lambda) over s_1 .. s_T (s_T, after the last token, toward R)."""
    from vas_logits.sampling import Sample

    value_model = ValueModel.from_backbone(tiny_config("llama"), head="token")
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in value_model.parameters():
            parameter.normal_(0, 0.3)
    samples = [Sample(0, [1, 5, 6], [7, 8, 2], 1.5), Sample(1, [1, 9], [10], -0.5)]
    trainer = Trainer(value_model, 1e-3, 1.0, 1.0, lam, PAD, 0, 1, None, False, True)
    loss = trainer.losses(collate(samples, PAD, value_model.device))[0]
    squared, count = 0.0, 0
    for sample in samples:
        ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
        q_all = value_model(ids).values[0]  # (L, V)
        start = len(sample.prompt_ids) - 1
        # values of s_1 .. s_T: Q at the end of s_t of the token taken next
        values = [q_all[start + t, sample.completion_ids[t]].item() for t in range(len(sample.completion_ids))]
        targets = hand_written_targets([0.0] + values, sample.reward, len(values), 1.0, lam)[1:]
        squared += sum((v - g) ** 2 for v, g in zip(values, targets))
        count += len(values)
    assert loss.item() == pytest.approx(0.5 * squared / count, rel=1e-5)


def test_rewards_that_overflow_float32_are_refused_before_they_are_stored(tmp_path):
    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(4)

    def huge(prompts, completions):
        return [1e39 if index == 1 else 0.0 for index in range(len(completions))]

    with pytest.raises(RuntimeError, match="sampling batch 0") as error:
        fit(base, tokenizer, prompts, huge, epochs=1, output_dir=tmp_path, **FIT_OPTIONS)
    assert "beyond float32's range" in str(error.value.__cause__) and "(1, 1e+39)" in str(error.value.__cause__)
    assert not (tmp_path / "samples.jsonl").exists() or not (tmp_path / "samples.jsonl").read_text()


def test_a_checkpoint_trained_otherwise_is_refused_with_the_settings_named_and_the_samples_kept(tmp_path):
    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(12)
    fit(base, tokenizer, prompts, CountingReward(), epochs=1, output_dir=tmp_path, keep_checkpoint=True,
        **FIT_OPTIONS)
    with pytest.raises(ValueError, match=r"lam: checkpoint 1.0, now 0.0.*delete .*checkpoint") as error:
        fit(base, tokenizer, prompts, CountingReward(), epochs=2, lam=0.0, output_dir=tmp_path, **FIT_OPTIONS)
    assert "overwrite_output_dir" not in str(error.value)  # no remedy that deletes the samples
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 12 * 2


def test_resuming_uses_the_learning_rate_it_is_given(tmp_path, monkeypatch):
    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(12)
    fit(base, tokenizer, prompts, CountingReward(), epochs=1, output_dir=tmp_path, keep_checkpoint=True,
        **FIT_OPTIONS)
    seen = []
    original = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    fit(base, tokenizer, prompts, CountingReward(), epochs=2, output_dir=tmp_path,
        **dict(FIT_OPTIONS, learning_rate=1e-4))
    assert seen and set(seen) == {1e-4}


def _sigint_at(monkeypatch, target, name, call_number, after=False):
    """Make the `call_number`-th call of target.name send this process a real SIGINT (as Ctrl-C does), just
    before the call or just after it."""
    original, calls = getattr(target, name), {"count": 0}

    def wrapped(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == call_number and not after:
            signal.raise_signal(signal.SIGINT)
        result = original(*args, **kwargs)
        if calls["count"] == call_number and after:
            signal.raise_signal(signal.SIGINT)
        return result
    monkeypatch.setattr(target, name, wrapped)


# Every point of a training step and of an epoch's end where Ctrl-C can land. Step 3 of epoch 1 (of 6 steps);
# Trainer.losses' first call is fit()'s dry run before sampling.
INTERRUPT_POINTS = {
    "collating the batch": ("vas_logits.trainer", "collate", 3, False),
    "the forward pass": (Trainer, "losses", 4, False),
    "after the forward pass": (Trainer, "losses", 4, True),
    "the backward pass / clipping": (torch.nn.utils, "clip_grad_norm_", 3, False),
    "the optimizer update": (torch.optim.AdamW, "step", 3, False),
    "after the update": (torch.optim.AdamW, "step", 3, True),
    "the held-out evaluation": (Trainer, "evaluate", 1, False),
    "writing the epoch's checkpoint": (Trainer, "_save_checkpoint", 1, False),
}


@pytest.mark.parametrize("point", INTERRUPT_POINTS)
def test_an_interrupt_at_any_point_resumes_bit_for_bit(tmp_path, monkeypatch, point, ctrl_c):
    """Ctrl-C anywhere in a step or an epoch's end, then a rerun: the same weights, bit for bit, as a run that
    was never interrupted (no batch applied twice or skipped, no evaluation lost)."""
    import importlib

    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(12)
    straight = fit(base, tokenizer, prompts, CountingReward(), epochs=2, output_dir=tmp_path / "a", **FIT_OPTIONS)
    target, name, call_number, after = INTERRUPT_POINTS[point]
    target = importlib.import_module(target) if isinstance(target, str) else target
    with monkeypatch.context() as patch:
        _sigint_at(patch, target, name, call_number, after)
        with pytest.raises(KeyboardInterrupt):
            fit(base, tokenizer, prompts, CountingReward(), epochs=2, output_dir=tmp_path / "b", **FIT_OPTIONS)
    reward = CountingReward()
    resumed = fit(base, tokenizer, prompts, reward, epochs=2, output_dir=tmp_path / "b", **FIT_OPTIONS)
    assert reward.calls == 0
    for (key, tensor), other in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(tensor, other), key


def test_an_epoch_resumed_with_another_batch_size_trains_on_each_remaining_sample_once(tmp_path, monkeypatch,
                                                                                        ctrl_c):
    """Interrupted after 2 steps of 4 samples, resumed with batches of 3: the epoch goes on with exactly the
    samples it has not seen, in its order (before: the saved step count was re-read in the new units)."""
    import vas_logits.trainer as trainer_module

    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(12)
    options = dict(FIT_OPTIONS, eval_fraction=0.0)
    batches, original = [], trainer_module.collate

    def recording(samples, *args, **kwargs):
        batches.append([(sample.prompt_index, tuple(sample.completion_ids)) for sample in samples])
        return original(samples, *args, **kwargs)

    def training_batches(**kwargs):  # the batches one fit() trains on (its first collate is the dry run)
        batches.clear()
        fit(base, tokenizer, prompts, CountingReward(), epochs=1, **dict(options, **kwargs))
        return batches[1:]

    monkeypatch.setattr(trainer_module, "collate", recording)
    straight = training_batches(output_dir=tmp_path / "a")
    with monkeypatch.context() as patch:
        _sigint_at(patch, torch.optim.AdamW, "step", 2, after=True)
        with pytest.raises(KeyboardInterrupt):
            training_batches(output_dir=tmp_path / "b")
    first = batches[1:]
    rest = training_batches(output_dir=tmp_path / "b", batch_size=3)
    assert [len(batch) for batch in first] == [4, 4] and [len(batch) for batch in rest] == [3, 3, 3, 3, 3, 1]
    flat = [sample for batch in first + rest for sample in batch]
    assert flat == [sample for batch in straight for sample in batch]  # every sample once, in the epoch's order


def test_a_tokenizer_with_the_same_name_and_size_but_other_ids_is_refused(tmp_path):
    tokenizer, base, prompts = word_tokenizer(), tiny_causal_lm("llama"), random_prompts(4)
    fit(base, tokenizer, prompts, CountingReward(), epochs=1, output_dir=tmp_path, **FIT_OPTIONS)
    other = word_tokenizer()
    vocab = other.backend_tokenizer.get_vocab()
    swapped = {**vocab, "w5": vocab["w6"], "w6": vocab["w5"]}  # same words, same size, two ids exchanged
    from tokenizers import models

    other.backend_tokenizer.model = models.WordLevel(swapped, unk_token="<unk>")
    assert other.name_or_path == tokenizer.name_or_path and len(other) == len(tokenizer)
    with pytest.raises(ValueError, match="tokenizer: stored"):
        fit(base, other, prompts, CountingReward(), epochs=1, output_dir=tmp_path, **FIT_OPTIONS)
