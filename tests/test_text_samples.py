"""fit() on samples given as text (JSONL, datasets.Dataset, dicts) and on samples drawn through an API endpoint."""

import json

import pytest
import torch

from vas_logits import CompletionsEndpoint, PrefixRewards, ValueModel, fit
from vas_logits.text_samples import read_text_samples, tokenize_text_sample

from .helpers import EOS, bpe_tokenizer, count_good_words, tiny_causal_lm, word_tokenizer
from .test_fit import FIT_OPTIONS, random_prompts


def stored(output_dir):
    return [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]


def as_text_records(samples, prompts, tokenizer):
    """What another engine would have written for these samples: the completion as text, ending by itself or not."""
    records = []
    for sample in samples:
        ids = sample["completion_ids"]
        finished = bool(ids) and ids[-1] == EOS
        words = tokenizer.convert_ids_to_tokens(ids[:-1] if finished else ids)
        records.append({"prompt": prompts[sample["prompt_index"]], "completion": "".join(" " + w for w in words),
                        "reward": sample["reward"], "finish_reason": "stop" if finished else "length"})
    return records


@pytest.mark.parametrize("form", ["list", "jsonl", "dataset"])
def test_given_text_samples_train_exactly_as_the_same_samples_drawn_in_process(tmp_path, form):
    """Samples written out as text and given back re-tokenise to the same ids, so fit() trains the same model."""
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    prompts = random_prompts(12)
    options = dict(FIT_OPTIONS, epochs=2, eval_fraction=0.25)
    torch.manual_seed(0)  # (given samples have no reward_fn to score prefixes with: none here either)
    local = fit(base, tokenizer, prompts, count_good_words, ValueModel.from_backbone(base, num_layers=1),
                output_dir=tmp_path / "local", prefix_rewards=None, **options)
    records = as_text_records(stored(tmp_path / "local"), prompts, tokenizer)
    assert any(r["finish_reason"] == "stop" for r in records) or all(r["finish_reason"] == "length" for r in records)
    source = records
    if form == "jsonl":
        source = tmp_path / "samples.jsonl"
        source.write_text("".join(json.dumps(record) + "\n" for record in records))
    elif form == "dataset":
        datasets = pytest.importorskip("datasets")
        source = datasets.Dataset.from_list(records)
    torch.manual_seed(0)
    given = fit(None, tokenizer, samples=source, value_model=ValueModel.from_backbone(base, num_layers=1),
                output_dir=tmp_path / "given", **options)
    retokenised = [tokenize_text_sample(tokenizer, prompts.index(r["prompt"]), r["prompt"], r["completion"],
                                        r["reward"], r["finish_reason"]).record() for r in records]
    assert retokenised == stored(tmp_path / "local")
    assert not (tmp_path / "given" / "samples.jsonl").exists()  # given samples are re-read, never copied
    for name, parameter in local.state_dict().items():
        torch.testing.assert_close(given.state_dict()[name], parameter, msg=name)
    assert given.config.reward == "given rewards"


def test_a_completion_that_merges_with_the_prompt_is_split_at_the_shared_tokens():
    tokenizer = bpe_tokenizer()
    sample = tokenize_text_sample(tokenizer, 0, "the movie wa", "s great", 1.0, "stop")
    full = tokenizer("the movie was great")["input_ids"]
    assert sample.prompt_ids + sample.completion_ids == full + [tokenizer.eos_token_id]
    assert len(sample.prompt_ids) < len(tokenizer("the movie wa")["input_ids"])  # "wa" merged into "was"
    cut = tokenize_text_sample(tokenizer, 0, "the movie", " was", 1.0, "length")
    assert cut.completion_ids == tokenizer("the movie was")["input_ids"][-1:]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "w4", "completion": " w5"}, r"samples\[0\] lacks \['reward'\]"),
    ({"prompt": "", "completion": " w5", "reward": 1}, "prompt ''"),
    ({"prompt": "w4", "completion": None, "reward": 1}, "completion None"),
    ({"prompt": "w4", "completion": " w5", "reward": "1"}, "reward '1'"),
    ({"prompt": "w4", "completion": " w5", "reward": float("inf")}, "finite number"),
    ({"prompt": "w4", "completion": " w5", "reward": 1, "finish_reason": "eos"}, "finish_reason 'eos'"),
    ("w4 w5", "must be a dict"),
])
def test_bad_records_are_named(record, message):
    with pytest.raises(ValueError, match=message):
        read_text_samples([record])


