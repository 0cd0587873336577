"""A small OpenAI-compatible /v1/completions server for the API-mode tests, backed by a tiny random causal LM
with the word tokenizer, so its answers can be compared with in-process decoding. It can also misbehave on
purpose (HTTP errors, malformed answers, slowness) to test what the client does then."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .helpers import BOS, EOS, PAD

SUPPRESSED = (PAD, BOS, 3)  # <pad>, <s>, <unk>: never offered, so pieces re-tokenise to the same ids


class FakeEndpoint:
    """Serves `model` on 127.0.0.1 (a free port) until `close()`.

    Attributes:
        url: The base URL, ".../v1".
        requests: The JSON bodies received, in order.
        misbehave: None, or a function (request number, body) -> (status, body bytes) | None overriding answers.
        delay: Seconds to wait before answering.
        drip: Seconds between the answer's bytes (0: all at once), as a server that trickles its answer.
        max_in_flight: The most requests the server was answering at once.
    """

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.requests: list[dict] = []
        self.misbehave = None
        self.delay = 0.0
        self.drip = 0.0
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._send(200, json.dumps({"object": "list", "data": [{"id": "tiny", "object": "model"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint._lock:
                    endpoint.requests.append(body)
                    number = len(endpoint.requests)
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                try:
                    time.sleep(endpoint.delay)
                    override = endpoint.misbehave(number, body) if endpoint.misbehave else None
                    if override is not None:
                        self._send(*override)
                    else:
                        self._send(200, json.dumps(endpoint.answer(body)).encode())
                finally:
                    with endpoint._lock:
                        endpoint.in_flight -= 1

            def _send(self, status, payload):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if not endpoint.drip:
                    self.wfile.write(payload)
                    return
                for position in range(len(payload)):
                    self.wfile.write(payload[position : position + 1])
                    self.wfile.flush()
                    time.sleep(endpoint.drip)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def piece(self, token_id: int) -> str:
        """A token's text as the server shows it: " w7" for words, "" for EOS (as vLLM and llama.cpp do)."""
        return "" if token_id == EOS else " " + self.tokenizer.convert_ids_to_tokens(token_id)

    @torch.no_grad()
    def next_logprobs(self, text: str) -> torch.Tensor:
        """(vocab,) log-probabilities of the next token after `text`, suppressed tokens at -inf."""
        ids = torch.tensor([self.tokenizer(text)["input_ids"]])
        logits = self.model(ids).logits[0, -1].float()
        logits[list(SUPPRESSED)] = -float("inf")
        return logits.log_softmax(-1)

    def answer(self, body: dict) -> dict:
        logprobs = self.next_logprobs(body["prompt"])
        if body.get("logprobs"):  # a next-token query: max_tokens=1
            values, ids = logprobs.topk(int(body["logprobs"]))
            if ids[0].item() == EOS and not body.get("min_tokens"):  # as llama-cpp-python: EOS sampled, no logprobs
                choice = {"text": "", "index": 0, "finish_reason": "stop",
                          "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}}
                return {"id": "x", "object": "text_completion", "created": 0, "model": "tiny", "choices": [choice]}
            top = {self.piece(i): v for i, v in zip(ids.tolist(), values.tolist())}
            choice = {"text": self.piece(ids[0].item()), "index": 0, "finish_reason": "length",
                      "logprobs": {"tokens": [self.piece(ids[0].item())], "token_logprobs": [values[0].item()],
                                   "top_logprobs": [top], "text_offset": [len(body["prompt"])]}}
            return {"id": "x", "object": "text_completion", "created": 0, "model": "tiny", "choices": [choice]}
        # sampling: one completion per request (as llama-cpp-python, which ignores n), seeded by the request count
        generator = torch.Generator().manual_seed(len(self.requests))
        text, finish_reason = "", "length"
        for _ in range(int(body.get("max_tokens") or 16)):
            token = int(torch.multinomial(self.next_logprobs(body["prompt"] + text).exp(), 1, generator=generator))
            if token == EOS:
                finish_reason = "stop"
                break
            text += self.piece(token)
        choice = {"text": text, "index": 0, "finish_reason": finish_reason, "logprobs": None}
        return {"id": "x", "object": "text_completion", "created": 0, "model": "tiny", "choices": [choice]}
