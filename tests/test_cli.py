"""vas-fit: prompts from .txt and .jsonl, the reward as module:function, a run end to end on a tiny model."""

import json

import pytest

import dataclasses

from vas_logits import FitConfig, PrefixRewards, ValueModel
from vas_logits.cli import build_parser, load_prompts, load_reward, main
from vas_logits.fit_config import DEFAULT_PREFIX_REWARDS

from .helpers import tiny_causal_lm, word_tokenizer


def test_load_prompts_from_text_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("w5 w6\n\nw7\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["w5 w6", "w7"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": "w5"}) + "\n" + json.dumps({"text": "w9 w8"}) + "\n")
    assert load_prompts(str(tmp_path / "p.jsonl"), field="text") == ["w5", "w9 w8"]
    with pytest.raises(ValueError, match="no field 'prompt'"):
        load_prompts(str(tmp_path / "p.jsonl"))


def test_load_reward_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text("def length(prompts, completions):\n    return [1.0] * len(completions)\n")
    assert load_reward("my_rewards:length")(["a"], ["b"]) == [1.0]
    with pytest.raises(ValueError, match="module:function"):
        load_reward("my_rewards")
    with pytest.raises(ValueError, match="no function 'missing'"):
        load_reward("my_rewards:missing")


def test_vas_fit_end_to_end(tmp_path, monkeypatch):
    tiny_causal_lm("llama").save_pretrained(tmp_path / "base")
    word_tokenizer().save_pretrained(tmp_path / "base")
    (tmp_path / "prompts.txt").write_text("\n".join(f"w{i} w{i + 1}" for i in range(10, 22)) + "\n")
    (tmp_path / "rewards.py").write_text(
        "def good(prompts, completions):\n    return [float(c.count('w1')) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    main(["--base", str(tmp_path / "base"), "--prompts", "prompts.txt", "--reward", "rewards:good",
          "--output", "run", "--num-layers", "1", "--samples-per-prompt", "2", "--max-new-tokens", "4",
          "--epochs", "1", "--batch-size", "4", "--learning-rate", "1e-3", "--no-progress", "--siblings", "1",
          "--top-k", "3"])
    value_model = ValueModel.from_pretrained(tmp_path / "run" / "value_model")
    assert value_model.backbone.config.num_hidden_layers == 1
    assert value_model.config.reward == "rewards:good"
    assert value_model.config.base_model == str(tmp_path / "base")
    assert len((tmp_path / "run" / "samples.jsonl").read_text().splitlines()) == 24
    assert len((tmp_path / "run" / "siblings-1-top3.jsonl").read_text().splitlines()) == 11 * 2  # 1 held out


def test_every_option_is_explained_and_defaults_are_fits_own():
    parser = build_parser()
    options = [action for action in parser._actions if action.dest != "help"]
    assert len(options) > 20
    for action in options:
        assert action.help and (action.help == "==SUPPRESS==" or len(action.help) > 15), action.dest
    generated = {action.dest: action for action in options}
    for option in dataclasses.fields(FitConfig):  # every command-line field of FitConfig, at FitConfig's default
        if option.metadata["group"] is not None:
            action = generated[option.name]
            assert action.required or action.default == option.default, option.name
    assert generated["output_dir"].required
    assert "(default: 4)" in parser.format_help()  # the value model's size is stated


def test_older_flags_still_parse_to_the_same_fields():
    required = ["--base", "b", "--prompts", "p.txt", "--reward", "m:f"]
    old = build_parser().parse_args(required + ["--output", "o", "--no-standardize", "--last-epoch",
                                                "--overwrite-output", "--no-progress", "--keep-checkpoint",
                                                "--learning-rate", "2e-4"])
    new = build_parser().parse_args(required + ["--output-dir", "o", "--no-standardize-rewards", "--no-keep-best",
                                                "--overwrite-output-dir", "--no-progress", "--keep-checkpoint",
                                                "--learning-rate", "2e-4"])
    assert vars(old) == vars(new)
    assert (new.output_dir, new.standardize_rewards, new.keep_best, new.overwrite_output_dir, new.progress,
            new.keep_checkpoint, new.learning_rate) == ("o", False, False, True, False, True, 2e-4)
    defaults = build_parser().parse_args(required + ["--output", "o"])
    assert (defaults.standardize_rewards, defaults.keep_best, defaults.learning_rate) == (True, True, None)


