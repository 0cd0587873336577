"""Blockwise value-guided sampling through generate(custom_generate=...): the same tokens as a naive loop
that recomputes everything, plain sampling when M = 1, and clear errors."""

import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from vas_logits.blockwise import BlockwiseSampler

from .helpers import EOS, PAD, tiny_causal_lm, tiny_value_model

PROMPTS = torch.tensor([[PAD, PAD, 1, 5, 6, 7], [1, 8, 9, 10, 11, 12], [PAD, PAD, PAD, PAD, 1, 13]])


class FavourEos(LogitsProcessor):
    """Adds to the EOS logit so that candidates often end inside a block; never samples padding."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, EOS] += 0.5
        scores[:, PAD] = -math.inf
        return scores


@torch.no_grad()
def naive_blockwise(base, value_model, input_ids, attention_mask, block_size, num_candidates, beta, max_new_tokens,
                    processors):
    """The algorithm with no cache: every step recomputes the base on the whole sequence, every block the
    value model; the same random draws in the same order (one per step over all candidates, one per block)."""
    rows, m, prompt_length = input_ids.shape[0], num_candidates, input_ids.shape[1]
    finished = torch.zeros(rows, dtype=torch.bool)
    while input_ids.shape[1] - prompt_length < max_new_tokens and not finished.all():
        length = min(block_size, max_new_tokens - (input_ids.shape[1] - prompt_length))
        ids, mask = input_ids.repeat_interleave(m, 0), attention_mask.repeat_interleave(m, 0)
        done, start = finished.repeat_interleave(m), ids.shape[1]
        for _ in range(length):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = base(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
            scores = processors(ids, logits)
            tokens = torch.where(done, PAD, torch.multinomial(scores.softmax(-1), 1).squeeze(1))
            ids, mask = torch.cat([ids, tokens[:, None]], 1), torch.cat([mask, (~done).long()[:, None]], 1)
            done = done | (tokens == EOS) | (ids.shape[1] - prompt_length >= max_new_tokens)
            if done.all():
                break
        values = value_model(ids, attention_mask=mask).values  # (R·M, L)
        real = mask[:, start:].sum(1)
        last = start + (real - 1).clamp(min=0)
        values = values.gather(1, last[:, None]).view(rows, m)
        chosen = values.argmax(-1) if math.isinf(beta) else torch.multinomial((beta * values).softmax(-1), 1)[:, 0]
        chosen = torch.where(finished, 0, chosen)
        keep = torch.arange(rows) * m + chosen
        input_ids, attention_mask, finished = ids[keep], mask[keep], done[keep]
    return input_ids


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("beta", [math.inf, 2.0])
def test_matches_a_naive_loop_on_generate(architecture, beta):
    """Left-padded rows, EOS inside blocks, a last block shorter than B, warpers and a user processor: every
    token equals the naive loop's, so caches, padding, choice and stopping are right."""
    base, value_model = tiny_causal_lm(architecture), tiny_value_model(architecture, seed=3)
    sampler = BlockwiseSampler(value_model, block_size=4, num_candidates=3, beta=beta)
    mask, ended, lengths = (PROMPTS != PAD).long(), [], []
    for seed in range(4):
        torch.manual_seed(seed)
        output = base.generate(PROMPTS, attention_mask=mask, custom_generate=sampler, do_sample=True,
                               max_new_tokens=10, temperature=0.7, top_k=10, logits_processor=[FavourEos()],
                               pad_token_id=PAD, eos_token_id=EOS)
        torch.manual_seed(seed)
        # generate() orders them: user processors first, then temperature, then top-k
        processors = LogitsProcessorList([FavourEos(), TemperatureLogitsWarper(0.7), TopKLogitsWarper(10)])
        expected = naive_blockwise(base, value_model, PROMPTS, mask, 4, 3, beta, 10, processors)
        assert output.tolist() == expected.tolist(), seed
        generated = expected[:, PROMPTS.shape[1]:]
        ended += (generated == EOS).any(1).tolist()
        lengths += (generated != PAD).sum(1).tolist()
    assert any(ended) and max(lengths) > 4  # EOS inside a block, and rows going on past the first block


def test_one_candidate_is_plain_sampling():
    """M = 1: nothing to choose, so generate() with the sampler draws exactly generate()'s own samples."""
    base, value_model = tiny_causal_lm("llama"), tiny_value_model("llama")
    mask = (PROMPTS != PAD).long()
    kwargs = dict(attention_mask=mask, do_sample=True, max_new_tokens=9, pad_token_id=PAD, eos_token_id=EOS,
                  top_k=None, logits_processor=[FavourEos()])
    torch.manual_seed(0)
    plain = base.generate(PROMPTS, **kwargs)
    torch.manual_seed(0)
    blockwise = base.generate(PROMPTS, custom_generate=BlockwiseSampler(value_model, 4, 1), **kwargs)
    assert blockwise.tolist() == plain.tolist()


def test_the_best_candidate_raises_the_value_and_the_kl_bound():
    """beta = inf picks the candidate the value model prefers: V of the completions rises with M."""
    base, value_model = tiny_causal_lm("llama"), tiny_value_model("llama", seed=5)
    prompts = PROMPTS.repeat(8, 1)
    mask = (prompts != PAD).long()

    def mean_final_value(num_candidates):
        torch.manual_seed(0)
        output = base.generate(prompts, attention_mask=mask, do_sample=True, max_new_tokens=8, pad_token_id=PAD,
                               eos_token_id=EOS, custom_generate=BlockwiseSampler(value_model, 4, num_candidates))
        generated_mask = (output[:, prompts.shape[1]:] != PAD).long()  # padding follows EOS only
        values = value_model(output, attention_mask=torch.cat([mask, generated_mask], 1)).values
        last = output.shape[1] - 1 - (1 - generated_mask).sum(1, keepdim=True)  # the last real token
        return values.gather(1, last).mean().item()
    assert mean_final_value(1) < mean_final_value(4) < mean_final_value(16)
    sampler = BlockwiseSampler(value_model, 4, 4)
    assert sampler.kl_upper_bound(3) == pytest.approx(3 * (math.log(4) - 0.75))
    assert BlockwiseSampler(value_model, 4, 4, beta=1.0).kl_upper_bound(2) == pytest.approx(2 * math.log(4))


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_size=0), "`block_size` must be a positive integer, got 0"),
    (dict(num_candidates=2.5), "`num_candidates` must be a positive integer, got 2.5"),
    (dict(beta=0.0), "`beta` must be a number > 0"),
    (dict(beta=float("nan")), "`beta` must be a number > 0"),
    (dict(value_model="value.safetensors"), "`value_model` must be a ValueModel, got str"),
])
def test_bad_arguments_are_named(kwargs, message):
    arguments = dict(value_model=tiny_value_model("llama"), block_size=4, num_candidates=2)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BlockwiseSampler(**arguments)


def test_another_vocabulary_and_greedy_decoding_are_refused():
    from transformers import LlamaConfig

    from vas_logits import ValueModel

    other = ValueModel.from_backbone(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=4), pad_token_id=PAD)
    base = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="vocabulary of 96 tokens but the value model's is 50"):
        base.generate(PROMPTS[1:2], custom_generate=BlockwiseSampler(other), do_sample=True, max_new_tokens=2)
    with pytest.raises(ValueError, match="pass do_sample=True"):
        base.generate(PROMPTS[1:2], custom_generate=BlockwiseSampler(tiny_value_model("llama")), do_sample=False,
                      max_new_tokens=2)
