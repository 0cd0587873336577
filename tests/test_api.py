"""API mode (VASClient) against a small OpenAI-compatible server backed by a tiny model: the same answers as
in-process VAS and as a naive reference loop, and clear errors when the server misbehaves."""

import json
import socket
import time

import pytest
import torch
from transformers import SuppressTokensLogitsProcessor

from vas_logits import VAS
from vas_logits.api import APIGenerationError, VASClient
from vas_logits.endpoint import CompletionsEndpoint, EndpointError

from .fake_endpoint import SUPPRESSED, FakeEndpoint
from .helpers import EOS, PAD, bpe_tokenizer, tiny_causal_lm, tiny_value_model, word_tokenizer

pytest.importorskip("openai")

PROMPTS = ["w4 w5 w6", "w30", "w7 w8 w9 w10 w11 w12"]


@pytest.fixture
def served():
    endpoint = FakeEndpoint(tiny_causal_lm("llama"), word_tokenizer())
    yield endpoint
    endpoint.close()


def make_client(served, value_models, tokenizers, beta, top_k=5, timeout=10.0, max_retries=0, **kwargs):
    endpoint = CompletionsEndpoint(served.url, timeout=timeout, max_retries=max_retries)
    return VASClient(endpoint, value_models, tokenizers, beta=beta, top_k=top_k, **kwargs)


@pytest.mark.parametrize("head", ["scalar", "distributional"])
@pytest.mark.parametrize("beta", [0.0, 3.0])
def test_greedy_matches_in_process_generate(served, head, beta):
    """Through the API, greedy VAS picks the same tokens as generate() with the processor: log-softmax only
    shifts each row's logits, and the candidates and their values are the same."""
    metadata = {"head": "distributional", "num_atoms": 5} if head == "distributional" else {}
    value_models = [tiny_value_model("llama", seed=3, **metadata), tiny_value_model("gpt2", seed=4)]
    betas = [beta, -beta / 2]
    tokenizer = word_tokenizer()
    client = make_client(served, value_models, tokenizer, betas, top_k=5, concurrency=2)
    results = client.generate(PROMPTS, max_new_tokens=10, do_sample=False, progress=False)
    for prompt, result in zip(PROMPTS, results):
        input_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        processors = [SuppressTokensLogitsProcessor(list(SUPPRESSED)), VAS(value_models, beta=betas, top_k=5)]
        output = served.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                       max_new_tokens=10, logits_processor=processors, pad_token_id=PAD,
                                       eos_token_id=EOS)
        expected = output[0].tolist()
        finished = expected[-1] == EOS
        assert tokenizer(prompt + result.text)["input_ids"] == (expected[:-1] if finished else expected)
        assert result.finish_reason == ("stop" if finished else "length")
        assert result.num_steps == len(expected) - input_ids.shape[1]


def naive_decode(served, value_models, tokenizers, betas, prompt, seed, top_k, max_new_tokens, temperature):
    """The API-mode closed form, every value from a full recompute of V(tokenize(text + piece))."""
    generator = torch.Generator().manual_seed(seed)
    text = ""
    for _ in range(max_new_tokens):
        values, ids = served.next_logprobs(prompt + text).topk(top_k)
        pieces = [served.piece(i) for i in ids.tolist()]
        logits = values.clone()
        for model, tokenizer, beta in zip(value_models, tokenizers, betas):
            texts = [prompt + text + (piece or tokenizer.eos_token) for piece in pieces]
            q = torch.stack([model.beta_times_q(model(torch.tensor([tokenizer(t)["input_ids"]])), beta, 1)[0, 0]
                             for t in texts])
            logits += q - q.mean()
        choice = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator))
        if pieces[choice] == "":
            return text, "stop"
        text += pieces[choice]
    return text, "length"


def test_sampling_matches_naive_reference_with_other_tokenizers(served):
    """Sampling, two value models, one with a BPE tokenizer that splits and merges the server's pieces."""
    value_models = [tiny_value_model("llama", seed=5), tiny_value_model("qwen2", seed=6)]
    tokenizers = [word_tokenizer(), bpe_tokenizer()]
    betas = [2.0, 4.0]
    client = make_client(served, value_models, tokenizers, betas, top_k=6, concurrency=3)
    results = client.generate(PROMPTS, max_new_tokens=8, temperature=0.7, seed=11, progress=False)
    for index, (prompt, result) in enumerate(zip(PROMPTS, results)):
        text, finish_reason = naive_decode(served, value_models, tokenizers, betas, prompt, 11 + index, 6, 8, 0.7)
        assert (result.text, result.finish_reason) == (text, finish_reason)
    assert all(body["logprobs"] == 6 and body["max_tokens"] == 1 for body in served.requests)


