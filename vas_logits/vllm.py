"""VAS inside vLLM: a custom logits processor for vLLM's V1 engine, one server steering every request its own way.

The operator registers value models when the engine starts; each request picks which of them to apply and
with which beta, so one server composes rewards per request and unsteered requests cost nothing:

    VAS_VALUE_MODELS='{"sentiment": "someone/vas-sentiment", "formal": "/models/vas-formal"}' \\
        vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --logits-processors vas_logits.vllm:VASLogitsProcessor

    client.completions.create(model=..., prompt=..., extra_body={"vllm_xargs": {"vas": "sentiment", "vas_beta": 2}})
    SamplingParams(extra_args={"vas": ["sentiment", "formal"], "vas_beta": [2.0, -1.0]})      # offline LLM()

The registry and the processor's settings are environment variables (`configure()` writes them), because vLLM
builds the processor in its engine process and validates requests with a classmethod in the front end: both
read the environment they were started with. A request names value models only, never paths.

Per steered request and step the closed form of `processor.py` (VAS_NOTES.md) is applied to its row of the
logits, before vLLM's temperature and top-k/top-p, as generate() applies the HF processor:
    K = top_k ids of the row;  out[a] = logits[a] + Σ_i beta_i · (Q_i(a) − mean_K Q_i) on K;  −inf (or kept) off K.

Caches: each request keeps, per value model it uses, the keys and values of its ids but the last (its own
transformers-layout tensors, (1, kv_heads, length, head_dim) per layer). A step stacks the rows of one value
model, left-padded, into a DynamicCache and runs ONE forward of [last id + the k candidates as siblings] (a
token-head model: the last id alone) for all of them, then keeps each row's columns. Requests joining are
prefilled together in one left-padded forward. vLLM's persistent batch moves requests between rows; the
state follows its BatchUpdates (removed, then added, then moved).

Needs vLLM (`pip install "vas-logits[vllm]"`); the interface is V1's `vllm.v1.sample.logits_processor`, the
one vLLM's CPU engine and its V1 GPU model runner use. Model Runner V2 (GPU, `VLLM_USE_V2_MODEL_RUNNER=1`) has
another interface this module does not implement.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

try:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError as error:  # pragma: no cover - exercised only without vLLM
    raise ImportError('vas_logits.vllm needs vLLM: pip install "vas-logits[vllm]"') from error

from .processor import OUTSIDE_TOP_K_MODES, attention_layout
from .stream import DecodingStream
from .value_model import ValueModel

logger = logging.getLogger(__name__)

ENV_VALUE_MODELS = "VAS_VALUE_MODELS"  # JSON object: name -> local directory or Hub repo id
ENV_TOP_K = "VAS_TOP_K"
ENV_OUTSIDE_TOP_K = "VAS_OUTSIDE_TOP_K"
ENV_DTYPE = "VAS_DTYPE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REQUEST_MODELS, REQUEST_BETAS = "vas", "vas_beta"  # the keys of SamplingParams.extra_args / vllm_xargs


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """What the operator chose at start: the registered value models and how VAS is applied."""

    value_models: dict[str, str]  # name -> local directory or Hub repo id
    top_k: int = 10
    outside_top_k: str = "mask"
    dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.value_models, dict) or not self.value_models:
            raise ValueError(f"{ENV_VALUE_MODELS} must name at least one value model (a JSON object name -> path), "
                             f"got {self.value_models!r}")
        for name, path in self.value_models.items():
            if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
                raise ValueError(f"{ENV_VALUE_MODELS}: every entry must be a non-empty name -> a path or Hub id, got "
                                 f"{name!r}: {path!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"{ENV_TOP_K} must be a positive integer, got {self.top_k!r}")
        if self.outside_top_k not in OUTSIDE_TOP_K_MODES:
            raise ValueError(f"{ENV_OUTSIDE_TOP_K} must be one of {OUTSIDE_TOP_K_MODES}, got {self.outside_top_k!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"{ENV_DTYPE} must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @classmethod
    def from_environment(cls, environ=os.environ) -> "Settings":
        raw = environ.get(ENV_VALUE_MODELS)
        if raw is None:
            raise ValueError(f"vas_logits.vllm: set {ENV_VALUE_MODELS} to a JSON object of value models, e.g. "
                             f"'{{\"sentiment\": \"someone/vas-sentiment\"}}' (or call vas_logits.vllm.configure())")
        try:
            value_models = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ValueError(f"{ENV_VALUE_MODELS} is not valid JSON ({error}): {raw!r}") from None
        top_k = environ.get(ENV_TOP_K, "10")
        try:
            top_k = int(top_k)
        except ValueError:
            raise ValueError(f"{ENV_TOP_K} must be a positive integer, got {top_k!r}") from None
        return cls(value_models, top_k, environ.get(ENV_OUTSIDE_TOP_K, "mask"), environ.get(ENV_DTYPE, "float32"))

    def environment(self) -> dict[str, str]:
        return {ENV_VALUE_MODELS: json.dumps(self.value_models), ENV_TOP_K: str(self.top_k),
                ENV_OUTSIDE_TOP_K: self.outside_top_k, ENV_DTYPE: self.dtype}


def configure(value_models: dict[str, str], top_k: int = 10, outside_top_k: str = "mask",
              dtype: str = "float32") -> dict[str, str]:
    """Register value models for VASLogitsProcessor in this process's environment (call before `LLM(...)`).

    Args:
        value_models: name -> local directory or Hub repo id of a ValueModel; requests refer to the names.
        top_k: How many of the base model's best tokens are valued per step (the paper's k).
        outside_top_k: "mask" (the default, as the HF processor) or "keep".
        dtype: The value models' dtype: "float32", "bfloat16" or "float16".

    Returns:
        The environment variables written, for a `vllm serve` started from another process.
    """
    settings = Settings(dict(value_models), top_k, outside_top_k, dtype)
    os.environ.update(settings.environment())
    return settings.environment()


def registered_names(environ=os.environ) -> set[str]:
    """The value model names requests may use (read from the environment; nothing is loaded)."""
    try:
        value_models = json.loads(environ.get(ENV_VALUE_MODELS, "{}"))
    except json.JSONDecodeError:
        return set()
    return set(value_models) if isinstance(value_models, dict) else set()


def request_steering(extra_args: dict | None, names: set[str]) -> dict[str, float]:
    """A request's {value model name: beta} from its extra_args ({} when it asks for no steering).

    Raises:
        ValueError: naming the field: an unregistered name, a non-numeric or non-finite beta, mismatched lengths.
    """
    extra_args = extra_args or {}
    requested, betas = extra_args.get(REQUEST_MODELS), extra_args.get(REQUEST_BETAS, 1.0)
    if requested is None:
        if REQUEST_BETAS in extra_args:
            raise ValueError(f"`{REQUEST_BETAS}` was given without `{REQUEST_MODELS}` (the value models to apply)")
        return {}
    requested = [requested] if isinstance(requested, str) else requested
    if not isinstance(requested, list) or not requested or not all(isinstance(n, str) for n in requested):
        raise ValueError(f"`{REQUEST_MODELS}` must be a value model name or a non-empty list of names, got "
                         f"{extra_args.get(REQUEST_MODELS)!r}")
    unknown = [n for n in requested if n not in names]
    if unknown:
        raise ValueError(f"`{REQUEST_MODELS}` names unregistered value models {unknown}; this server has "
                         f"{sorted(names)}")
    if len(set(requested)) != len(requested):
        raise ValueError(f"`{REQUEST_MODELS}` names a value model twice: {requested}")
    betas = betas if isinstance(betas, list) else [betas] * len(requested)
    if len(betas) != len(requested):
        raise ValueError(f"`{REQUEST_BETAS}` must be one number or one per value model ({len(requested)}), got "
                         f"{extra_args.get(REQUEST_BETAS)!r}")
    for beta in betas:
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta):
            raise ValueError(f"`{REQUEST_BETAS}` must hold finite numbers, got {beta!r}")
    return dict(zip(requested, (float(b) for b in betas)))


# ---------------------------------------------------------------------------------------------- state


@dataclass
class _RowCache:
    """One request's keys and values in one value model: per layer (1, kv_heads, length, head_dim) tensors."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    length: int


