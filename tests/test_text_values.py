"""TextValuer (API mode) against a naive recompute: V(tokenize(prefix + candidate)) from scratch."""

import pytest
import torch

from vas_logits.text_values import TextValuer

from .helpers import ARCHITECTURES, bpe_tokenizer, tiny_value_model, word_tokenizer


def naive_values(value_model, tokenizer, prefix, candidates, beta=1.0):
    """beta · Q of each candidate text, each from a forward over its whole tokenisation."""
    out = []
    for candidate in candidates:
        ids = torch.tensor([tokenizer(prefix + candidate)["input_ids"]])
        output = value_model(ids)
        out.append(value_model.beta_times_q(output, beta, 1)[0, 0])
    return torch.stack(out)


# A decoding-like walk: the prefix grows by one chosen piece per step; pieces merge with the prefix's end
# ("wa" + "s"), split into several tokens (" plot was"), are empty or the EOS text; then a new prompt.
STEPS = [
    ("the movie", [" was", " wa", "", " plot was fine", "</s>"]),
    ("the movie wa", ["s", "s great", " ", "n"]),
    ("the movie was", [" great", " bad", " not bad at all", "</s>", "!"]),
    ("the movie was great", [" and", "</s>", " a"]),
    ("a bad film", [" with", " w", " wi"]),  # another prompt: the cache starts over
    ("a bad film with", [" a", " a good cast"]),
    ("a bad", [" film", " movie"]),  # backwards: the cache is cropped
]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("head", ["scalar", "distributional"])
def test_values_match_naive_recompute(architecture, head):
    metadata = {"head": "distributional", "num_atoms": 7} if head == "distributional" else {}
    value_model = tiny_value_model(architecture, **metadata)
    tokenizer = bpe_tokenizer()
    valuer = TextValuer(value_model, tokenizer)
    for prefix, candidates in STEPS:
        output = valuer.values(prefix, candidates)
        got = value_model.beta_times_q(output, 1.5, len(candidates))[0]
        expected = naive_values(value_model, tokenizer, prefix, candidates, beta=1.5)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_cache_follows_the_text_one_step_behind():
    """The cache keeps the shared tokens, not the candidates, so a step feeds only a few tokens."""
    value_model = tiny_value_model("llama")
    tokenizer = word_tokenizer()
    valuer = TextValuer(value_model, tokenizer)
    text = "w4 w5 w6"
    valuer.values(text, [" w7", " w8"])
    assert valuer.cached_ids == tokenizer(text)["input_ids"]
    assert valuer.cache.get_seq_length() == len(valuer.cached_ids)
    valuer.values(text + " w7", [" w9", " w10 w11"])
    assert valuer.cached_ids == tokenizer(text + " w7")["input_ids"]
    assert valuer.cache.get_seq_length() == len(valuer.cached_ids)


def test_empty_text_is_a_clear_error():
    valuer = TextValuer(tiny_value_model("llama"), bpe_tokenizer(), add_special_tokens=False)
    with pytest.raises(ValueError, match="empty text"):
        valuer.values("", ["", "xyz"])  # "xyz" is out of the tiny tokenizer's alphabet: no tokens


def test_a_token_head_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="token head"):
        TextValuer(tiny_value_model("llama", head="token"), word_tokenizer())


def test_a_failed_forward_leaves_the_valuer_usable():
    value_model, tokenizer = tiny_value_model("llama"), word_tokenizer()
    valuer = TextValuer(value_model, tokenizer)
    valuer.values("w4 w5", [" w6", " w7"])
    layer = value_model.backbone.layers[1]
    original = layer.forward

    def failing(*args, **kwargs):  # layer 0 has written its keys and values already
        raise RuntimeError("out of memory")

    layer.forward = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        valuer.values("w4 w5 w6", [" w8", " w9"])
    layer.forward = original
    fresh = TextValuer(value_model, tokenizer).values("w4 w5 w6", [" w8", " w9"]).values
    assert torch.allclose(valuer.values("w4 w5 w6", [" w8", " w9"]).values, fresh, atol=1e-5)