def test_results_do_not_depend_on_concurrency_and_beta_is_per_request(served):
    value_model = tiny_value_model("llama", seed=7)
    client = make_client(served, value_model, word_tokenizer(), 0.0, concurrency=1)
    one = client.generate(PROMPTS, max_new_tokens=6, seed=3, progress=False)
    client.concurrency = 3
    three = client.generate(PROMPTS, max_new_tokens=6, seed=3, progress=False)
    assert one == three
    steered = client.generate(PROMPTS, max_new_tokens=6, seed=3, beta=50.0, progress=False)
    assert [r.text for r in steered] != [r.text for r in one]  # a strong beta changes the samples
    assert client.betas == [0.0]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_is_the_number_of_requests_in_flight(served, concurrency):
    served.delay = 0.1  # long enough for the threads' requests to overlap
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0, concurrency=concurrency)
    client.generate(PROMPTS * 2, max_new_tokens=3, progress=False)
    assert served.max_in_flight == concurrency


def test_prompts_from_any_iterable_and_none_at_all(served):
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0)
    listed = client.generate(PROMPTS, max_new_tokens=3, progress=False)
    assert client.generate(iter(PROMPTS), max_new_tokens=3, progress=False) == listed
    assert client.generate([], progress=False) == []


def test_stop_strings_cut_the_text(served):
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 0.0)
    free = client.generate(PROMPTS[:1], max_new_tokens=6, do_sample=False, progress=False)[0]
    pieces = free.text.split(" ")
    assert len(pieces) > 3, free
    stop = " " + pieces[3]  # the third generated word
    cut = client.generate(PROMPTS[:1], max_new_tokens=6, do_sample=False, stop=[stop], progress=False)[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    assert stop not in cut.text


# ---------------------------------------------------------------------------------------------------- bad input


def test_unreachable_server_is_a_clear_error_not_a_hang():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = CompletionsEndpoint(f"http://127.0.0.1:{port}/v1", model="m", timeout=2, max_retries=0)
    client = VASClient(endpoint, tiny_value_model("llama"), word_tokenizer())
    start = time.perf_counter()
    with pytest.raises(APIGenerationError, match=rf"127.0.0.1:{port}/v1/completions \(prompt 0, step 0\)") as info:
        client.generate(["w4"], progress=False)
    assert time.perf_counter() - start < 10
    assert "APIConnectionError" in str(info.value)
    assert info.value.completions[0].finish_reason == "error"


@pytest.mark.parametrize("status, retried", [(500, True), (503, True), (400, False), (404, False)])
def test_http_errors_are_retried_when_transient(served, status, retried):
    served.misbehave = lambda number, body: (status, b'{"error": {"message": "nope"}}')
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0, max_retries=1)
    with pytest.raises(APIGenerationError, match=f"HTTP {status}"):
        client.generate(["w4"], progress=False)
    assert len(served.requests) == (2 if retried else 1)


def test_a_404_says_what_base_url_must_be(served):
    served.misbehave = lambda number, body: (404, b'{"error": {"message": "Not Found"}}')
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0, max_retries=0)
    with pytest.raises(APIGenerationError, match=r"HTTP 404.*`base_url` must be the API root .*/v1"):
        client.generate(["w4"], progress=False)


def test_a_transient_error_is_retried_and_then_succeeds(served):
    served.misbehave = lambda number, body: (500, b"{}") if number == 2 else None
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0, max_retries=2)
    result = client.generate(["w4"], max_new_tokens=4, progress=False)[0]
    assert result.error is None and len(served.requests) == result.num_steps + 1


def first_answer_with(change):
    """A misbehave hook answering every request with a valid answer edited by `change(answer)`."""
    def misbehave(number, body):
        answer = served_answer[0](body)
        change(answer)
        return 200, json.dumps(answer).encode()
    return misbehave


served_answer = [None]


