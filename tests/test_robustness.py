"""No silent wrong answers: the processor under threads, interrupts, reuse, new weights, padding it cannot
infer, overflow and bad backbones. Each test compares against the naive closed form or expects a clear error."""

import threading

import numpy as np
import pytest
import torch
from transformers import BertConfig

from vas_logits import VAS, ValueModel

from .helpers import BOS, PAD, VOCAB_SIZE, Spy, tiny_causal_lm, tiny_config, tiny_value_model, word_tokenizer
from .test_processor import PROMPTS, assert_matches_reference, generate_with_spies

CACHES = ["dynamic", "static"]


class InterleaveInsideForward:
    """Makes two threads take turns inside the value model's forward: the wrapped layer of thread 1 runs first,
    then thread 0's, and so on. So thread 0 is always halfway through a forward (its first layer done, its cache
    half-updated) while thread 1 syncs its state and runs a whole step: any shared state would be corrupted."""

    def __init__(self, layer, threads):
        self.layer, self.original, self.threads = layer, layer.forward, threads
        self.condition, self.turn, self.timeouts = threading.Condition(), 0, 0
        layer.forward = self

    def __call__(self, *args, **kwargs):
        me = self.threads.index(threading.current_thread())
        with self.condition:
            if not self.condition.wait_for(lambda: self.turn % 2 == 1 - me, timeout=10):
                self.timeouts += 1
        try:
            return self.original(*args, **kwargs)
        finally:
            with self.condition:
                self.turn += 1
                self.condition.notify_all()


@pytest.mark.parametrize("cache_implementation", CACHES)
def test_one_processor_serving_two_threads_at_once(cache_implementation):
    base, value_model = tiny_causal_lm("llama"), tiny_value_model("llama")
    processor = VAS(value_model, beta=2.0, top_k=5, cache_implementation=cache_implementation)
    prompt_sets = [PROMPTS, PROMPTS[[2, 1, 0]]]  # other prompts, same batch size: the case that used to go wrong
    spies = [(Spy(), Spy()) for _ in prompt_sets]
    errors = []

    def work(me):
        try:
            prompts = prompt_sets[me]
            before, after = spies[me]
            torch.manual_seed(me)
            base.generate(input_ids=prompts, attention_mask=(prompts != PAD).long(), max_new_tokens=8,
                          do_sample=True, pad_token_id=PAD, eos_token_id=None,
                          logits_processor=[before, processor, after])
        except Exception as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(me,)) for me in range(2)]
    interleave = InterleaveInsideForward(value_model.backbone.layers[1], threads)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    value_model.backbone.layers[1].forward = interleave.original
    assert not errors, errors
    assert interleave.timeouts == 0 and interleave.turn == 16  # the steps really did interleave
    for before, after in spies:
        assert len(before.calls) == 8
        assert_matches_reference(before, after, [value_model], [2.0], top_k=5)
    # The instance still works for an ordinary call afterwards.
    _, before, after = generate_with_spies(base, processor, max_new_tokens=5)
    assert_matches_reference(before, after, [value_model], [2.0], top_k=5)


class FailOnCall:
    """Wraps a module's forward to raise `error` on its `fail_on`-th call (after the earlier layers ran)."""

    def __init__(self, module, fail_on, error=KeyboardInterrupt):
        self.module, self.original, self.calls, self.fail_on, self.error = module, module.forward, 0, fail_on, error
        module.forward = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise self.error
        return self.original(*args, **kwargs)

    def remove(self):
        self.module.forward = self.original


@pytest.mark.parametrize("cache_implementation", CACHES)
@pytest.mark.parametrize("then_reset", [False, True])
def test_an_interrupt_inside_a_forward_leaves_a_working_processor(cache_implementation, then_reset):
    base, value_model = tiny_causal_lm("llama"), tiny_value_model("llama")
    processor = VAS(value_model, beta=2.0, top_k=5, cache_implementation=cache_implementation)
    # The second layer fails on the 4th step: the first layer's cache has the step's columns, the second not.
    failing = FailOnCall(value_model.backbone.layers[1], fail_on=4)
    with pytest.raises(KeyboardInterrupt):
        generate_with_spies(base, processor, max_new_tokens=8)
    failing.remove()
    if then_reset:
        processor.reset()
    for seed, prompts in enumerate([PROMPTS, PROMPTS[:, :4]]):  # the same prompts again, then a prefix of them
        _, before, after = generate_with_spies(base, processor, prompts=prompts, seed=seed, max_new_tokens=8)
        assert_matches_reference(before, after, [value_model], [2.0], top_k=5)


