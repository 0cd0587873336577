"""The static-cache path (fixed-address buffers, a write pointer) and the compiled path against the naive
closed form, and the properties that make them capturable: buffers that never move, no recompilation."""

import pytest
import torch

from vas_logits import VAS
from vas_logits.static_cache import CAPACITY_STEP, StaticColumnCache

from .helpers import ARCHITECTURES, BOS, PAD, Spy, tiny_causal_lm, tiny_value_model
from .test_processor import PROMPTS, assert_matches_reference, generate_with_spies


def buffer_addresses(processor) -> list[int]:
    return [layer.keys.data_ptr() for cache in processor._caches for layer in cache.layers]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_static_sampling_left_padded_matches_reference(architecture):
    base, value_model = tiny_causal_lm(architecture), tiny_value_model(architecture)
    processor = VAS(value_model, beta=2.0, top_k=5, cache_implementation="static")
    _, before, after = generate_with_spies(base, processor, max_new_tokens=12)
    assert_matches_reference(before, after, [value_model], [2.0], top_k=5)
    assert isinstance(processor._caches[0], StaticColumnCache)
    assert processor._caches[0].length == processor.cached_length == PROMPTS.shape[1] + 11


def test_static_beam_search_reorders_in_place():
    base, value_model = tiny_causal_lm("llama"), tiny_value_model("llama")
    processor = VAS(value_model, beta=1.0, top_k=6, cache_implementation="static")
    addresses = []

    class Watch:  # records the buffers' addresses after every processor call
        def __call__(self, input_ids, scores):
            addresses.append(buffer_addresses(processor))
            return scores

    before, after = Spy(), Spy()
    torch.manual_seed(0)
    base.generate(input_ids=PROMPTS, attention_mask=(PROMPTS != PAD).long(), max_new_tokens=10, do_sample=False,
                  num_beams=3, num_return_sequences=2, pad_token_id=PAD, eos_token_id=None,
                  logits_processor=[before, processor, after, Watch()])
    reordered = any(not torch.equal(b[0][:, :-1], a[0]) for a, b in zip(before.calls, before.calls[1:]))
    assert reordered
    assert_matches_reference(before, after, [value_model], [1.0], top_k=6)
    assert all(step == addresses[0] for step in addresses)  # the buffers never moved


def test_static_buffers_are_reused_across_calls_of_one_batch_size():
    base, value_model = tiny_causal_lm("qwen2"), tiny_value_model("qwen2")
    processor = VAS(value_model, beta=2.0, top_k=5, cache_implementation="static")
    prompt_sets = [PROMPTS, PROMPTS[[2, 0, 1]], PROMPTS[1:], PROMPTS]
    addresses = []
    for index, prompts in enumerate(prompt_sets):
        _, before, after = generate_with_spies(base, processor, prompts=prompts, seed=index, max_new_tokens=6)
        assert_matches_reference(before, after, [value_model], [2.0], top_k=5)
        assert processor._caches[0].length == processor.cached_length == prompts.shape[1] + 5
        addresses.append(buffer_addresses(processor))
    assert addresses[0] == addresses[1]  # same batch size: same buffers, pointer back to 0
    assert addresses[2] != addresses[1]  # two rows: new buffers


def test_static_cache_grows_past_its_capacity():
    base, value_model = tiny_causal_lm("llama"), tiny_value_model("llama")
    prompts = torch.randint(3, 96, (2, CAPACITY_STEP - 8))
    prompts[:, 0], prompts[1, :3] = BOS, PAD
    processor = VAS(value_model, beta=2.0, top_k=5, cache_implementation="static")
    _, before, after = generate_with_spies(base, processor, prompts=prompts, max_new_tokens=8)
    assert_matches_reference(before, after, [value_model], [2.0], top_k=5)
    assert processor._caches[0].capacity == 2 * CAPACITY_STEP


@pytest.mark.parametrize("head", ["scalar", "token"])
def test_compiled_step_matches_reference_without_graph_breaks_or_recompiling(head):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    base, value_model = tiny_causal_lm("llama"), tiny_value_model("llama", head=head)
    processor = VAS(value_model, beta=2.0, top_k=5, compile=True)
    _, before, after = generate_with_spies(base, processor, max_new_tokens=8)
    assert_matches_reference(before, after, [value_model], [2.0], top_k=5)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    compiled_frames = counters["stats"]["unique_graphs"]
    assert compiled_frames >= 1
    _, before, after = generate_with_spies(base, processor, prompts=PROMPTS[[1, 2, 0]], seed=1, max_new_tokens=8)
    assert_matches_reference(before, after, [value_model], [2.0], top_k=5)
    assert counters["stats"]["unique_graphs"] == compiled_frames  # same batch size: nothing recompiled


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(cache_implementation="paged"), "`cache_implementation` must be one of .*'paged'"),
        (dict(compile=True, cache_implementation="dynamic"), "`compile=True` needs cache_implementation='static'"),
    ],
)
def test_bad_cache_arguments_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAS(tiny_value_model("llama"), **kwargs)


def test_static_cache_crop_counts_from_the_end():
    cache = StaticColumnCache(num_layers=1, capacity=8)
    keys = torch.randn(2, 1, 5, 4)
    cache.update(keys, keys, 0)
    cache.crop(-2)
    assert cache.length == 3
    with pytest.raises(ValueError, match="`tokens_to_remove` must be <= 0"):
        cache.crop(1)

