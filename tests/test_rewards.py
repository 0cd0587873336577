"""reward_model_fn: a sequence-classification reward model as fit()'s reward function, checked against the
model called on each text alone (so batching, padding and truncation change nothing)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from vas_logits import fit, reward_model_fn

from .helpers import BOS, EOS, PAD, VOCAB_SIZE, tiny_causal_lm, word_tokenizer
from .test_fit import FIT_OPTIONS, random_prompts

PROMPTS = ["w5 w6", "w7", "w8 w9 w10 w11", "w12", "w13 w14"]
COMPLETIONS = [" w20 w21", " w22", " w23", " w24 w25 w26 w27 w28", " w29"]


def tiny_reward_model(num_labels=1, labels=None):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS,
                         eos_token_id=EOS, num_labels=num_labels, id2label=labels)
    return LlamaForSequenceClassification(config).eval()


@torch.no_grad()
def one_by_one(model, tokenizer, texts, add_special_tokens=True):
    """(n, num_labels) logits of each text alone: no padding at all."""
    return torch.cat([model(**tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)).logits
                      for text in texts])


def test_scores_equal_the_model_on_each_text_alone():
    model, tokenizer = tiny_reward_model(), word_tokenizer()
    rewards = reward_model_fn(model, tokenizer, batch_size=2)(PROMPTS, COMPLETIONS)
    expected = one_by_one(model, tokenizer, [p + c for p, c in zip(PROMPTS, COMPLETIONS)])[:, 0]
    assert len(rewards) == 5 and len(set(rewards)) == 5
    assert torch.allclose(torch.tensor(rewards), expected, atol=1e-5)


def test_a_label_by_name_as_logit_or_log_probability():
    model, tokenizer = tiny_reward_model(3, {0: "negative", 1: "neutral", 2: "positive"}), word_tokenizer()
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    expected = one_by_one(model, tokenizer, texts)
    logits = reward_model_fn(model, tokenizer, label="positive")(PROMPTS, COMPLETIONS)
    assert torch.allclose(torch.tensor(logits), expected[:, 2], atol=1e-5)
    log_probs = reward_model_fn(model, tokenizer, label=1, output="log_prob")(PROMPTS, COMPLETIONS)
    assert torch.allclose(torch.tensor(log_probs), expected.log_softmax(-1)[:, 1], atol=1e-5)


def test_the_reward_models_chat_template_formats_the_conversation():
    model, tokenizer = tiny_reward_model(), word_tokenizer()
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}"
                               "{% if m['role'] == 'user' %}w90 {{ m['content'] }}{% else %} w91{{ m['content'] }}"
                               "{% endif %}{% endfor %}")
    rewards = reward_model_fn(model, tokenizer)(PROMPTS, COMPLETIONS)
    texts = [f"<s>w90 {p} w91{c}" for p, c in zip(PROMPTS, COMPLETIONS)]
    assert tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]},
                                          {"role": "assistant", "content": COMPLETIONS[0]}], tokenize=False) == texts[0]
    expected = one_by_one(model, tokenizer, texts, add_special_tokens=False)[:, 0]
    assert torch.allclose(torch.tensor(rewards), expected, atol=1e-5)
    plain = reward_model_fn(model, tokenizer, chat_template=False)(PROMPTS, COMPLETIONS)
    assert not torch.allclose(torch.tensor(plain), expected, atol=1e-3)


def test_long_inputs_keep_their_end():
    model, tokenizer = tiny_reward_model(), word_tokenizer()
    rewards = reward_model_fn(model, tokenizer, max_length=3)(PROMPTS, COMPLETIONS)
    # The tokenizer cuts the text from the left, then adds its BOS: BOS and the last two words.
    last_three = [[BOS] + tokenizer(p + c)["input_ids"][-2:] for p, c in zip(PROMPTS, COMPLETIONS)]
    with torch.no_grad():
        expected = torch.cat([model(torch.tensor([ids])).logits[:, 0] for ids in last_three])
    assert torch.allclose(torch.tensor(rewards), expected, atol=1e-5)


def test_loads_from_a_local_path_and_trains_a_value_model(tmp_path):
    model, tokenizer = tiny_reward_model(), word_tokenizer()
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    from_path = reward_model_fn(str(tmp_path / "rm"))
    assert from_path(PROMPTS, COMPLETIONS) == pytest.approx(reward_model_fn(model, tokenizer)(PROMPTS, COMPLETIONS),
                                                            abs=1e-5)
    value_model = fit(tiny_causal_lm("llama"), word_tokenizer(), random_prompts(4), from_path, epochs=1,
                      **FIT_OPTIONS)
    assert value_model.config.reward.startswith("reward_model[")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(output="prob"), "`output` must be"),
        (dict(batch_size=0), "`batch_size` must be a positive integer"),
        (dict(label="great"), "`label` 'great' is not one of"),
        (dict(label=3), r"`label` must be a label name or an index in \[0, 1\)"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        reward_model_fn(tiny_reward_model(), word_tokenizer(), **kwargs)


def test_several_labels_need_a_label():
    with pytest.raises(ValueError, match="has 2 labels.*pass `label`"):
        reward_model_fn(tiny_reward_model(2), word_tokenizer())
    with pytest.raises(ValueError, match="`tokenizer` is required"):
        reward_model_fn(tiny_reward_model())