@pytest.mark.parametrize("cache_implementation", CACHES)
def test_a_failed_step_in_the_middle_of_a_call_recovers_in_the_next_step(cache_implementation):
    value_model = tiny_value_model("gpt2")
    processor = VAS(value_model, beta=1.0, top_k=4, cache_implementation=cache_implementation)
    ids, scores = PROMPTS, torch.randn(3, VOCAB_SIZE)
    processor(ids, scores)
    failing = FailOnCall(value_model.backbone.h[1], fail_on=1, error=RuntimeError("CUDA out of memory"))
    longer = torch.cat([ids, torch.tensor([[7], [8], [9]])], -1)
    with pytest.raises(RuntimeError, match="out of memory"):
        processor(longer, scores)
    failing.remove()
    before, after = Spy(), Spy()
    before(longer, scores)
    after(longer, processor(longer, scores))
    assert_matches_reference(before, after, [value_model], [1.0], top_k=4)


@pytest.mark.parametrize("cache_implementation", CACHES)
def test_new_weights_between_calls_are_used(cache_implementation):
    base, value_model = tiny_causal_lm("qwen2"), tiny_value_model("qwen2", seed=1)
    processor = VAS(value_model, beta=2.0, top_k=5, cache_implementation=cache_implementation)
    generate_with_spies(base, processor, max_new_tokens=4)
    value_model.load_state_dict(tiny_value_model("qwen2", seed=7).state_dict())  # a newer checkpoint, in place
    _, before, after = generate_with_spies(base, processor, max_new_tokens=4)  # same prompts: prefix is shared
    assert_matches_reference(before, after, [value_model], [2.0], top_k=5)


def test_input_ids_edited_in_place_after_a_call_are_seen():
    value_model = tiny_value_model("llama")
    processor = VAS(value_model, beta=1.0, top_k=4)
    ids, scores = PROMPTS.clone(), torch.randn(3, VOCAB_SIZE)
    processor(ids, scores)
    ids[:, -1] = 40  # the caller reuses its buffer for other ids
    longer = torch.cat([ids, torch.tensor([[7], [8], [9]])], -1)
    out = processor(longer, scores)
    before, after = Spy(), Spy()
    before(longer, scores)
    after(longer, out)
    assert_matches_reference(before, after, [value_model], [1.0], top_k=4)


# ---------------------------------------------------------------------- padding it cannot infer


def bos_is_pad_models():
    """A value model whose pad id equals its BOS id (tokenizers that pad with BOS)."""
    base = tiny_causal_lm("llama")
    torch.manual_seed(3)
    value_model = ValueModel.from_backbone(tiny_config("llama"), pad_token_id=BOS)
    with torch.no_grad():
        value_model.head.weight.normal_()
    return base, value_model.eval()


# Left-padded with the BOS id itself: row 1 is [pad, pad, BOS, ...], its BOS a real token.
BOS_PADDED = torch.tensor([[BOS, 5, 6, 7, 8], [BOS, BOS, BOS, 9, 10]])
BOS_PADDED_MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


def test_pad_equal_to_bos_is_a_clear_error_without_the_mask():
    base, value_model = bos_is_pad_models()
    with pytest.raises(ValueError, match="set_attention_mask"):
        generate_with_spies(base, VAS(value_model, beta=2.0, top_k=5), prompts=BOS_PADDED, pad_token_id=BOS)


