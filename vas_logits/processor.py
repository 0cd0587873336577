"""ValueAugmentedLogitsProcessor (alias VAS): value-guided decoding inside any `model.generate()` call.

Per row and decoding step (Han et al., arXiv 2405.06639; semantics pinned in VAS_NOTES.md):
    K       = the top_k token ids of the incoming scores
    Q_i(a)  = V_i(prefix∘a)                      for a in K, for each value model i
    out[a]  = scores[a] + Σ_i beta_i · (Q_i(a) − mean_K Q_i)    on K;   −inf (or unchanged) outside K

How it stays cheap: each value model keeps its own transformers DynamicCache whose columns mirror the
columns of `input_ids`. A step feeds only the tokens appended since the last step followed by the k
candidates, in ONE forward per value model; a 4-D attention mask lets each candidate see the prefix and
itself only (siblings at the same position), after which the k candidate entries are cropped from the
cache. The cache thus grows by one token per step, never by k. With `cache_implementation="static"` the
same columns live in fixed-address buffers (static_cache.py), so the step can be compiled (`compile=True`).

A processor sees neither the attention mask nor generate()'s cache, so everything is inferred from
`input_ids`: left padding from `pad_token_id`, beam reordering by matching each row to its parent row of
the previous step, a new generate() call or an assisted-decoding rollback from where the ids diverge.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from transformers import DynamicCache, LogitsProcessor

from .static_cache import StaticColumnCache, round_up_capacity
from .value_model import ValueModel

logger = logging.getLogger(__name__)

OUTSIDE_TOP_K_MODES = ("mask", "keep")
CACHE_IMPLEMENTATIONS = ("dynamic", "static")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def attention_layout(value_model: ValueModel) -> tuple[tuple[str, ...], int | None]:
    """The backbone's attention type per layer and its sliding window (None without one).

    Raises:
        ValueError: The backbone has layers the processor cannot mask (e.g. chunked or linear attention).
    """
    config = value_model.backbone_config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral-style configs apply `sliding_window` to every layer
        layer_types = ["sliding_attention" if window is not None else "full_attention"] * config.num_hidden_layers
    unsupported = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if unsupported:
        raise ValueError(
            f"The value model's backbone ({config.model_type}) has attention layer types {unsupported}; "
            f"the processor supports {SUPPORTED_LAYER_TYPES}"
        )
    if "sliding_attention" in layer_types and window is None:
        raise ValueError(f"The value model's backbone ({config.model_type}) has sliding layers but no sliding_window")
    return tuple(layer_types), window


class ValueAugmentedLogitsProcessor(LogitsProcessor):
    r"""Steers generation toward the rewards of one or more value models (Value Augmented Sampling).

    Adds Σ_i beta_i · (Q_i(a) − mean_K Q_i) to the scores of the `top_k` best tokens a ∈ K, where
    Q_i(a) = V_i(prefix∘a); the other tokens get −inf (`outside_top_k="mask"`) or keep their score ("keep").
    It runs before generate()'s temperature and top-p warpers, so a temperature T divides beta too.

    Args:
        value_models: One ValueModel or a list of them; each must share the base model's vocabulary.
        beta: The strength of each value model's pull: one float, or a list with one per value model.
            0 leaves the base distribution (within the top-k) unchanged; larger values chase the reward.
        top_k: How many of the base model's best tokens are valued at each step (the paper's k).
        pad_token_id: The id used to left-pad prompts, masked out for the value models. Defaults to the first
            value model's `config.pad_token_id`. Leading tokens equal to it count as padding.
        outside_top_k: "mask" sets the scores outside the top-k to −inf; "keep" leaves them unchanged.
        cache_implementation: "dynamic" (a DynamicCache per value model, the default) or "static" (buffers of
            fixed address: a write pointer instead of crops; see `static_cache.py`). Default: "static" when
            `compile` is set, else "dynamic".
        compile: Compile each value model's one-token decoding step with torch.compile (CUDA graphs on a GPU:
            mode "reduce-overhead"). The prompt's forward and multi-token steps (assisted decoding) stay eager.
            The first steps pay for compilation, and again whenever the cache outgrows a multiple of 256
            columns or the batch size changes.

    Shapes: `input_ids` (batch, seq) LongTensor, `scores` (batch, vocab) float; returns (batch, vocab) in the
    scores' dtype, a new tensor.

    The processor keeps the value models' caches between calls. A new generate() call (other prompts, batch
    size, or a sequence that is no continuation) is detected and the state rebuilt; `reset()` does it by hand.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from vas_logits import VAS, ValueModel
        >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(config).eval()
        >>> value_model = ValueModel.from_backbone(model, num_layers=1)
        >>> out = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=True, pad_token_id=0,
        ...                      logits_processor=[VAS(value_model, beta=2.0, top_k=5)])
        >>> out.shape
        torch.Size([1, 7])
    """

    def __init__(
        self,
        value_models: ValueModel | Sequence[ValueModel],
        beta: float | Sequence[float] = 1.0,
        top_k: int = 10,
        pad_token_id: int | None = None,
        outside_top_k: str = "mask",
        cache_implementation: str | None = None,
        compile: bool = False,
    ):
        if isinstance(value_models, ValueModel):
            value_models = [value_models]
        if not isinstance(value_models, Sequence) or len(value_models) == 0:
            raise ValueError(f"`value_models` must be a ValueModel or a non-empty list of them, got {value_models!r}")
        for index, value_model in enumerate(value_models):
            if not isinstance(value_model, ValueModel):
                raise ValueError(f"`value_models[{index}]` must be a ValueModel, got {type(value_model).__name__}")
        betas = [beta] if isinstance(beta, (int, float)) else beta
        if isinstance(betas, Sequence) and len(betas) == 1 and len(value_models) > 1:
            betas = list(betas) * len(value_models)
        if not isinstance(betas, Sequence) or len(betas) != len(value_models):
            raise ValueError(
                f"`beta` must be a float or a list with one float per value model ({len(value_models)}), got {beta!r}"
            )
        for index, value in enumerate(betas):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`beta` must hold finite floats, got {value!r} at index {index}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"`top_k` has to be a strictly positive integer, but is {top_k!r}")
        if pad_token_id is None:
            pad_token_id = value_models[0].config.pad_token_id
        if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)):
            raise ValueError(f"`pad_token_id` must be an int or None, got {pad_token_id!r}")
        if outside_top_k not in OUTSIDE_TOP_K_MODES:
            raise ValueError(f"`outside_top_k` must be one of {OUTSIDE_TOP_K_MODES}, got {outside_top_k!r}")
        if cache_implementation is None:
            cache_implementation = "static" if compile else "dynamic"
        if cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"`cache_implementation` must be one of {CACHE_IMPLEMENTATIONS}, got {cache_implementation!r}"
            )
        if compile and cache_implementation != "static":
            raise ValueError(f"`compile=True` needs cache_implementation='static', got {cache_implementation!r}")
        vocab_sizes = {value_model.backbone_config.vocab_size for value_model in value_models}
        if len(vocab_sizes) > 1:
            raise ValueError(f"`value_models` must share one vocabulary, got vocabulary sizes {sorted(vocab_sizes)}")

        self.value_models = list(value_models)
        self.betas = [float(value) for value in betas]
        self.top_k = top_k
        self.pad_token_id = pad_token_id
        self.outside_top_k = outside_top_k
        self.cache_implementation = cache_implementation
        self.compile = bool(compile)
        self._compiled: list | None = None  # the compiled value models, built on the first decoding step
        self._caches: list = []
        self._layouts = [attention_layout(value_model) for value_model in self.value_models]
        self._warned_training = False
        self.reset()

    def reset(self) -> None:
        """Forget all cached state; the next call starts from its full `input_ids`."""
        self._seen_ids: torch.LongTensor | None = None  # (B, C): the ids whose keys/values are cached
        self._key_is_real: torch.BoolTensor | None = None  # (B, C): False for left padding
        self._positions: torch.LongTensor | None = None  # (B, C): position ids, counted from the first real token
        self._next_position: torch.LongTensor | None = None  # (B, 1): where this step's candidates sit
        if self.cache_implementation == "dynamic":
            self._caches = []  # static buffers are kept: the next call reuses them (same addresses) if it can

    @property
    def cached_length(self) -> int:
        """How many columns of `input_ids` the value models' caches hold."""
        return 0 if self._seen_ids is None else self._seen_ids.shape[1]

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._check_inputs(input_ids, scores)
        top_k = min(self.top_k, scores.shape[-1])
        candidate_scores, candidates = scores.topk(top_k, dim=-1)  # (B, k) each
        new_start = self._sync_state(input_ids)
        key_width = None  # dynamic caches: exactly the prefix and the candidates
        if self.cache_implementation == "static":
            for cache in self._caches:
                cache.ensure_capacity(input_ids.shape[1] + top_k)
            key_width = self._caches[0].capacity  # every slot, stale ones masked
        masks, position_ids = self._step_masks(new_start, top_k, key_width)
        step_ids = torch.cat([input_ids[:, new_start:], candidates], dim=-1)  # (B, n + k)
        models = self.value_models
        if self.compile and step_ids.shape[1] == 1 + top_k:  # the steady decoding step: fixed shapes
            models = self._compiled_models(scores.device)

        adjustment = torch.zeros_like(candidate_scores, dtype=torch.float32)  # (B, k)
        for value_model, beta, cache, attention_mask in zip(models, self.betas, self._caches, masks):
            values = value_model(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            ).values[:, -top_k:]  # (B, k): Q(s, a) for each candidate a, used before the next forward runs
            cache.crop(-top_k)  # the candidates were only siblings: keep the prefix, drop them
            adjustment += beta * (values - values.mean(dim=-1, keepdim=True))

        if self.outside_top_k == "mask":
            out = torch.full_like(scores, -math.inf)
        else:
            out = scores.clone()
        return out.scatter_(-1, candidates, (candidate_scores.float() + adjustment).to(scores.dtype))

    def _compiled_models(self, device: torch.device) -> list:
        if self._compiled is None:
            mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs need a GPU
            self._compiled = [torch.compile(value_model, mode=mode, dynamic=False) for value_model in self.value_models]
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs were copied already
        return self._compiled

    # ------------------------------------------------------------------ checks

    def _check_inputs(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> None:
        if input_ids.dim() != 2 or scores.dim() != 2 or input_ids.shape[0] != scores.shape[0]:
            raise ValueError(
                f"Expected input_ids (batch, seq) and scores (batch, vocab), got {tuple(input_ids.shape)} "
                f"and {tuple(scores.shape)}"
            )
        vocab_size = self.value_models[0].backbone_config.vocab_size
        if scores.shape[-1] != vocab_size:
            raise ValueError(
                f"The scores have a vocabulary of {scores.shape[-1]} tokens but the value model's is {vocab_size}: "
                "a value model must share the base model's tokenizer"
            )
        for index, value_model in enumerate(self.value_models):
            if value_model.device != scores.device:
                raise ValueError(
                    f"Value model {index} is on {value_model.device} but the scores are on {scores.device}: "
                    f"move it with `value_model.to({str(scores.device)!r})`"
                )
            if value_model.training and not self._warned_training:
                logger.warning("Value model %d is in training mode (dropout active); call .eval() on it.", index)
                self._warned_training = True

    # ------------------------------------------------------------------ cache bookkeeping

    def _sync_state(self, input_ids: torch.LongTensor) -> int:
        """Bring the caches in line with `input_ids`; returns the first column they do not hold yet."""
        batch_size, length = input_ids.shape
        cached = self.cached_length
        if self._seen_ids is None or self._seen_ids.shape[0] != batch_size:
            return self._append_columns(input_ids, keep=0)
        seen = self._seen_ids
        if length > cached:
            if torch.equal(input_ids[:, :cached], seen):  # the usual step: one token appended to every row
                return self._append_columns(input_ids, keep=cached)
            # Beam search reorders rows: find each row's parent among last step's rows. Equal prefixes
            # have equal caches, so any matching row will do.
            matches = (input_ids[:, None, :cached] == seen[None, :, :]).all(dim=-1)  # (B, B)
            if bool(matches.any(dim=-1).all()):
                parents = matches.int().argmax(dim=-1)  # (B,)
                for cache in self._caches:
                    cache.reorder_cache(parents)
                self._key_is_real = self._key_is_real[parents]
                self._positions = self._positions[parents]
                return self._append_columns(input_ids, keep=cached)
        # Otherwise keep the longest prefix all rows share with what is cached (a rollback in assisted
        # decoding, or a new generate() call whose prompts start alike); nothing shared means a fresh start.
        shared = min(length, cached)
        same_column = (input_ids[:, :shared] == seen[:, :shared]).all(dim=0)  # (shared,)
        keep = shared if bool(same_column.all()) else int(same_column.int().argmin())
        return self._append_columns(input_ids, keep=keep)

    def _append_columns(self, input_ids: torch.LongTensor, keep: int) -> int:
        """Keep the first `keep` cached columns and record the bookkeeping of the columns after them."""
        if keep == 0:
            self._caches = self._fresh_caches(input_ids)
            self._key_is_real = input_ids.new_zeros((input_ids.shape[0], 0), dtype=torch.bool)
            self._positions = input_ids.new_zeros((input_ids.shape[0], 0))
        elif keep < self.cached_length:
            for cache in self._caches:
                cache.crop(keep - self.cached_length)
            self._key_is_real = self._key_is_real[:, :keep]
            self._positions = self._positions[:, :keep]
        new_ids = input_ids[:, keep:]  # (B, n)
        if self.pad_token_id is None:
            new_is_real = torch.ones_like(new_ids, dtype=torch.bool)
        else:
            # Only leading pads are padding: once a row has a real token, every later token counts, as in
            # generate()'s attention mask (finished rows keep receiving pad ids).
            started = self._key_is_real.any(dim=-1, keepdim=True)  # (B, 1)
            new_is_real = started | (new_ids != self.pad_token_id).cumsum(dim=-1).bool()
        real_before = self._key_is_real.sum(dim=-1, keepdim=True)  # (B, 1)
        real_so_far = real_before + new_is_real.cumsum(dim=-1)  # (B, n)
        new_positions = (real_so_far - 1).clamp(min=0)
        self._next_position = real_so_far[:, -1:] if new_ids.shape[1] else real_before  # (B, 1): the candidates'
        self._key_is_real = torch.cat([self._key_is_real, new_is_real], dim=-1)
        self._positions = torch.cat([self._positions, new_positions], dim=-1)
        self._seen_ids = input_ids
        return keep

    def _fresh_caches(self, input_ids: torch.LongTensor) -> list:
        """Empty caches, one per value model; static buffers of the right batch size are reused in place."""
        if self.cache_implementation == "dynamic":
            return [DynamicCache() for _ in self.value_models]
        batch_size, capacity = input_ids.shape[0], round_up_capacity(input_ids.shape[1] + self.top_k)
        pairs = list(zip(self._caches, self.value_models))  # empty before the first call
        if pairs and all(cache.can_hold(batch_size, model.device) for cache, model in pairs):
            for cache in self._caches:
                cache.crop(-cache.length)  # the pointer back to 0; the buffers keep their addresses
            return self._caches
        return [StaticColumnCache(value_model.backbone_config.num_hidden_layers, capacity)
                for value_model in self.value_models]

    def _step_masks(self, new_start: int, top_k: int, key_width: int | None = None) -> tuple[list, torch.LongTensor]:
        """Attention masks and position ids for one forward of [new tokens + k candidates] per row.

        Args:
            key_width: Key columns of the mask (static caches: their capacity; the slots past the prefix and
                the candidates are masked). Default: C + k.

        Returns:
            One mask per value model ((B, 1, n + k, key_width) additive float in its dtype, or a dict of them
            per layer type when its layers differ), and position ids (B, n + k).
        """
        key_is_real, key_positions = self._key_is_real, self._positions  # (B, C), C = all columns incl. new
        batch_size, total = key_is_real.shape
        device = key_is_real.device
        num_new = total - new_start
        query_positions = torch.cat([key_positions[:, new_start:], self._next_position.expand(-1, top_k)], dim=-1)

        # A new token at column c sees columns <= c; every candidate sees all prefix columns.
        columns = torch.arange(total, device=device)
        query_limit = torch.cat([columns[new_start:] + 1, torch.full((top_k,), total, device=device)])
        prefix_allowed = key_is_real[:, None, :] & (columns[None, None, :] < query_limit[None, :, None])
        new_rows = torch.arange(num_new, device=device)
        prefix_allowed[:, new_rows, new_start + new_rows] = True  # even a pad sees itself: no empty rows
        # Each candidate sees itself among the candidates; new tokens see none of them.
        candidate_allowed = torch.zeros(num_new + top_k, top_k, dtype=torch.bool, device=device)
        candidate_allowed[num_new:] = torch.eye(top_k, dtype=torch.bool, device=device)
        if key_width is not None:  # stale static slots after the candidates: never visible
            stale = torch.zeros(num_new + top_k, key_width - total - top_k, dtype=torch.bool, device=device)
            candidate_allowed = torch.cat([candidate_allowed, stale], dim=-1)
        candidate_allowed = candidate_allowed.expand(batch_size, -1, -1)

        def to_additive(prefix: torch.BoolTensor, dtype: torch.dtype) -> torch.Tensor:
            allowed = torch.cat([prefix, candidate_allowed], dim=-1)[:, None]  # (B, 1, n + k, C + k)
            return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
                ~allowed, torch.finfo(dtype).min
            )

        masks, built = [], {}  # value models of one dtype and attention layout share their mask
        for value_model, (layer_types, window) in zip(self.value_models, self._layouts):
            key = (value_model.dtype, frozenset(layer_types), window)
            if key not in built:
                by_type = {}
                for layer_type in key[1]:
                    allowed = prefix_allowed
                    if layer_type == "sliding_attention":  # key within the window: q_pos - k_pos < window
                        distance = query_positions[:, :, None] - key_positions[:, None, :]
                        allowed = allowed & (distance < window)
                        allowed[:, new_rows, new_start + new_rows] = True
                    by_type[layer_type] = to_additive(allowed, value_model.dtype)
                built[key] = next(iter(by_type.values())) if len(by_type) == 1 else by_type
            masks.append(built[key])
        return masks, query_positions


VAS = ValueAugmentedLogitsProcessor