def test_fit_config_takes_fields_as_keywords_and_names_a_wrong_one():
    config = FitConfig(epochs=5, output_dir="runs/x")
    assert FitConfig.resolve(config, {}) is config
    assert FitConfig.resolve(config, {"epochs": 2}) == FitConfig(epochs=2, output_dir="runs/x")
    assert FitConfig.resolve(None, {}) == FitConfig() and FitConfig().prefix_rewards is DEFAULT_PREFIX_REWARDS
    assert FitConfig(rollouts=None).rollouts == FitConfig().rollouts  # None: no rollouts, as before
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'; did you mean 'epochs'"):
        FitConfig.resolve(None, {"epoch": 2})
    with pytest.raises(ValueError, match="`config` must be a vas_logits.FitConfig"):
        FitConfig.resolve({"epochs": 2}, {})


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "`epochs` must be a positive integer, got 0"),
    ("batch_size", True, "`batch_size` must be a positive integer, got True"),
    ("temperature", 0.0, "`temperature` must be > 0, got 0.0"),
    ("temperature", float("nan"), "`temperature` must be > 0"),
    ("lam", 1.5, r"`lam` must be in \[0, 1\], got 1.5"),
    ("eval_fraction", 1.0, r"`eval_fraction` must be in \[0, 1\), got 1.0"),
    ("max_grad_norm", -1.0, "`max_grad_norm` must be > 0"),
    ("learning_rate", 0.0, "`learning_rate` must be > 0"),
    ("seed", 1.5, "`seed` must be an integer"),
    ("rollouts", {"siblings": 2}, "`rollouts` must be a vas_logits.Rollouts"),
    ("prefix_rewards", 3, "`prefix_rewards` must be a vas_logits.PrefixRewards or None"),
    ("generation_kwargs", "top_k=5", "`generation_kwargs` must be a dict or None"),
])
def test_fit_config_refuses_bad_values_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        FitConfig(**{field: value})


def test_vas_fit_on_given_samples_and_through_an_endpoint(tmp_path, monkeypatch):
    tiny_causal_lm("llama").save_pretrained(tmp_path / "backbone")
    word_tokenizer().save_pretrained(tmp_path / "backbone")
    records = [{"prompt": f"w{i} w{i + 1}", "completion": f" w{i + 2}", "reward": float(i % 3)} for i in range(10, 22)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    monkeypatch.chdir(tmp_path)
    common = ["--value-backbone", "backbone", "--num-layers", "1", "--epochs", "1", "--batch-size", "4",
              "--no-progress"]
    main(["--samples", "samples.jsonl", "--output", "given", *common])
    value_model = ValueModel.from_pretrained(tmp_path / "given" / "value_model")
    assert value_model.config.reward == "given rewards"
    assert not (tmp_path / "given" / "samples.jsonl").exists()  # given samples are re-read, never copied
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 12  # the user's file, untouched

    pytest.importorskip("openai")
    from .fake_endpoint import FakeEndpoint

    served = FakeEndpoint(tiny_causal_lm("llama"), word_tokenizer())
    (tmp_path / "prompts.txt").write_text("w5 w6\nw7\nw8 w9\n")
    (tmp_path / "api_rewards.py").write_text("def count(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    try:
        main(["--endpoint", served.url, "--prompts", "prompts.txt", "--reward", "api_rewards:count", "--output", "api",
              "--samples-per-prompt", "2", "--max-new-tokens", "3", *common])
    finally:
        served.close()
    assert len(served.requests) == 6
    assert ValueModel.from_pretrained(tmp_path / "api" / "value_model").config.base_model == "tiny"


@pytest.mark.parametrize("argv, message", [
    (["--output", "o"], "exactly one of --base, --endpoint and --samples"),
    (["--base", "b", "--samples", "s.jsonl", "--output", "o"], "exactly one of"),
    (["--samples", "s.jsonl", "--prompts", "p.txt", "--output", "o"], "drop --prompts and --reward"),
    (["--base", "b", "--prompts", "p.txt", "--output", "o"], "--prompts and --reward are required"),
    (["--samples", "s.jsonl", "--output", "o"], "--value-backbone is required"),
])
def test_vas_fit_source_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_prefix_reward_options_map_to_fits_default_or_a_prefix_rewards_of_their_values():
    from vas_logits.cli import _prefix_rewards

    required = ["--base", "b", "--prompts", "p.txt", "--reward", "m:f", "--output", "o"]
    assert _prefix_rewards(build_parser().parse_args(required)) is DEFAULT_PREFIX_REWARDS  # applies where it can
    given = _prefix_rewards(build_parser().parse_args(required + ["--prefix-increment-weight", "5"]))
    assert given == PrefixRewards(increment_weight=5.0) and given is not DEFAULT_PREFIX_REWARDS
    assert build_parser().parse_args(required + ["--no-prefix-rewards"]).no_prefix_rewards
    given = _prefix_rewards(build_parser().parse_args(required + ["--prefix-candidates", "6"]))
    assert given == PrefixRewards(candidates=6) and isinstance(given.candidates, int)
    given = _prefix_rewards(build_parser().parse_args(required + ["--no-prefix-control-variates"]))
    assert given == PrefixRewards(control_variates=False)  # a yes/no pair, not bool("False")