@pytest.mark.parametrize("cache_implementation", CACHES)
def test_the_attention_mask_gives_exact_padding(cache_implementation):
    base, value_model = bos_is_pad_models()
    processor = VAS(value_model, beta=2.0, top_k=5, cache_implementation=cache_implementation)
    kwargs = dict(prompts=BOS_PADDED, pad_token_id=BOS, max_new_tokens=6)
    torch.manual_seed(0)
    _, before, after = generate_with_spies(base, processor.set_attention_mask(BOS_PADDED_MASK), **kwargs)
    assert_matches_reference(before, after, [value_model], [2.0], top_k=5, prompt_mask=BOS_PADDED_MASK)
    # Expanded rows (num_return_sequences) and beam reordering.
    _, before, after = generate_with_spies(base, processor.set_attention_mask(BOS_PADDED_MASK), **kwargs,
                                           num_beams=2, num_return_sequences=2, do_sample=False)
    assert_matches_reference(before, after, [value_model], [2.0], top_k=5, prompt_mask=BOS_PADDED_MASK)
    # A later call with other prompts does not reuse the old mask: without one, it is ambiguous again.
    with pytest.raises(ValueError, match="set_attention_mask"):
        generate_with_spies(base, processor, prompts=BOS_PADDED[[1, 0]], pad_token_id=BOS)


def test_an_attention_mask_of_the_wrong_shape_is_a_clear_error():
    processor = VAS(tiny_value_model("llama"), beta=1.0, top_k=3)
    processor.set_attention_mask(torch.ones(2, 9))
    with pytest.raises(ValueError, match=r"shape \(2, 9\).*input_ids of shape \(3, 6\)"):
        processor(PROMPTS, torch.randn(3, VOCAB_SIZE))
    with pytest.raises(ValueError, match="`attention_mask`"):
        processor.set_attention_mask([[1, 1]])


def test_gpt2_style_pad_bos_eos_all_one_id():
    config = tiny_config("gpt2")
    config.pad_token_id = config.bos_token_id = config.eos_token_id = 2
    torch.manual_seed(0)
    base = torch.nn.Module.eval(__import__("transformers").AutoModelForCausalLM.from_config(config))
    value_model = ValueModel.from_backbone(config)
    with torch.no_grad():
        value_model.head.weight.normal_()
    assert value_model.config.pad_token_id == 2  # taken from the config
    prompts, mask = torch.tensor([[2, 2, 30, 31], [2, 40, 41, 42]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    processor = VAS(value_model, beta=2.0, top_k=5)
    with pytest.raises(ValueError, match="BOS token id"):
        generate_with_spies(base, processor, prompts=prompts, pad_token_id=2)
    before, after = Spy(), Spy()
    torch.manual_seed(0)
    base.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=6, do_sample=True, pad_token_id=2,
                  eos_token_id=None, logits_processor=[before, processor.set_attention_mask(mask), after])
    assert_matches_reference(before, after, [value_model], [2.0], top_k=5, prompt_mask=mask)


def test_unknown_pad_id_on_a_batch_is_a_clear_error_and_eos_is_the_fallback():
    config = tiny_config("llama")
    config.pad_token_id = None
    value_model = ValueModel.from_backbone(config)
    assert VAS(value_model).pad_token_id == config.eos_token_id  # generate() pads with EOS when pad is unset
    config.eos_token_id = None
    processor = VAS(ValueModel.from_backbone(config))
    assert processor.pad_token_id is None
    with pytest.raises(ValueError, match="cannot tell left padding"):
        processor(PROMPTS, torch.randn(3, VOCAB_SIZE))
    processor.set_attention_mask((PROMPTS != PAD).long())
    assert torch.isfinite(processor(PROMPTS, torch.randn(3, VOCAB_SIZE))).sum() == 3 * processor.top_k == 3 * 20


def test_inputs_embeds_without_input_ids_is_a_clear_error():
    base, value_model = tiny_causal_lm("llama"), tiny_value_model("llama")
    embeds = base.get_input_embeddings()(PROMPTS[1:])
    with pytest.raises(ValueError, match="inputs_embeds"):
        base.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=True, pad_token_id=PAD,
                      logits_processor=[VAS(value_model, beta=1.0, top_k=4)])
    # With both, the value models see the prompt ids.
    before, after = Spy(), Spy()
    base.generate(input_ids=PROMPTS[1:], inputs_embeds=embeds, max_new_tokens=3, do_sample=True, pad_token_id=PAD,
                  logits_processor=[before, VAS(value_model, beta=1.0, top_k=4), after])
    assert_matches_reference(before, after, [value_model], [1.0], top_k=4)


# ---------------------------------------------------------------------- overflow, bad numbers, bad backbones