@dataclass
class _Request:
    prompt_ids: list[int]
    output_ids: list[int]  # vLLM's live list: it grows as the request decodes
    betas: dict[str, float]
    caches: dict[str, _RowCache] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_id(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def ids(self) -> list[int]:
        """Every id so far (a copy: only the prefills need it; a decoding step reads the last id alone)."""
        return self.prompt_ids + self.output_ids


# ---------------------------------------------------------------------------------------------- the processor


class VASLogitsProcessor(LogitsProcessor):
    """Value Augmented Sampling as a vLLM V1 logits processor (see the module docstring for its use).

    Built by vLLM at engine start with (vllm_config, device, is_pin_memory): loads every registered value model
    onto `device` (Hub ids through the Hub cache, safetensors only) and checks its vocabulary against the served
    model's. Requests are validated in the front end (`validate_params`): a bad one is rejected (HTTP 400 from
    the server) and the others keep running.
    """

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        settings = Settings.from_environment()
        self.top_k, self.outside_top_k = settings.top_k, settings.outside_top_k
        dtype = DTYPES[settings.dtype]
        vocab_size = vllm_config.model_config.get_vocab_size()
        self.value_models: dict[str, ValueModel] = {}
        for name, path in settings.value_models.items():
            value_model = ValueModel.from_pretrained(path, device=device, dtype=dtype).eval()
            if value_model.backbone_config.vocab_size != vocab_size:
                raise ValueError(
                    f"Value model {name!r} ({path}) has a vocabulary of {value_model.backbone_config.vocab_size} "
                    f"tokens but the served model's is {vocab_size}: a value model must share the base's tokenizer"
                )
            self.value_models[name] = value_model
        self.layouts = {name: attention_layout(model) for name, model in self.value_models.items()}
        self.requests: dict[int, _Request] = {}  # persistent-batch row -> the steered request there
        self._warned: set[str] = set()
        logger.info("VAS for vLLM: value models %s, top_k %d, outside_top_k %s", sorted(self.value_models),
                    self.top_k, self.outside_top_k)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        request_steering(sampling_params.extra_args, registered_names())

    def is_argmax_invariant(self) -> bool:
        return False  # VAS changes which token is best

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            self.requests.pop(index, None)  # an added request may replace the one at its row
            betas = request_steering(params.extra_args, set(self.value_models))  # validated in the front end
            if not betas:
                continue
            if prompt_ids is None:  # prompt embeddings: no ids for the value models
                self._warn_once("embeds", "A VAS request came without prompt token ids (prompt embeddings?); it "
                                          "is decoded unsteered")
                continue
            self.requests[index] = _Request(list(prompt_ids), output_ids, betas)
        for first, second, direction in batch_update.moved:
            moving = self.requests.pop(first, None)
            if direction == MoveDirectionality.SWAP:
                other = self.requests.pop(second, None)
                if other is not None:
                    self.requests[first] = other
            else:
                self.requests.pop(second, None)
            if moving is not None:
                self.requests[second] = moving

    @torch.no_grad()
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (num_requests, vocab) raw scores; the steered rows are replaced by VAS's, the rest untouched."""
        rows = [row for row in sorted(self.requests) if row < logits.shape[0] and self.requests[row].betas]
        # async scheduling's placeholders (-1) trail the outputs until vLLM writes the sampled ids in
        ready = [row for row in rows if self.requests[row].output_ids[-1:] != [-1]]
        if len(ready) < len(rows):
            self._warn_once("placeholder", "Some VAS rows still held placeholder ids; they were left unsteered")
        rows = ready
        requests = [self.requests[row] for row in rows]
        if not rows:
            return logits
        row_index = torch.tensor(rows, device=logits.device)
        top_k = min(self.top_k, logits.shape[-1])
        scores = logits[row_index]  # (R, V)
        candidate_scores, candidates = scores.topk(top_k, dim=-1)  # (R, k)
        adjustment = torch.zeros(candidate_scores.shape, dtype=torch.float32, device=logits.device)
        failed = torch.zeros(len(rows), 1, dtype=torch.bool, device=logits.device)
        for name, value_model in self.value_models.items():
            members = [i for i, request in enumerate(requests) if name in request.betas]
            members = [i for i in members if self._fits(name, value_model, requests[i])]
            if not members:
                continue
            try:
                scaled = self._beta_times_q(name, value_model, [requests[i] for i in members],
                                            candidates[members])  # (m, k)
            except Exception:  # e.g. out of memory: one value model must not stop the engine for every request
                logger.exception("Value model %r failed on this step; its %d rows are decoded unsteered this step "
                                 "and its caches rebuilt at the next", name, len(members))
                for i in members:
                    requests[i].caches.pop(name, None)
                failed[members] = True
                continue
            adjustment[members] += scaled - scaled.mean(dim=-1, keepdim=True)
        finite = torch.isfinite(adjustment).all(dim=-1, keepdim=True)  # (R, 1)
        if not bool(finite.all()):
            self._warn_once("finite", "VAS produced non-finite adjustments (a value model overflowed or beta is too "
                                      "large); those rows were left unsteered this step")
        out = torch.full_like(scores, -math.inf) if self.outside_top_k == "mask" else scores.clone()
        out.scatter_(-1, candidates, (candidate_scores.float() + adjustment).to(scores.dtype))
        logits[row_index] = torch.where(failed | ~finite, scores, out)  # unsteered rows keep the base scores
        return logits

    # ------------------------------------------------------------------ value model forwards

    def _fits(self, name: str, value_model: ValueModel, request: _Request) -> bool:
        """Whether the value model's learned position table (GPT-2-like) still holds this row and its candidates;
        past it the request continues unsteered by that model (a server must not fail mid-request)."""
        limit, length = value_model.max_positions, request.length
        if limit is None or length + (0 if value_model.token_head else 1) <= limit:
            return True
        request.betas.pop(name)
        request.caches.pop(name, None)
        logger.warning("Value model %r holds %d positions; a request of %d tokens continues without it", name, limit,
                       length)
        return False

    def _beta_times_q(self, name: str, value_model: ValueModel, requests: list[_Request],
                      candidates: torch.Tensor) -> torch.Tensor:
        """(m, k) beta · Q(s, a) of each row's candidates, in one forward after bringing the caches up to date."""
        device = value_model.device
        for request in requests:  # the cache must hold every id but the last
            cache, held = request.caches.get(name), request.length - 1
            if cache is not None and cache.length > held:  # the same ids again (a prefill chunk)
                cache.layers = [(k[:, :, :held], v[:, :, :held]) for k, v in cache.layers]
                cache.length = held
        self._prefill(name, value_model, requests)

        lengths = [request.caches[name].length for request in requests]
        width = max(lengths)
        cache = DynamicCache()
        if width:
            reference = next(request.caches[name].layers for request in requests if request.caches[name].layers)
            for layer, (ref_keys, ref_values) in enumerate(reference):
                empty = (ref_keys[:, :, :0], ref_values[:, :, :0])  # a row with no cached ids (a one-id prompt)
                keys, values = zip(*(_left_pad(request.caches[name].layers[layer] if request.caches[name].layers
                                               else empty, width) for request in requests))
                cache.update(torch.cat(keys), torch.cat(values), layer)
        token_head = value_model.token_head
        siblings = 0 if token_head else candidates.shape[1]
        stream = DecodingStream([value_model], "dynamic", None, None)
        lengths_t = torch.tensor(lengths, device=device)[:, None]  # (m, 1)
        columns = torch.arange(width + 1, device=device)[None]  # the cached columns and the last id
        stream.key_is_real = columns >= width - lengths_t  # (m, width + 1): left padding is False
        stream.positions = (columns - (width - lengths_t)).clamp(min=0)
        stream.next_position = lengths_t + 1  # the candidates sit one past the last id
        masks, position_ids = stream.step_masks(width, siblings, [self.layouts[name]])
        last = torch.tensor([request.last_id for request in requests], device=device)[:, None]  # (m, 1)
        candidates = candidates.to(device)
        step_ids = last if token_head else torch.cat([last, candidates], dim=-1)
        output = value_model(input_ids=step_ids, attention_mask=masks[0], position_ids=position_ids, cache=cache,
                             use_cache=True, **({"next_tokens": candidates[:, None, :]} if token_head else {}))
        betas = torch.tensor([request.betas[name] for request in requests], device=device)
        scaled = value_model.beta_times_q(output, betas, candidates.shape[1])
        for i, (request, length) in enumerate(zip(requests, lengths)):
            start = width - length  # keep the row's real columns and the last id, not the candidates
            request.caches[name] = _RowCache([(layer.keys[i : i + 1, :, start : width + 1],
                                               layer.values[i : i + 1, :, start : width + 1])
                                              for layer in output.cache.layers], length + 1)
        return scaled.to(candidates.device)

    def _prefill(self, name: str, value_model: ValueModel, requests: list[_Request]) -> None:
        """Cache every id but the last of rows that lack them: new requests together in one left-padded forward,
        a row that fell further behind (more than one new id) on its own."""
        device = value_model.device
        for request in requests:
            if name not in request.caches and request.length == 1:  # nothing before the last id
                request.caches[name] = _RowCache([], 0)
        fresh = [request for request in requests if name not in request.caches]
        if fresh:
            prefixes = [request.ids()[:-1] for request in fresh]
            width = max(len(prefix) for prefix in prefixes)
            input_ids = torch.zeros(len(fresh), width, dtype=torch.long, device=device)
            mask = torch.zeros(len(fresh), width, dtype=torch.long, device=device)
            for row, prefix in enumerate(prefixes):
                input_ids[row, width - len(prefix):] = torch.tensor(prefix, device=device)
                mask[row, width - len(prefix):] = 1
            output = value_model(input_ids=input_ids, attention_mask=mask, cache=DynamicCache(), use_cache=True)
            for row, (request, prefix) in enumerate(zip(fresh, prefixes)):
                start = width - len(prefix)
                request.caches[name] = _RowCache([(layer.keys[row : row + 1, :, start:],
                                                   layer.values[row : row + 1, :, start:])
                                                  for layer in output.cache.layers], len(prefix))
        for request in requests:
            cache, held = request.caches[name], request.length - 1
            if cache.length < held:  # behind by several ids (e.g. a step it was not scheduled in)
                behind = torch.tensor([request.ids()[cache.length : held]], device=device)
                past = DynamicCache()
                for layer, (keys, values) in enumerate(cache.layers):
                    past.update(keys, values, layer)
                positions = torch.arange(cache.length, held, device=device)[None]
                output = value_model(input_ids=behind, position_ids=positions, cache=past, use_cache=True)
                request.caches[name] = _RowCache([(layer.keys, layer.values) for layer in output.cache.layers], held)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


def _left_pad(layer: tuple[torch.Tensor, torch.Tensor], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, heads, length, dim) keys and values zero-padded on the left to `width` columns (masked out)."""
    keys, values = layer
    pad = width - keys.shape[2]
    if pad == 0:
        return keys, values
    return torch.nn.functional.pad(keys, (0, 0, pad, 0)), torch.nn.functional.pad(values, (0, 0, pad, 0))