@pytest.mark.parametrize("change, message", [
    (lambda a: a["choices"][0].update(logprobs=None), "no top log-probabilities"),
    (lambda a: a.update(choices=[]), "no top log-probabilities"),
    (lambda a: a["choices"][0]["logprobs"].update(top_logprobs=[["w4", -1.0]]), "should map text"),
    (lambda a: a["choices"][0]["logprobs"]["top_logprobs"][0].update({" w4": "high"}), "non-numeric"),
    (lambda a: a["choices"][0]["logprobs"]["top_logprobs"][0].update({" w4": float("nan")}), "not NaN"),
    (lambda a: a["choices"][0]["logprobs"].update(top_logprobs=[{" w4": -0.1, " w5": -2.0}]), "asked for 5"),
])
def test_malformed_answers_name_the_endpoint_and_the_step(served, change, message):
    served_answer[0] = served.answer
    served.misbehave = first_answer_with(change)
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0)
    with pytest.raises(APIGenerationError, match=message) as info:
        client.generate(["w4"], progress=False)
    assert f"{served.url}/completions (prompt 0, step 0)" in str(info.value)


def test_a_body_that_is_not_json_is_an_error(served):
    served.misbehave = lambda number, body: (200, b"<html>gateway</html>")
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0)
    with pytest.raises(APIGenerationError, match="step 0"):
        client.generate(["w4"], progress=False)


def test_timeout_is_an_error_not_a_hang(served):
    served.delay = 3.0
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0, timeout=0.5)
    start = time.perf_counter()
    with pytest.raises(APIGenerationError, match=r"step 0\): no complete answer within timeout=0.5 s"):
        client.generate(["w4"], progress=False)
    assert time.perf_counter() - start < 3.0


def test_timeout_is_a_deadline_for_the_whole_answer(served):
    """A server that trickles its answer a byte every 0.05 s (each read well inside the timeout) still fails
    the step once the whole request has taken `timeout`: before, one step waited for all ~400 bytes (20 s)."""
    served.drip = 0.05
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0, timeout=1.0)
    start = time.perf_counter()
    with pytest.raises(APIGenerationError, match="within timeout=1 s") as info:
        client.generate(["w4"], max_new_tokens=4, progress=False)
    assert time.perf_counter() - start < 2.5
    assert info.value.completions[0].finish_reason == "error" and info.value.completions[0].num_steps == 0


def test_partial_outputs_survive_a_failure(served):
    """Prompt 1 fails at its 4th step; its first 3 pieces and the other prompts' results are kept."""
    def misbehave(number, body):
        failing = body["prompt"].startswith(PROMPTS[1]) and body["prompt"].count(" ") - PROMPTS[1].count(" ") == 3
        return (500, b"{}") if failing else None
    served.misbehave = misbehave
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0, concurrency=2)
    with pytest.raises(APIGenerationError, match=r"1 of 3 prompts failed.*prompt 1, step 3") as info:
        client.generate(PROMPTS, max_new_tokens=8, do_sample=False, progress=False)
    results = info.value.completions
    assert [r.finish_reason for r in results] != ["error"] * 3 and results[1].finish_reason == "error"
    assert results[1].num_steps == 3 and len(results[1].text.split()) == 3
    assert all(r.finish_reason in ("stop", "length") for i, r in enumerate(results) if i != 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), "`top_k` must be a positive integer, got 0"),
    (dict(concurrency=0), "`concurrency` must be a positive integer, got 0"),
    (dict(beta=[1.0, 2.0]), "beta"),
    (dict(tokenizers=[None, None]), "`tokenizers` has 2 entries for 1 value models"),
    (dict(value_models=[]), "`value_models` must be a ValueModel"),
])
def test_bad_client_arguments(served, kwargs, message):
    arguments = dict(value_models=tiny_value_model("llama"), tokenizers=word_tokenizer(), beta=1.0, top_k=5)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        VASClient(CompletionsEndpoint(served.url), **arguments)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts="w4"), "`prompts` must be a list of non-empty strings"),
    (dict(prompts=["w4", ""]), "`prompts` must be a list of non-empty strings"),
    (dict(max_new_tokens=0), "`max_new_tokens`"),
    (dict(temperature=0.0), "`temperature` must be > 0"),
    (dict(stop=[""]), "`stop`"),
])
def test_bad_generate_arguments(served, kwargs, message):
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0)
    arguments = dict(prompts=["w4"], progress=False)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        client.generate(**arguments)


@pytest.mark.parametrize("kwargs, message", [
    (dict(base_url="127.0.0.1:8000"), "`base_url` must be an http"),
    (dict(timeout=0), "`timeout`"),
    (dict(max_retries=-1), "`max_retries`"),
])
def test_bad_endpoint_arguments(kwargs, message):
    arguments = dict(base_url="http://127.0.0.1:8000/v1")
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        CompletionsEndpoint(**arguments)


