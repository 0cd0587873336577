"""The processor against the naive closed form at every step of real generate() calls, in every mode."""

import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from vas_logits import VAS, ValueModel

from .helpers import ARCHITECTURES, BOS, EOS, PAD, VOCAB_SIZE, Spy, naive_vas, tiny_causal_lm, tiny_value_model

PROMPTS = torch.tensor([[PAD, PAD, BOS, 5, 6, 7], [BOS, 8, 9, 10, 11, 12], [PAD, PAD, PAD, PAD, BOS, 13]])


def generate_with_spies(base, processor, prompts=PROMPTS, seed=0, as_list=True, **generate_kwargs):
    """generate() with spies right before and after the processor; returns (output ids, before, after)."""
    before, after = Spy(), Spy()
    processors = [before, processor, after]
    kwargs = dict(max_new_tokens=10, do_sample=True, pad_token_id=PAD, eos_token_id=None)
    kwargs.update(generate_kwargs)
    torch.manual_seed(seed)
    output = base.generate(
        input_ids=prompts,
        attention_mask=(prompts != PAD).long(),
        logits_processor=processors if as_list else LogitsProcessorList(processors),
        **kwargs,
    )
    assert len(before.calls) == len(after.calls) > 0
    return output, before, after


def assert_matches_reference(before, after, value_models, betas, top_k, outside_top_k="mask", atol=1e-4,
                             prompt_mask=None):
    """Every step's output equals the naive recomputation from that step's input.

    Padding: the prompts' `prompt_mask` (rows expanded to the batch, generated columns real) when given, else
    leading PAD ids."""
    for step, ((ids, scores_in), (_, scores_out)) in enumerate(zip(before.calls, after.calls)):
        is_real = None
        if prompt_mask is not None:
            is_real = prompt_mask.bool().repeat_interleave(ids.shape[0] // prompt_mask.shape[0], dim=0)
            is_real = torch.cat([is_real, is_real.new_ones(ids.shape[0], ids.shape[1] - is_real.shape[1])], -1)
        expected = naive_vas(value_models, betas, ids, scores_in, top_k, outside_top_k=outside_top_k,
                             is_real=is_real)
        assert scores_out.dtype == scores_in.dtype
        finite = torch.isfinite(expected)
        assert torch.equal(finite, torch.isfinite(scores_out)), f"step {step}: different tokens kept"
        assert torch.allclose(scores_out[finite], expected[finite], atol=atol, rtol=1e-4), (
            f"step {step}: max error {(scores_out[finite] - expected[finite]).abs().max():.3g}"
        )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sampling_left_padded_matches_reference(architecture):
    base, value_model = tiny_causal_lm(architecture), tiny_value_model(architecture)
    _, before, after = generate_with_spies(base, VAS(value_model, beta=2.0, top_k=5), max_new_tokens=12)
    assert_matches_reference(before, after, [value_model], [2.0], top_k=5)


@pytest.mark.parametrize("base_architecture,value_architecture", [("llama", "gpt2"), ("gpt_neox", "mistral"),
                                                                  ("qwen2", "llama"), ("gpt2", "qwen2")])
def test_mixed_architectures_match_reference(base_architecture, value_architecture):
    base, value_model = tiny_causal_lm(base_architecture), tiny_value_model(value_architecture)
    _, before, after = generate_with_spies(base, VAS(value_model, beta=1.5, top_k=4))
    assert_matches_reference(before, after, [value_model], [1.5], top_k=4)


def test_greedy_matches_reference_and_is_steered():
    base, value_model = tiny_causal_lm("llama"), tiny_value_model("llama")
    plain = base.generate(PROMPTS[1:2], max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    output, before, after = generate_with_spies(base, VAS(value_model, beta=50.0, top_k=8), prompts=PROMPTS[1:2],
                                                do_sample=False)
    assert_matches_reference(before, after, [value_model], [50.0], top_k=8)
    # Greedy takes the argmax of VAS's output, which a strong value model moves off the base's argmax.
    chosen = torch.stack([scores.argmax(-1) for _, scores in after.calls], dim=-1)
    assert torch.equal(output[:, PROMPTS.shape[1]:], chosen)
    assert not torch.equal(output, plain)


def test_beam_search_with_several_returned_sequences_matches_reference():
    base, value_model = tiny_causal_lm("llama"), tiny_value_model("llama")
    processor = VAS(value_model, beta=1.0, top_k=6)
    _, before, after = generate_with_spies(base, processor, do_sample=False, num_beams=3, num_return_sequences=2)
    assert before.calls[0][0].shape[0] == 3 * PROMPTS.shape[0]
    # Beams get reordered: at least one step's rows are not a plain continuation of the previous step's rows.
    reordered = any(not torch.equal(b[0][:, :-1], a[0]) for a, b in zip(before.calls, before.calls[1:]))
    assert reordered
    assert_matches_reference(before, after, [value_model], [1.0], top_k=6)


def test_beam_sampling_matches_reference():
    base, value_model = tiny_causal_lm("gpt2"), tiny_value_model("gpt2")
    _, before, after = generate_with_spies(base, VAS(value_model, beta=1.0, top_k=6), num_beams=2)
    assert_matches_reference(before, after, [value_model], [1.0], top_k=6)


def test_num_return_sequences_sampling_matches_reference():
    base, value_model = tiny_causal_lm("qwen2"), tiny_value_model("qwen2")
    _, before, after = generate_with_spies(base, VAS(value_model, beta=2.0, top_k=5), num_return_sequences=3)
    ids = before.calls[0][0]
    assert ids.shape[0] == 9 and torch.equal(ids[0], ids[2])  # rows p0, p0, p0, p1, ...
    assert_matches_reference(before, after, [value_model], [2.0], top_k=5)


class ForceEndOfSequence(LogitsProcessor):
    """Makes row 0 emit EOS at a given step, so that it finishes early and then receives pads."""

    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step:
            scores = scores.clone()
            scores[0, EOS] = 1e4
        return scores


def test_rows_that_finish_early_match_reference():
    base, value_model = tiny_causal_lm("mistral"), tiny_value_model("mistral")
    before, after = Spy(), Spy()
    torch.manual_seed(0)
    output = base.generate(
        input_ids=PROMPTS, attention_mask=(PROMPTS != PAD).long(), max_new_tokens=10, do_sample=True,
        pad_token_id=PAD, eos_token_id=EOS,
        logits_processor=[ForceEndOfSequence(3), before, VAS(value_model, beta=2.0, top_k=5, outside_top_k="keep"),
                          after],
    )
    row = output[0, PROMPTS.shape[1]:]
    assert row[2] == EOS and (row[3:] == PAD).all()
    assert_matches_reference(before, after, [value_model], [2.0], top_k=5, outside_top_k="keep")


def test_warpers_and_penalties_in_the_same_call():
    base, value_model = tiny_causal_lm("llama"), tiny_value_model("llama")
    _, before, after = generate_with_spies(
        base, VAS(value_model, beta=2.0, top_k=7), temperature=0.7, top_p=0.9, repetition_penalty=1.3,
        no_repeat_ngram_size=2, as_list=False,
    )
    assert_matches_reference(before, after, [value_model], [2.0], top_k=7)


def test_reuse_across_calls_with_other_prompts_and_batch_sizes():
    base, value_model = tiny_causal_lm("llama"), tiny_value_model("llama")
    processor = VAS(value_model, beta=2.0, top_k=5)
    prompt_sets = [PROMPTS, PROMPTS[1:], PROMPTS[1:], torch.tensor([[BOS, 8, 9, 40, 41, 42]] * 2), PROMPTS[:1]]
    for index, prompts in enumerate(prompt_sets):
        _, before, after = generate_with_spies(base, processor, prompts=prompts, seed=index, max_new_tokens=6)
        assert_matches_reference(before, after, [value_model], [2.0], top_k=5)
        assert processor.cached_length == prompts.shape[1] + 5  # one column per token, never k


def test_cache_grows_by_one_token_per_step():
    base, value_model = tiny_causal_lm("gpt_neox"), tiny_value_model("gpt_neox")
    processor = VAS(value_model, beta=1.0, top_k=10)
    lengths = []

    class Watch(LogitsProcessor):
        def __call__(self, input_ids, scores):
            lengths.append((input_ids.shape[1], processor._caches[0].get_seq_length()))
            return scores

    torch.manual_seed(0)
    base.generate(input_ids=PROMPTS, attention_mask=(PROMPTS != PAD).long(), max_new_tokens=8, do_sample=True,
                  pad_token_id=PAD, eos_token_id=None, logits_processor=[processor, Watch()])
    assert len(lengths) == 8
    assert lengths == [(length, length) for length, _ in lengths]


def test_beta_zero_keep_is_plain_generate():
    base, value_model = tiny_causal_lm("qwen2"), tiny_value_model("qwen2")
    kwargs = dict(input_ids=PROMPTS, attention_mask=(PROMPTS != PAD).long(), max_new_tokens=10, do_sample=True,
                  pad_token_id=PAD, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    torch.manual_seed(3)
    plain = base.generate(**kwargs)
    torch.manual_seed(3)
    steered = base.generate(**kwargs, logits_processor=[VAS(value_model, beta=0.0, top_k=5, outside_top_k="keep")])
    assert torch.equal(plain.sequences, steered.sequences)
    for plain_scores, steered_scores in zip(plain.scores, steered.scores):
        assert torch.equal(plain_scores, steered_scores)


def test_two_value_models_compose_as_the_sum_of_their_contributions():
    base = tiny_causal_lm("llama")
    first, second = tiny_value_model("llama", seed=1), tiny_value_model("gpt2", seed=2)
    _, before, after = generate_with_spies(base, VAS([first, second], beta=[1.5, -0.5], top_k=5))
    assert_matches_reference(before, after, [first, second], [1.5, -0.5], top_k=5)
    for ids, scores in before.calls:
        both = VAS([first, second], beta=[1.5, -0.5], top_k=5)(ids, scores)
        alone_first = VAS(first, beta=1.5, top_k=5)(ids, scores)
        alone_second = VAS(second, beta=-0.5, top_k=5)(ids, scores)
        kept = torch.isfinite(both)
        summed = alone_first[kept] + alone_second[kept] - scores[kept]
        assert torch.allclose(both[kept], summed, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_value_model(dtype):
    base, value_model = tiny_causal_lm("llama"), tiny_value_model("llama", dtype=dtype)
    _, before, after = generate_with_spies(base, VAS(value_model, beta=1.0, top_k=5))
    # The reference runs the same half-precision model without a cache; kernels differ, hence the tolerance.
    assert_matches_reference(before, after, [value_model], [1.0], top_k=5, atol=0.1)


def test_half_precision_base_keeps_the_scores_dtype():
    base, value_model = tiny_causal_lm("llama", dtype=torch.bfloat16), tiny_value_model("llama")
    _, before, after = generate_with_spies(base, VAS(value_model, beta=1.0, top_k=5))
    assert all(scores.dtype == before.calls[0][1].dtype for _, scores in after.calls)
    assert_matches_reference(before, after, [value_model], [1.0], top_k=5, atol=0.05)


def test_outside_top_k_modes_and_no_in_place_edit():
    value_model = tiny_value_model("llama")
    scores = torch.randn(2, VOCAB_SIZE)
    ids = torch.tensor([[BOS, 4, 5], [BOS, 6, 7]])
    original = scores.clone()
    masked = VAS(value_model, beta=1.0, top_k=3)(ids, scores)
    kept = VAS(value_model, beta=1.0, top_k=3, outside_top_k="keep")(ids, scores)
    assert torch.equal(scores, original)
    top = scores.topk(3).indices
    outside = torch.ones_like(scores, dtype=torch.bool).scatter_(1, top, False)
    assert torch.isinf(masked[outside]).all() and torch.isfinite(masked[~outside]).all()
    assert torch.equal(kept[outside], scores[outside])
    assert torch.allclose(kept[~outside], masked[~outside])
    # Centred: the adjustments sum to zero over K.
    assert torch.allclose((masked - scores)[~outside].view(2, 3).sum(-1), torch.zeros(2), atol=1e-5)


def test_top_k_larger_than_vocabulary_values_every_token():
    value_model = tiny_value_model("gpt2")
    ids, scores = torch.tensor([[BOS, 3]]), torch.randn(1, VOCAB_SIZE)
    out = VAS(value_model, beta=1.0, top_k=1000)(ids, scores)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, naive_vas([value_model], [1.0], ids, scores, top_k=1000), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(beta=float("nan")), "`beta`"),
        (dict(beta=[1.0, 2.0]), "`beta`"),
        (dict(beta="2"), "`beta`"),
        (dict(top_k=0), "`top_k`"),
        (dict(top_k=2.5), "`top_k`"),
        (dict(outside_top_k="zero"), "`outside_top_k`"),
        (dict(pad_token_id="0"), "`pad_token_id`"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAS(tiny_value_model("llama"), **kwargs)


def test_bad_value_models():
    with pytest.raises(ValueError, match="value_models"):
        VAS([])
    with pytest.raises(ValueError, match=r"value_models\[1\]"):
        VAS([tiny_value_model("llama"), "model"])


def test_vocabulary_mismatch_names_both_sizes():
    processor = VAS(tiny_value_model("llama"), beta=1.0)
    with pytest.raises(ValueError, match=f"200 tokens.*{VOCAB_SIZE}"):
        processor(torch.tensor([[BOS, 3]]), torch.randn(1, 200))


def test_value_model_on_another_device_is_a_clear_error():
    value_model = tiny_value_model("llama").to("meta")
    with pytest.raises(ValueError, match="is on meta but the scores are on cpu"):
        VAS(value_model)(torch.tensor([[BOS, 3]]), torch.randn(1, VOCAB_SIZE))


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])  # static: rollbacks move its pointer
def test_assisted_decoding_rollbacks_match_reference(cache_implementation):
    base, assistant, value_model = tiny_causal_lm("llama"), tiny_causal_lm("llama", seed=5), tiny_value_model("llama")
    processor = VAS(value_model, beta=1.0, top_k=5, cache_implementation=cache_implementation)
    _, before, after = generate_with_spies(base, processor, prompts=PROMPTS[1:2], assistant_model=assistant,
                                           do_sample=False, max_new_tokens=12)
    lengths = [ids.shape[1] for ids, _ in before.calls]
    assert any(later <= earlier for earlier, later in zip(lengths, lengths[1:]))  # it did move backwards
    assert_matches_reference(before, after, [value_model], [1.0], top_k=5)


def test_eval_reset_starts_from_scratch():
    value_model = tiny_value_model("llama")
    processor = VAS(value_model, beta=1.0, top_k=3)
    ids, scores = torch.tensor([[BOS, 4, 5]]), torch.randn(1, VOCAB_SIZE)
    first = processor(ids, scores)
    assert processor.cached_length == 3
    processor.reset()
    assert processor.cached_length == 0
    assert torch.allclose(processor(ids, scores), first)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compile", [False, True])  # True: the static cache and a CUDA-graph decoding step
def test_cuda_matches_reference(dtype, compile):
    base = tiny_causal_lm("llama", dtype=dtype).cuda()
    value_model = tiny_value_model("llama", dtype=dtype).cuda()
    prompts = PROMPTS.cuda()
    processor = VAS(value_model, beta=2.0, top_k=5, compile=compile)
    for seed in range(2):  # the second call replays what the first one captured
        _, before, after = generate_with_spies(base, processor, prompts=prompts, seed=seed)
        assert_matches_reference(before, after, [value_model], [2.0], top_k=5,
                                 atol=1e-3 if dtype == torch.float32 else 0.1)


def test_value_model_in_training_mode_warns_once(caplog):
    value_model = tiny_value_model("llama").train()
    processor = VAS(value_model)
    with caplog.at_level("WARNING", logger="vas_logits.processor"):
        processor(torch.tensor([[BOS, 3]]), torch.randn(1, VOCAB_SIZE))
        processor(torch.tensor([[BOS, 3, 4]]), torch.randn(1, VOCAB_SIZE))
    assert sum("training mode" in record.message for record in caplog.records) == 1
    assert math.isfinite(float(processor.betas[0]))
    assert isinstance(processor.value_models[0], ValueModel)


# ---------------------------------------------------------------------- the token head: Q(s, ·) from s alone


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_token_head_sampling_left_padded_matches_reference(architecture, cache_implementation):
    base, value_model = tiny_causal_lm(architecture), tiny_value_model(architecture, head="token")
    processor = VAS(value_model, beta=2.0, top_k=5, cache_implementation=cache_implementation)
    _, before, after = generate_with_spies(base, processor, max_new_tokens=12)
    assert_matches_reference(before, after, [value_model], [2.0], top_k=5)
    # one forward position per step: the cache holds the ids and nothing else
    assert processor.cached_length == PROMPTS.shape[1] + 11
    length = processor._caches[0].length if cache_implementation == "static" else processor._caches[0].get_seq_length()
    assert length == PROMPTS.shape[1] + 11


def test_token_head_beam_search_and_a_scalar_model_beside_it_match_reference():
    base = tiny_causal_lm("llama")
    token, scalar = tiny_value_model("llama", head="token"), tiny_value_model("llama", seed=3)
    processor = VAS([token, scalar], beta=[1.0, 0.5], top_k=6)
    _, before, after = generate_with_spies(base, processor, do_sample=False, num_beams=3, num_return_sequences=2)
    assert_matches_reference(before, after, [token, scalar], [1.0, 0.5], top_k=6)


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_token_head_assisted_decoding_rollbacks_match_reference(cache_implementation):
    base, assistant = tiny_causal_lm("llama"), tiny_causal_lm("llama", seed=5)
    value_model = tiny_value_model("llama", head="token")
    processor = VAS(value_model, beta=1.0, top_k=5, cache_implementation=cache_implementation)
    _, before, after = generate_with_spies(base, processor, prompts=PROMPTS[1:2], assistant_model=assistant,
                                           do_sample=False, max_new_tokens=12)
    assert_matches_reference(before, after, [value_model], [1.0], top_k=5)


def test_token_head_called_twice_on_the_same_ids_recomputes_the_last_state():
    value_model = tiny_value_model("llama", head="token")
    processor = VAS(value_model, beta=1.0, top_k=4)
    ids, scores = torch.tensor([[BOS, 4, 5]]), torch.randn(1, VOCAB_SIZE)
    first = processor(ids, scores)
    assert torch.allclose(processor(ids, scores), first, atol=1e-5)  # the cache re-fed its last id, no error
    assert torch.allclose(first, naive_vas([value_model], [1.0], ids, scores, 4), atol=1e-5)


def test_token_head_values_every_token_and_next_tokens_pick_from_them():
    value_model = tiny_value_model("gpt2", head="token")
    ids = torch.tensor([[BOS, 7, 8, 9]])
    every = value_model(ids).values  # (1, 4, V)
    assert every.shape == (1, 4, VOCAB_SIZE)
    picked = value_model(ids, next_tokens=torch.tensor([[[3, 50]] * 4])).values  # (1, 4, 2)
    assert torch.allclose(picked, every[..., [3, 50]], atol=1e-5)
    with pytest.raises(ValueError, match="`next_tokens` is for the token head"):
        tiny_value_model("gpt2")(ids, next_tokens=torch.tensor([[[3]] * 4]))