@pytest.mark.parametrize("mode", [dict(do_sample=True), dict(do_sample=False), dict(do_sample=False, num_beams=2)])
def test_overflowing_values_are_a_clear_error_in_every_mode(mode):
    base = tiny_causal_lm("llama")
    value_model = tiny_value_model("llama", dtype=torch.float16)
    with torch.no_grad():
        value_model.head.weight.mul_(3e4)  # fp16 tops out at 65504
    with pytest.raises(ValueError, match="non-finite.*float16"):
        generate_with_spies(base, VAS(value_model, beta=1.0, top_k=5), **mode)
    with pytest.raises(ValueError, match="non-finite"):
        generate_with_spies(base, VAS(tiny_value_model("llama"), beta=1e308, top_k=5), **mode)


def test_numpy_numbers_are_accepted():
    value_model = tiny_value_model("llama")
    processor = VAS(value_model, beta=np.float32(2.0), top_k=np.int64(4), pad_token_id=np.int64(PAD))
    assert processor.betas == [2.0] and processor.top_k == 4 and type(processor.top_k) is int
    assert VAS([value_model, value_model], beta=np.array([1.0, -1.0])).betas == [1.0, -1.0]
    with pytest.raises(ValueError, match="`top_k`"):
        VAS(value_model, top_k=np.float64(4.0))


def test_a_bidirectional_backbone_is_refused():
    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64)
    with pytest.raises(ValueError, match="causal.*'bert'.*bidirectional"):
        ValueModel.from_backbone(config)


def test_weights_with_nan_are_refused_on_load(tmp_path):
    value_model = tiny_value_model("llama")
    with torch.no_grad():
        value_model.backbone.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    value_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"non-finite.*layers\.0\.mlp\.up_proj\.weight"):
        ValueModel.from_pretrained(tmp_path)


def test_a_text_past_a_gpt2_value_models_positions_is_a_clear_error():
    """GPT-2's learned position table has 256 rows in the tests: an input past it is a ValueError naming the
    length and the limit (before: IndexError deep in the embedding), in-process and through TextValuer; a
    rotary value model takes the same input."""
    from vas_logits.text_values import TextValuer

    base, gpt2 = tiny_causal_lm("llama"), tiny_value_model("gpt2")
    assert gpt2.max_positions == 256 and tiny_value_model("llama").max_positions is None
    prompt = torch.randint(4, 60, (1, 250))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"is 257 tokens, but the value model \(gpt2\) has learned position "
                                         r"embeddings for 256 only"):
        base.generate(prompt, logits_processor=[VAS(gpt2, beta=1.0)], **kwargs)
    base.generate(prompt, logits_processor=[VAS(tiny_value_model("llama"), beta=1.0)], **kwargs)
    with pytest.raises(ValueError, match="has learned position embeddings for 256 only"):
        TextValuer(gpt2, word_tokenizer()).values(" ".join(["w5"] * 300), [" w6", " w7"])


def test_fit_refuses_prompts_past_the_value_models_positions_before_sampling(tmp_path):
    """Sampled prompts: prompt + max_new_tokens is checked before any sampling (no reward call, nothing
    stored); given samples, whose lengths are known once tokenised, are refused with the sample named."""
    from vas_logits import fit

    from .helpers import count_good_words

    calls = []

    def reward(prompts, completions):
        calls.append(len(completions))
        return count_good_words(prompts, completions)

    prompts = [" ".join(["w5"] * 20), " ".join(["w6"] * 250)]
    with pytest.raises(ValueError, match=r"Prompt 1 \(251 tokens\) \+ max_new_tokens \(8\) is 259 tokens, but the "
                                         r"value model \(gpt2\) has learned position embeddings for 256 only"):
        fit(tiny_causal_lm("llama"), word_tokenizer(), prompts, reward, tiny_value_model("gpt2"),
            samples_per_prompt=2, max_new_tokens=8, epochs=1, batch_size=4, learning_rate=1e-2, progress=False,
            output_dir=tmp_path, eval_fraction=0.0)
    assert calls == [] and not (tmp_path / "samples.jsonl").exists()
    given = [{"prompt": prompt, "completion": " w7" * 6, "reward": 1.0} for prompt in prompts]
    with pytest.raises(ValueError, match=r"A sample of prompt 1 \(prompt \+ completion\) is 258 tokens"):
        fit(None, word_tokenizer(), samples=given, value_model=tiny_value_model("gpt2"), epochs=1, batch_size=4,
            progress=False, eval_fraction=0.0)