def test_a_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "w4", "completion": " w5", "reward": 1}\n\n{"prompt": "w4", \n')
    with pytest.raises(ValueError, match="line 3 of .*s.jsonl is not JSON"):
        read_text_samples(path)
    with pytest.raises(ValueError, match="is not a file"):
        read_text_samples(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="holds no sample"):
        read_text_samples([])


def test_fit_refuses_mixed_or_missing_sources():
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    records = [{"prompt": "w4", "completion": " w5", "reward": 1.0}]
    with pytest.raises(ValueError, match="either `samples`"):
        fit(base, tokenizer, ["w4"], count_good_words, samples=records)
    with pytest.raises(ValueError, match="no default value model"):
        fit(None, tokenizer, samples=records)
    with pytest.raises(ValueError, match="`base_model` is None"):
        fit(None, tokenizer, ["w4"], count_good_words)
    with pytest.raises(ValueError, match="`reward_fn` must be a callable"):
        fit(base, tokenizer, ["w4"])
    with pytest.raises(ValueError, match=r"wrap an API URL in CompletionsEndpoint\(url\)"):
        fit("http://127.0.0.1:8000/v1", tokenizer, ["w4"], count_good_words)


def test_other_given_samples_are_refused_in_the_same_output_dir(tmp_path):
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    records = [{"prompt": "w4 w5", "completion": " w6 w7", "reward": 1.0},
               {"prompt": "w8", "completion": " w9", "reward": 0.0, "finish_reason": "length"}]
    options = dict(FIT_OPTIONS, epochs=1, output_dir=tmp_path)
    fit(None, tokenizer, samples=records, value_model=ValueModel.from_backbone(base, num_layers=1), **options)
    records[1]["reward"] = 5.0
    with pytest.raises(ValueError, match="samples"):
        fit(None, tokenizer, samples=records, value_model=ValueModel.from_backbone(base, num_layers=1), **options)


def test_fit_samples_through_an_endpoint(tmp_path):
    """The served model is sampled through the API (n completions per prompt), each text scored by reward_fn and
    tokenised with the value model's tokenizer."""
    pytest.importorskip("openai")
    from .fake_endpoint import FakeEndpoint

    tokenizer = word_tokenizer()
    served = FakeEndpoint(tiny_causal_lm("llama"), tokenizer)
    try:
        endpoint = CompletionsEndpoint(served.url, timeout=10, max_retries=0, concurrency=3)
        prompts = random_prompts(6)
        value_model = ValueModel.from_backbone(tiny_causal_lm("gpt2"), num_layers=1)  # not the served architecture
        trained = fit(endpoint, tokenizer, prompts, count_good_words, value_model,
                      output_dir=tmp_path, **dict(FIT_OPTIONS, epochs=1, max_new_tokens=5))
        with pytest.raises(ValueError, match="candidates=2.*needs a local transformers base model"):
            fit(endpoint, tokenizer, prompts, count_good_words, value_model, output_dir=tmp_path / "other",
                prefix_rewards=PrefixRewards(candidates=2), **dict(FIT_OPTIONS, epochs=1, max_new_tokens=5))
    finally:
        served.close()
    assert len(served.requests) == 6 * 2  # the server returns one choice per request: asked again for the second
    assert sorted(body["n"] for body in served.requests) == [1] * 6 + [2] * 6
    assert all(body["max_tokens"] == 5 and body["temperature"] == 1.0 for body in served.requests)
    samples = stored(tmp_path)
    assert sorted(sample["prompt_index"] for sample in samples) == sorted(list(range(6)) * 2)
    for sample in samples:
        ids = sample["completion_ids"]
        text = "".join(" " + w for w in tokenizer.convert_ids_to_tokens([i for i in ids if i != EOS]))
        assert sample["reward"] == count_good_words([""], [text])[0]
        assert len([i for i in ids if i != EOS]) <= 5
    assert trained.config.base_model == "tiny"
    # fit()'s default prefix rewards apply; their candidates need the base's logits, which an API does not give
    assert (tmp_path / "prefix-rewards.jsonl").exists() and not list(tmp_path.glob("candidate-rewards-*"))
    fingerprint = json.loads((tmp_path / "sampling.json").read_text())
    assert fingerprint["base_model"] == {"name": "tiny", "endpoint": served.url}


def test_an_endpoint_failure_keeps_earlier_batches_and_a_rerun_samples_only_the_rest(tmp_path):
    pytest.importorskip("openai")
    from vas_logits import EndpointError

    from .fake_endpoint import FakeEndpoint

    tokenizer = word_tokenizer()
    served = FakeEndpoint(tiny_causal_lm("llama"), tokenizer)
    prompts = random_prompts(6)
    options = dict(FIT_OPTIONS, epochs=1, max_new_tokens=3, output_dir=tmp_path)  # 2 prompts per batch
    try:
        endpoint = CompletionsEndpoint(served.url, timeout=10, max_retries=0, concurrency=1)
        served.misbehave = lambda number, body: (503, b"{}") if number > 4 else None  # fails in the 2nd batch
        with pytest.raises(EndpointError, match=r"/completions \(prompt \d\): request failed.*HTTP 503"):
            fit(endpoint, tokenizer, prompts, count_good_words,
                ValueModel.from_backbone(tiny_causal_lm("llama"), num_layers=1), **options)
        assert len(stored(tmp_path)) == 4  # the first batch: 2 prompts × 2 samples
        served.misbehave, served.requests[:] = None, []
        fit(endpoint, tokenizer, prompts, count_good_words,
            ValueModel.from_backbone(tiny_causal_lm("llama"), num_layers=1), **options)
    finally:
        served.close()
    assert len(served.requests) == 4 * 2 and len(stored(tmp_path)) == 12


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_samples_file_inside_output_dir_is_refused_and_left_untouched(tmp_path, overwrite):
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    user_file = tmp_path / "samples.jsonl"  # the name fit() uses for its own store
    user_file.write_text(json.dumps({"prompt": "w4 w5", "completion": " w6", "reward": 1.0}) + "\n")
    before = user_file.read_bytes()
    with pytest.raises(ValueError, match="Your file is left as it is: move it out of output_dir"):
        fit(None, tokenizer, samples=user_file, value_model=ValueModel.from_backbone(base, num_layers=1),
            output_dir=tmp_path, overwrite_output_dir=overwrite, **FIT_OPTIONS)
    assert user_file.read_bytes() == before


def test_numpy_rewards_are_numbers_and_overflowing_or_empty_records_are_named():
    numpy = pytest.importorskip("numpy")
    tokenizer = word_tokenizer()
    records = read_text_samples([{"prompt": "w4", "completion": " w5", "reward": numpy.float32(0.5)},
                                 {"prompt": "w6", "completion": " w7", "reward": numpy.int64(2)}])
    assert [record["reward"] for record in records] == [0.5, 2.0]
    with pytest.raises(ValueError, match=r"samples\[1\] has reward 1e\+39; expected a finite number within float32"):
        read_text_samples([{"prompt": "w4", "completion": " w5", "reward": 0.0},
                           {"prompt": "w6", "completion": " w7", "reward": 1e39}])
    with pytest.raises(ValueError, match=r"completion '' of prompt 3 .*finish_reason 'length'"):
        tokenize_text_sample(tokenizer, 3, "w4 w5", "", 1.0, "length")
    assert tokenize_text_sample(tokenizer, 3, "w4 w5", "", 1.0, "stop").completion_ids == [EOS]  # EOS is a token


def test_an_empty_cut_completion_fails_before_training_naming_its_prompt(tmp_path):
    tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
    records = [{"prompt": "w4 w5", "completion": " w6", "reward": 1.0},
               {"prompt": "w8", "completion": "", "reward": 0.0, "finish_reason": "length"}]
    with pytest.raises(ValueError, match=r"prompt 1 \('w8'\)"):
        fit(None, tokenizer, samples=records, value_model=ValueModel.from_backbone(base, num_layers=1),
            output_dir=tmp_path / "run", **FIT_OPTIONS)
    records[1]["completion"] = " w9"  # the user mends the record: the same output_dir takes it
    fit(None, tokenizer, samples=records, value_model=ValueModel.from_backbone(base, num_layers=1),
        output_dir=tmp_path / "run", **FIT_OPTIONS)