def test_model_name_is_asked_from_the_server(served):
    assert CompletionsEndpoint(served.url).model == "tiny"


def test_sample_asks_again_when_the_server_ignores_n(served):
    completions = CompletionsEndpoint(served.url).sample("w4 w5", n=3, max_tokens=5)
    assert len(completions) == 3 and len(served.requests) == 3
    assert all(c.finish_reason in ("stop", "length") for c in completions)
    with pytest.raises(EndpointError, match=r"\(prompt 7\): request failed"):
        served.misbehave = lambda number, body: (400, b"{}")
        CompletionsEndpoint(served.url, max_retries=0).sample("w4", n=1, max_tokens=5, where="prompt 7")


def test_next_token_requests_keep_the_server_from_stopping_at_eos(served):
    """A server that samples EOS stops before reporting log-probabilities: min_tokens=1 is sent by default, and
    without it the error says so."""
    value_model = tiny_value_model("llama")
    eos_prompt = next(prompt for prompt in (f"w{i}" for i in range(4, 96))
                      if served.next_logprobs(prompt).argmax().item() == EOS)  # the server's greedy choice is EOS
    client = make_client(served, value_model, word_tokenizer(), 0.0)
    result = client.generate([eos_prompt], max_new_tokens=3, do_sample=False, progress=False)[0]
    assert (result.finish_reason, result.num_steps) == ("stop", 1)
    assert all(body["min_tokens"] == 1 for body in served.requests)
    bare = VASClient(CompletionsEndpoint(served.url, max_retries=0, next_token_body={}), value_model,
                     word_tokenizer(), beta=0.0, top_k=5)
    served.requests.clear()
    with pytest.raises(APIGenerationError, match="sampled an end-of-sequence token .* 9 times in a row"):
        bare.generate([eos_prompt], max_new_tokens=3, do_sample=False, progress=False)
    assert [body.get("seed", "absent") for body in served.requests] == ["absent", *range(1, 9)]


def test_a_server_that_sampled_another_eos_token_is_asked_again(served):
    """min_tokens bans only the main EOS token: another end-of-sequence token sampled by the server also leaves
    the answer without log-probabilities; the request is repeated with another seed."""
    answer = served.answer

    def misbehave(number, body):
        if number in (2, 3):  # the 2nd step: twice "stopped", then a normal answer
            return 200, json.dumps(dict(answer(body), choices=[
                {"text": "", "index": 0, "finish_reason": "stop", "logprobs": None}])).encode()
        return None
    served.misbehave = misbehave
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0)
    result = client.generate(["w4"], max_new_tokens=3, progress=False)[0]
    assert result.error is None and len(served.requests) == result.num_steps + 2


def test_ctrl_c_stops_every_prompt_and_keeps_what_was_generated(served, monkeypatch):
    """A KeyboardInterrupt (here raised inside a value-model call, as Ctrl-C would land in any thread) stops
    decoding; the interrupt carries every prompt's partial result."""
    from vas_logits.text_values import TextValuer

    original, calls = TextValuer.values, []

    def interrupt_on_the_fourth_call(self, prefix, candidates):
        calls.append(prefix)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(self, prefix, candidates)
    monkeypatch.setattr(TextValuer, "values", interrupt_on_the_fourth_call)
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0, concurrency=1)
    with pytest.raises(KeyboardInterrupt) as info:
        client.generate(PROMPTS, max_new_tokens=8, do_sample=False, progress=False)
    results = info.value.completions
    assert results[0].num_steps == 3 and len(results[0].text.split()) == 3
    assert results[0].finish_reason == "interrupted"
    assert all(r.num_steps == 0 and r.text == "" for r in results[1:])


def test_ctrl_c_in_the_caller_returns_at_once_with_every_partial_text(served, ctrl_c):
    """Ctrl-C while requests are in flight (answers now take 20 s): generate() raises within about a second,
    without waiting for them, and the KeyboardInterrupt carries each prompt's text so far."""
    import _thread
    import threading

    def slow_after_eight(number, body):
        if number > 8:
            time.sleep(20)
        return None
    served.misbehave = slow_after_eight
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0, timeout=60, concurrency=2)
    timer = threading.Timer(2.0, _thread.interrupt_main)  # as SIGINT does: KeyboardInterrupt in the main thread
    timer.start()
    start = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            client.generate(PROMPTS[:2], max_new_tokens=16, do_sample=False, progress=False)
        elapsed = time.perf_counter() - start
    finally:
        timer.cancel()
    assert elapsed < 3.5, elapsed
    results = info.value.completions
    assert [r.finish_reason for r in results] == ["interrupted"] * 2
    assert sum(r.num_steps for r in results) == 8  # the eight answered steps, none lost
    assert all(len(r.text.split()) == r.num_steps for r in results)


