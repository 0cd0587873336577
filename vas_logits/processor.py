"""ValueAugmentedLogitsProcessor (alias VAS): value-guided decoding inside any `model.generate()` call.

Per row and decoding step (Han et al., arXiv 2405.06639; semantics pinned in VAS_NOTES.md):
    K       = the top_k token ids of the incoming scores
    Q_i(a)  = V_i(prefix∘a)                      for a in K, for each value model i
    out[a]  = scores[a] + Σ_i beta_i · (Q_i(a) − mean_K Q_i)    on K;   −inf (or unchanged) outside K
A distributional value model predicts p(z_j | prefix∘a) over reward atoms z_j; its Q_i(a) is then the soft
value (1/beta_i) log Σ_j p_j exp(beta_i z_j) (Q-sharp, Zhou et al. 2025), the mean as beta_i -> 0.

How it stays cheap: each value model keeps its own transformers DynamicCache whose columns mirror the
columns of `input_ids`. A step feeds only the tokens appended since the last step followed by the k
candidates, in ONE forward per value model; a 4-D attention mask lets each candidate see the prefix and
itself only (siblings at the same position), after which the k candidate entries are cropped from the
cache. The cache thus grows by one token per step, never by k. A token-head value model (value_model.py)
values every candidate from the prefix's own last hidden state, so its step feeds the new tokens alone
(1 position instead of 1 + k) and crops nothing. With `cache_implementation="static"` the
same columns live in fixed-address buffers (static_cache.py), so the step can be compiled (`compile=True`).

A processor sees neither the attention mask nor generate()'s cache, so everything is inferred from
`input_ids` (stream.py): left padding from `pad_token_id` or a mask the user hands over, beam reordering by
matching each row to its parent row of the previous step, a new generate() call or an assisted-decoding
rollback from where the ids diverge. Each thread has its own stream, so one processor can serve several
threads at once; a step that fails half-way leaves its stream to start over at the next call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import threading
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from .stream import DecodingStream
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
    return config_attention_layout(value_model.backbone_config)


def config_attention_layout(config) -> tuple[tuple[str, ...], int | None]:
    """attention_layout of a transformers config (a base model's too: lookahead.py masks its forward)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral-style configs apply `sliding_window` to every layer
        layer_types = ["sliding_attention" if window is not None else "full_attention"] * config.num_hidden_layers
    unsupported = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if unsupported:
        raise ValueError(
            f"The model ({config.model_type}) has attention layer types {unsupported}; "
            f"the processor supports {SUPPORTED_LAYER_TYPES}"
        )
    if "sliding_attention" in layer_types and window is None:
        raise ValueError(f"The model ({config.model_type}) has sliding layers but no sliding_window")
    return tuple(layer_types), window


class ValueAugmentedLogitsProcessor(LogitsProcessor):
    r"""Steers generation toward the rewards of one or more value models (Value Augmented Sampling).

    Adds Σ_i beta_i · (Q_i(a) − mean_K Q_i) to the scores of the `top_k` best tokens a ∈ K, where
    Q_i(a) = V_i(prefix∘a) (for a distributional value model, the soft value (1/beta_i) log E[exp(beta_i z)]
    of its predicted reward distribution; for a token head, its Q_i(prefix, a)); the other tokens get −inf
    (`outside_top_k="mask"`) or keep their score ("keep").
    It runs before generate()'s temperature and top-p warpers, so a temperature T divides beta too.

    Args:
        value_models: One ValueModel or a list of them; each must share the base model's vocabulary.
        beta: The strength of each value model's pull: one float, or a list with one per value model.
            0 leaves the base distribution (within the top-k) unchanged; larger values chase the reward.
        top_k: How many of the base model's best tokens are valued at each step (the paper's k). Larger k steers
            more per nat of KL (the dev benchmark: gain ratio 0.32 / 0.52 / 0.61 at k = 4 / 10 / 20, same value
            model, β = 2) at 1 + k value-model positions per step.
        pad_token_id: The id used to left-pad prompts, masked out for the value models. Defaults to the first
            value model's `config.pad_token_id`, then its backbone's pad id, then its EOS id (generate()'s own
            fallback). Leading tokens equal to it count as padding; for an exact answer whatever the ids,
            hand over the prompts' mask with `set_attention_mask`.
        outside_top_k: "mask" sets the scores outside the top-k to −inf; "keep" leaves them unchanged.
        cache_implementation: "dynamic" (a DynamicCache per value model, the default) or "static" (buffers of
            fixed address: a write pointer instead of crops; see `static_cache.py`). Default: "static" when
            `compile` is set, else "dynamic".
        compile: Compile each value model's one-token decoding step with torch.compile (CUDA graphs on a GPU:
            mode "reduce-overhead"). The prompt's forward and multi-token steps (assisted decoding) stay eager.
            The first steps pay for compilation, and again whenever the cache outgrows a multiple of 256
            columns or the batch size changes. Compiled steps of several threads run one at a time.

    Shapes: `input_ids` (batch, seq) LongTensor, `scores` (batch, vocab) float; returns (batch, vocab) in the
    scores' dtype, a new tensor.

    State: the value models' caches are kept between calls, one set per thread (one processor may serve
    several threads at once; one processor per request is the fast path, as nothing is shared). A new
    generate() call (other prompts, batch size, or a sequence that is no continuation) is detected and the
    state rebuilt, as it is after a call that failed half-way or after the value models' weights changed;
    `reset()` does it by hand.

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
        top_k: int = 20,
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
        self.betas = _check_betas(beta, len(self.value_models))
        self.top_k = _check_token_id("top_k", top_k, minimum=1)
        self.pad_token_id = _default_pad_token_id(self.value_models[0], _check_token_id("pad_token_id", pad_token_id))
        self.outside_top_k = outside_top_k
        self.cache_implementation = cache_implementation
        self.compile = bool(compile)
        self._layouts = [attention_layout(value_model) for value_model in self.value_models]
        self._token_heads = [value_model.token_head for value_model in self.value_models]
        bos = self.value_models[0].backbone_config.bos_token_id
        self._bos_token_id = bos if isinstance(bos, int) else None
        self._compiled: list | None = None  # the compiled value models, built on the first decoding step
        self._compile_lock = threading.Lock()  # one compiled (CUDA-graph) step at a time
        self._local = threading.local()  # this thread's DecodingStream
        self._generation = 0  # bumped by reset(): every thread's stream starts over at its next call
        self._warned_training = False

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget all cached state (every thread's, and this thread's attention mask); the next call of each
        thread starts from its full `input_ids`. Static buffers are kept and reused."""
        self._generation += 1
        stream = getattr(self._local, "stream", None)
        if stream is not None:
            stream.prompt_mask = stream.prompt_ids = None

    def set_attention_mask(self, attention_mask: torch.Tensor) -> "ValueAugmentedLogitsProcessor":
        """Hand over the prompts' attention mask for this thread's next generate() call, so left padding is
        known exactly instead of inferred from `pad_token_id` (needed when a real first token may equal the pad
        id, e.g. BOS == pad). Rows expanded by `num_return_sequences` / `num_beams` are matched automatically.
        The mask is dropped when a later call brings other prompts.

        Args:
            attention_mask: (batch, prompt_length) 0/1 or bool, as the tokenizer returned it.

        Returns:
            The processor itself: `logits_processor=[vas.set_attention_mask(inputs["attention_mask"])]`.
        """
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError(f"`attention_mask` must be a (batch, seq) tensor, got {attention_mask!r:.80}")
        stream = self._stream()
        stream.prompt_mask, stream.prompt_ids = attention_mask.detach().bool().clone(), None
        stream.forget()
        return self

    @property
    def cached_length(self) -> int:
        """How many columns of `input_ids` the value models' caches hold (in this thread)."""
        return self._stream().cached_length

    @property
    def _caches(self) -> list:
        return self._stream().caches

    def _stream(self) -> DecodingStream:
        """This thread's stream, started over if it is stale: after reset(), a failed step or new weights."""
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = DecodingStream(self.value_models, self.cache_implementation,
                                                         self.pad_token_id, self._bos_token_id)
        weights_version = self._weights_version()
        if not stream.consistent or (stream.generation, stream.weights_version) != (self._generation, weights_version):
            stream.forget()
            stream.generation, stream.weights_version = self._generation, weights_version
        return stream

    def _weights_version(self) -> tuple:
        """Changes whenever a value model's parameters are replaced or edited in place (load_state_dict, an
        optimizer step, .to()): the cached keys and values then belong to other weights."""
        return tuple((p.data_ptr(), p._version) for model in self.value_models for p in model.parameters())

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._check_inputs(input_ids, scores)
        top_k = min(self.top_k, scores.shape[-1])
        candidate_scores, candidates = scores.topk(top_k, dim=-1)  # (B, k) each
        stream = self._stream()
        stream.consistent = False  # until every forward below has succeeded
        new_start = stream.sync(input_ids, room=top_k, recompute_last=any(self._token_heads))
        static = self.cache_implementation == "static"
        key_width = stream.caches[0].capacity if static else None  # static: every slot, stale ones masked
        new_ids = input_ids[:, new_start:]  # (B, n)
        # Two kinds of step: V(s∘a) models forward the k candidates as siblings after the new ids; token-head
        # models forward the new ids alone and value the candidates from the last hidden state.
        steps = {}
        for token_head in set(self._token_heads):
            siblings = 0 if token_head else top_k
            masks, position_ids = stream.step_masks(new_start, siblings, self._layouts, key_width)
            step_ids = new_ids if token_head else torch.cat([new_ids, candidates], dim=-1)  # (B, n [+ k])
            steps[token_head] = (masks, position_ids, step_ids)
        compiled = self.compile and new_ids.shape[1] == 1  # the steady decoding step: fixed shapes
        with self._compile_lock if compiled else contextlib.nullcontext():
            models = self._compiled_models(scores.device) if compiled else self.value_models
            adjustment = torch.zeros_like(candidate_scores, dtype=torch.float32)  # (B, k)
            for index, (model, value_model, beta, cache) in enumerate(zip(models, self.value_models, self.betas,
                                                                          stream.caches)):
                token_head = self._token_heads[index]
                masks, position_ids, step_ids = steps[token_head]
                output = model(
                    input_ids=step_ids,
                    attention_mask=masks[index],
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=True,
                    **({"next_tokens": candidates[:, None, :]} if token_head else {}),  # (B, 1, k): at the end
                )
                # (B, k): beta · Q(s, a) for each candidate a (the soft Q of a distributional head), used before
                # the next forward runs
                scaled = value_model.beta_times_q(output, beta, top_k)
                if not token_head:
                    cache.crop(-top_k)  # the candidates were only siblings: keep the prefix, drop them
                adjustment += scaled - scaled.mean(dim=-1, keepdim=True)
        if not bool(torch.isfinite(adjustment).all()):
            raise ValueError(
                f"VAS produced non-finite adjustments (betas {self.betas}; value model dtypes "
                f"{[str(model.dtype) for model in self.value_models]}): a value model overflowed (fp16? load it in "
                "bfloat16 or float32) or beta is too large for its values"
            )
        stream.consistent = True

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
            # the longest row has no padding: its candidates sit at position input_ids.shape[1]
            value_model.check_length(input_ids.shape[1] + (0 if value_model.token_head else 1),
                                     f"Value model {index}'s input at this step (prompt + generated + candidate)")
            if value_model.training and not self._warned_training:
                logger.warning("Value model %d is in training mode (dropout active); call .eval() on it.", index)
                self._warned_training = True


VAS = ValueAugmentedLogitsProcessor


def _check_betas(beta, num_models: int) -> list[float]:
    """One finite float per value model (a single value is used for all); numpy scalars and arrays welcome."""
    if isinstance(beta, numbers.Real) and not isinstance(beta, bool):
        betas = [beta]
    elif isinstance(beta, (str, bytes)):
        betas = None
    else:
        try:
            betas = list(beta)
        except TypeError:
            betas = None
    if betas is not None and len(betas) == 1:
        betas = betas * num_models
    if betas is None or len(betas) != num_models:
        raise ValueError(
            f"`beta` must be a float or a list with one float per value model ({num_models}), got {beta!r}"
        )
    for index, value in enumerate(betas):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"`beta` must hold finite floats, got {value!r} at index {index}")
    return [float(value) for value in betas]


def _check_token_id(name: str, value, minimum: int = 0) -> int | None:
    """An int (numpy integers welcome) >= minimum, or None where allowed (minimum 0)."""
    if value is None and minimum == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a strictly positive integer" if minimum else "an int >= 0 or None"
        raise ValueError(f"`{name}` has to be {kind}, but is {value!r}")
    return int(value)


def _default_pad_token_id(value_model: ValueModel, pad_token_id: int | None) -> int | None:
    """The pad id to infer left padding from: given, the value model's, its backbone's, or EOS as generate() does."""
    for candidate in (pad_token_id, value_model.config.pad_token_id, value_model.backbone_config.pad_token_id,
                      value_model.backbone_config.eos_token_id):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return None
