"""vas-fit: prompts from .txt and .jsonl, the reward as module:function, a run end to end on a tiny model."""

import json

import pytest

from vas_logits import ValueModel
import inspect

from vas_logits import PrefixRewards, fit
from vas_logits.cli import build_parser, load_prompts, load_reward, main

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
    fit_defaults = {name: parameter.default for name, parameter in inspect.signature(fit).parameters.items()}
    options = [action for action in parser._actions if action.dest != "help"]
    assert len(options) > 20
    for action in options:
        assert action.help and len(action.help) > 15, action.dest
        if action.dest in fit_defaults and action.default is not None:
            assert action.default == fit_defaults[action.dest], action.dest
    assert "(default: 4)" in parser.format_help()  # the value model's size is stated


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
    from vas_logits.fit import DEFAULT_PREFIX_REWARDS

    required = ["--base", "b", "--prompts", "p.txt", "--reward", "m:f", "--output", "o"]
    assert _prefix_rewards(build_parser().parse_args(required)) is DEFAULT_PREFIX_REWARDS  # applies where it can
    given = _prefix_rewards(build_parser().parse_args(required + ["--prefix-increment-weight", "5"]))
    assert given == PrefixRewards(increment_weight=5.0) and given is not DEFAULT_PREFIX_REWARDS
    assert build_parser().parse_args(required + ["--no-prefix-rewards"]).no_prefix_rewards
    given = _prefix_rewards(build_parser().parse_args(required + ["--prefix-candidates", "6"]))
    assert given == PrefixRewards(candidates=6) and isinstance(given.candidates, int)