def test_ctrl_c_does_not_keep_the_interpreter_alive(served):
    """A script interrupted while its requests hang exits at once: the request threads are daemons."""
    import subprocess
    import sys

    served.delay = 30.0
    script = f"""
import os, signal, threading
signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, should this process inherit SIGINT ignored
from tests.helpers import tiny_value_model, word_tokenizer
from vas_logits.api import VASClient
from vas_logits.endpoint import CompletionsEndpoint
client = VASClient(CompletionsEndpoint({served.url!r}, model="tiny", timeout=60), tiny_value_model("llama"),
                   word_tokenizer(), beta=1.0, top_k=5)
threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    client.generate(["w4", "w5"], progress=False)
except KeyboardInterrupt as error:
    print("interrupted", [r.finish_reason for r in error.completions])
"""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=25,
                          cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "interrupted ['interrupted', 'interrupted']" in done.stdout
    assert time.perf_counter() - start < 20  # the server answers after 30 s: nobody waited for it


def test_an_unreachable_server_fails_every_prompt_once():
    """Connections are reset at once: the first failure fails all eight prompts, instead of each prompt
    retrying on its own (before: 8 × 3 connection attempts)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    attempts = []

    def reset_every_connection():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            attempts.append(1)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            connection.close()
    import threading
    threading.Thread(target=reset_every_connection, daemon=True).start()
    port = listener.getsockname()[1]
    endpoint = CompletionsEndpoint(f"http://127.0.0.1:{port}/v1", model="m", timeout=30, max_retries=2)
    client = VASClient(endpoint, tiny_value_model("llama"), word_tokenizer(), beta=1.0, top_k=5, concurrency=2)
    try:
        with pytest.raises(APIGenerationError, match="8 of 8 prompts failed") as info:
            client.generate([f"w{i}" for i in range(4, 12)], progress=False)
    finally:
        listener.close()
    assert len(attempts) <= 2 * 3, len(attempts)  # at most the prompts in flight, each with its retries
    assert all(r.finish_reason == "error" and "request failed" in r.error for r in info.value.completions)


def test_a_piece_that_is_not_valid_unicode_is_a_clear_error(served):
    """A server that escapes half of a character (a lone UTF-16 surrogate) in its JSON: the prompt fails with the
    URL, step and piece named, instead of a TypeError deep in the tokenizer."""
    def half_a_character(number, body):
        answer = served.answer(body)
        top = answer["choices"][0]["logprobs"]["top_logprobs"][0]
        top["\ud83d"] = top.pop(next(iter(top)))
        return 200, json.dumps(answer).encode()
    served.misbehave = half_a_character
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0)
    with pytest.raises(APIGenerationError, match=r"step 0\): a next-token piece from the server is not valid Unicode"):
        client.generate(["w4"], progress=False)


def test_log_probabilities_that_are_all_minus_infinity_are_a_clear_error(served):
    def nothing_possible(number, body):
        answer = served.answer(body)
        logprobs = answer["choices"][0]["logprobs"]
        logprobs["top_logprobs"][0] = {piece: "-Infinity" for piece in logprobs["top_logprobs"][0]}
        return 200, json.dumps(answer).replace('"-Infinity"', "-Infinity").encode()
    served.misbehave = nothing_possible
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0, concurrency=2)
    with pytest.raises(APIGenerationError, match=r"2 of 2 prompts failed.*every top log-probability is -inf"):
        client.generate(["w4", "w5"], progress=False)


def test_requests_carry_no_null_fields(served):
    """Optional fields are left out rather than sent as null, which strict servers refuse."""
    client = make_client(served, tiny_value_model("llama"), word_tokenizer(), 1.0)
    client.generate(["w4"], max_new_tokens=2, progress=False)
    CompletionsEndpoint(served.url).sample("w4", n=1, max_tokens=2)
    assert served.requests and all(None not in body.values() for body in served.requests), served.requests
