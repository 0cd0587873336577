"""vas-fit: prompts from .txt and .jsonl, the reward as module:function, a run end to end on a tiny model."""

import json

import pytest

from vas_logits import ValueModel
import inspect

from vas_logits import fit
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
          "--epochs", "1", "--batch-size", "4", "--learning-rate", "1e-3", "--no-progress"])
    value_model = ValueModel.from_pretrained(tmp_path / "run" / "value_model")
    assert value_model.backbone.config.num_hidden_layers == 1
    assert value_model.config.reward == "rewards:good"
    assert value_model.config.base_model == str(tmp_path / "base")
    assert len((tmp_path / "run" / "samples.jsonl").read_text().splitlines()) == 24


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
