"""The value model of Value Augmented Sampling: a causal transformer backbone and a value head.

V(s) estimates the expected final reward of the frozen base model's continuations of the prefix s
(Han et al., "Value Augmented Sampling for Language Model Alignment and Personalization",
arXiv 2405.06639). Decoding queries Q(s, a) = V(s∘a) for the base model's top-k candidates a.

Three heads:
    scalar           V(s) = E[R | s], one number (the paper's value model)
    distributional   p(z_j | s) over fixed reward atoms z_1 < ... < z_A (a categorical return distribution,
                     as in C51 and Q-sharp, Zhou et al. 2025). The processor then uses the soft value
                     Q_beta = (1/beta) log E_p[exp(beta z)], which the KL-regularised optimum calls for; its
                     beta -> 0 limit is the mean. One forward serves every beta, so beta stays a per-request dial.
    token            Q(s, a) for every next token a at once, read from the hidden state h_s at s (as Q-sharp,
                     Zhou et al. 2025): Q(s, a) = (W h_s + c) · e_a + b_a, with e_a the backbone's own token
                     embedding of a (SmolLM2 and other tied models: their LM head), W, c, b zero at the start.
                     Decoding then forwards only the new token per step (1 position, not 1 + k siblings), and
                     tokens that share embedding directions share what was learned about them.
Rewards may be standardised (config.reward_mean / reward_std): values are then in standard deviations of the
training rewards, so one beta means the same pull whatever the reward's scale.

On disk and on the Hub a value model is two files, like a PEFT adapter:
    config.json          ValueModelConfig (the backbone's transformers config is nested in it)
    model.safetensors    backbone.* and head.* weights
plus a model card README.md. Loading never unpickles and never runs code from the repository.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel, PretrainedConfig
from transformers.utils import ModelOutput

from .compat import backbone_forward

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HEAD_TYPES = ("scalar", "distributional", "token")
# Names of learned absolute position tables (GPT-2/GPT-J: wpe; OPT, BART: embed_positions; BERT-like, GPT-Neo)
POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def _library_version() -> str:
    from . import __version__

    return __version__


@dataclass
class ValueModelConfig:
    """Everything needed to rebuild a ValueModel, plus what a user should know before using it.

    Args:
        backbone_config: The backbone's transformers config as a dict (`PretrainedConfig.to_dict()`); its
            `model_type` picks the architecture.
        head: "scalar" (`nn.Linear(hidden, 1)`: the expected reward), "distributional" (`nn.Linear(hidden,
            num_atoms)`: a categorical distribution of the reward over `num_atoms` atoms spread evenly over
            `value_range`) or "token" (Q(s, a) of every next token a from the state s: `nn.Linear(hidden,
            hidden)` against the backbone's token embeddings, plus a per-token bias).
        num_atoms: Atoms of the distributional head.
        value_range: (lowest, highest) atom of the distributional head, in the value's units (fit() sets it
            from the training rewards).
        reward_mean, reward_std: When set, the value model predicts standardised rewards (R − mean) / std, so
            V_raw = reward_mean + reward_std · V and beta is per standard deviation of the reward.
        base_model: Name or path of the base model whose samples trained this value model.
        reward: Free text describing the reward it predicts.
        vocab_size: The token vocabulary; must equal the base model's (ids pass straight from one to the other).
        beta: Recommended strength for `VAS(..., beta=...)`.
        top_k: Recommended number of candidates for `VAS(..., top_k=...)`.
        pad_token_id: The tokenizer's padding id, used by the processor to mask left padding.
        vas_logits_version: Version of vas_logits that wrote the config.
    """

    backbone_config: dict[str, Any]
    head: str = "scalar"
    num_atoms: int = 51  # distributional head: fine enough for the soft value at beta up to ~20 per std
    value_range: tuple[float, float] = (-3.0, 3.0)  # distributional head: three std either side of the mean
    reward_mean: float | None = None
    reward_std: float | None = None
    base_model: str | None = None
    reward: str | None = None
    vocab_size: int | None = None  # filled in from backbone_config when left out
    beta: float = 1.0  # a moderate pull toward the reward; 0 is the base model
    top_k: int = 20  # VAS's default k: on the dev benchmark k = 20 gains more per nat than 10 (README)
    pad_token_id: int | None = None
    vas_logits_version: str = field(default_factory=_library_version)

    def __post_init__(self):
        if not isinstance(self.backbone_config, dict) or "model_type" not in self.backbone_config:
            raise ValueError(
                "`backbone_config` must be a dict with a 'model_type' key (a transformers config's to_dict()), "
                f"got {type(self.backbone_config).__name__}"
            )
        # Stored as JSON holds it (integer keys such as id2label's become strings), so equal configs compare equal.
        self.backbone_config = json.loads(json.dumps(self.backbone_config))
        if self.head not in HEAD_TYPES:
            raise ValueError(f"`head` must be one of {HEAD_TYPES}, got {self.head!r}")
        if isinstance(self.num_atoms, bool) or not isinstance(self.num_atoms, int) or self.num_atoms < 2:
            raise ValueError(f"`num_atoms` must be an int >= 2, got {self.num_atoms!r}")
        self.value_range = _value_range(self.value_range)
        if (self.reward_mean is None) != (self.reward_std is None):
            raise ValueError(
                f"`reward_mean` and `reward_std` go together, got {self.reward_mean!r}, {self.reward_std!r}"
            )
        if self.reward_std is not None and (not math.isfinite(self.reward_std) or self.reward_std <= 0
                                            or not math.isfinite(self.reward_mean)):
            raise ValueError(f"`reward_std` must be a finite float > 0 and `reward_mean` finite, got "
                             f"{self.reward_std!r}, {self.reward_mean!r}")
        if self.vocab_size is None:
            self.vocab_size = self.backbone_config.get("vocab_size")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ValueModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            logger.warning("Ignoring unknown ValueModelConfig fields %s (written by a newer vas_logits?)", unknown)
        return cls(**{key: value for key, value in values.items() if key in known})

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ValueModelConfig":
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Could not read a ValueModelConfig from {path}: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
        return cls.from_dict(values)


def _value_range(values) -> tuple[float, float]:
    """`values` as (low, high) floats, or a ValueError naming the argument."""
    try:
        low, high = (float(value) for value in values)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"`value_range` must be (low, high) finite floats with low < high, got {values!r}")
    return low, high


def token_values(head: nn.Linear, token_bias: torch.Tensor, embeddings: torch.Tensor, hidden: torch.Tensor,
                 next_tokens: torch.LongTensor | None) -> torch.Tensor:
    """A token head's Q(s_t, a) = head(h_t) · e_a + b_a, float32: (B, n, m) for next_tokens (B, n, m) at the last n
    positions of hidden (B, T, H), or (B, T, V) of every token at every position. embeddings: (V, H) the e_a."""
    if next_tokens is None:
        return (head(hidden) @ embeddings.T + token_bias).float()
    query = head(hidden[:, hidden.shape[1] - next_tokens.shape[1] :])  # (B, n, H): only where asked
    chosen = embeddings[next_tokens]  # (B, n, m, H)
    return ((chosen @ query[..., None]).squeeze(-1) + token_bias[next_tokens]).float()


@dataclass
class ValueModelOutput(ModelOutput):
    """Output of `ValueModel.forward`.

    Args:
        values: (batch, seq) float32, the value of the prefix ending at each position (the distributional
            head's mean); for the token head (batch, n, m): Q(prefix, a) of the m `next_tokens` a at each of
            the last n positions, or (batch, seq, vocab) of every token when none were given.
        logits: (batch, seq, num_atoms) float32, the distributional head's logits over the atoms (None for the
            scalar head).
        cache: The backbone's transformers Cache when `use_cache=True`.
        hidden: (batch, seq, hidden) the backbone's last hidden state, when `return_hidden=True` (fit()'s
            prefix head reads it).
    """

    values: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    # Named `cache`, as transformers >= 5.24 names it: from 5.24 on, a ModelOutput field called
    # `past_key_values` cannot be set (its constructor keyword is rewritten to `cache`).
    cache: Any = None

    @property
    def past_key_values(self) -> Any:
        """Deprecated name of `cache` (vas_logits < 0.4)."""
        warnings.warn("`ValueModelOutput.past_key_values` is deprecated: read `.cache`", FutureWarning, stacklevel=2)
        return self.cache


def _backbone_config_from_dict(values: dict[str, Any]) -> PretrainedConfig:
    values = {key: value for key, value in values.items() if key not in ("quantization_config", "auto_map")}
    return AutoConfig.for_model(**values)


def _truncate_config(config: PretrainedConfig, num_layers: int | None) -> PretrainedConfig:
    """A copy of `config` keeping the first `num_layers` layers (None keeps all)."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):  # e.g. a GGUF-loaded model: the copy holds plain weights
        del config.quantization_config
    if num_layers is None:
        return config
    total = config.num_hidden_layers
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or not 1 <= num_layers <= total:
        raise ValueError(f"`num_layers` must be an int in [1, {total}] for this backbone, got {num_layers!r}")
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    return config


def _check_causal(config: PretrainedConfig) -> None:
    """A value model reads V(prefix) at every position, so position t must not see tokens after t."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = config.model_type
    bidirectional = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    causal_lm = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if getattr(config, "is_encoder_decoder", False) or not causal_lm or bidirectional:
        raise ValueError(
            f"The value model's backbone must be a causal (decoder-only) language model, got model_type "
            f"{model_type!r}{' (bidirectional: every position would see the future)' if bidirectional else ''}"
        )


def _build_backbone(config: PretrainedConfig, dtype: torch.dtype | None) -> PreTrainedModel:
    # The processor scores k candidates in one forward with a custom 4-D mask, which the sdpa and eager
    # attention kernels accept as given (flash-attention does not take arbitrary masks).
    try:
        return AutoModel.from_config(config, attn_implementation="sdpa", dtype=dtype)
    except ValueError:
        return AutoModel.from_config(config, attn_implementation="eager", dtype=dtype)


class ValueModel(nn.Module):
    """A causal LM backbone (no LM head) and a value head: V(prefix) for every prefix of the input.

    Attributes:
        config: The ValueModelConfig.
        backbone: A transformers `AutoModel` (e.g. LlamaModel, GPT2Model).
        head: `nn.Linear(hidden_size, 1)` (scalar) or `nn.Linear(hidden_size, num_atoms)` (distributional),
            zero-initialised so a fresh value model leaves decoding unchanged.
        atoms: (num_atoms,) float32, the distributional head's support (follows config.value_range).

    Example:
        >>> from transformers import LlamaConfig
        >>> from vas_logits import ValueModel
        >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2)
        >>> value_model = ValueModel.from_backbone(config)
        >>> value_model(torch.tensor([[1, 2, 3]])).values.shape
        torch.Size([1, 3])
    """

    def __init__(self, config: ValueModelConfig, *, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        backbone_config = _backbone_config_from_dict(config.backbone_config)
        _check_causal(backbone_config)
        self.backbone = _build_backbone(backbone_config, dtype)
        hidden_size = self.backbone.config.hidden_size
        outputs = config.num_atoms if self.distributional else 1
        if config.head == "token":
            # Q(s, a) = head(h_s) · e_a + token_bias[a], e_a the backbone's input embedding of a
            self.head = nn.Linear(hidden_size, hidden_size, dtype=self.backbone.dtype)
            self.token_bias = nn.Parameter(torch.zeros(self.backbone.config.vocab_size, dtype=self.backbone.dtype))
        else:
            self.head = nn.Linear(hidden_size, outputs, dtype=self.backbone.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def distributional(self) -> bool:
        return self.config.head == "distributional"

    @property
    def token_head(self) -> bool:
        """Whether one forward at s values every next token (head "token") rather than s∘a being forwarded."""
        return self.config.head == "token"

    @property
    def atoms(self) -> torch.Tensor:
        return torch.linspace(*self.config.value_range, self.config.num_atoms, device=self.device)

    def set_value_range(self, low: float, high: float) -> None:
        """Move the distributional head's atoms (only sensible before it is trained: fit() does it)."""
        self.config.value_range = _value_range((low, high))

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    @property
    def backbone_config(self) -> PretrainedConfig:
        return self.backbone.config

    @functools.cached_property
    def max_positions(self) -> int | None:
        """How many positions the backbone has learned embeddings for (GPT-2: n_positions), past which it fails
        with an IndexError; None for rotary and other relative schemes, which take any position."""
        for name, module in self.backbone.named_modules():
            if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
                return module.num_embeddings
        return None

    def check_length(self, length: int, what: str) -> None:
        """Raise a ValueError naming `what` if a sequence of `length` tokens has positions past max_positions."""
        if self.max_positions is not None and length > self.max_positions:
            raise ValueError(
                f"{what} is {length} tokens, but the value model ({self.backbone.config.model_type}) has learned "
                f"position embeddings for {self.max_positions} only: shorten the prompt or max_new_tokens, or use "
                "a value model with rotary positions (Llama, Qwen2, Mistral, GPT-NeoX)"
            )

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | dict[str, torch.Tensor] | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
        past_key_values: Any = None,
        next_tokens: torch.LongTensor | None = None,
        return_hidden: bool = False,
    ) -> ValueModelOutput:
        """Values of every prefix of `input_ids` (token head: Q of next tokens after every prefix).

        Args:
            input_ids: (batch, seq) token ids.
            attention_mask: (batch, past + seq) 0/1 padding mask, or a prepared 4-D mask
                (batch, 1, seq, past + seq) used as given, or a dict of such masks per layer type.
            position_ids: (batch, seq). With a 2-D mask and none given, counted from each row's first real
                token (`mask.cumsum(-1) - 1`), as `generate()` does for left-padded batches.
            cache: A transformers Cache holding the earlier tokens.
            use_cache: Whether to return the (updated) cache.
            past_key_values: Deprecated name of `cache` (transformers' own before 5.24).
            next_tokens: Token head only: (batch, n, m) ids a whose Q(prefix, a) to return at each of the last
                n <= seq positions (decoding passes n = 1; default: every token of the vocabulary, everywhere).
            return_hidden: Also return the backbone's last hidden state (`hidden`).

        Returns:
            ValueModelOutput with `values` (batch, seq) float32 ((batch, seq, m) for the token head), and `logits`
            (batch, seq, num_atoms) for the distributional head.
        """
        if next_tokens is not None and not self.token_head:
            raise ValueError(f"`next_tokens` is for the token head; this value model's head is {self.config.head!r}")
        if position_ids is None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("Pass the cache as `cache` only, not both `cache` and `past_key_values`")
            warnings.warn("`past_key_values=` is deprecated: pass `cache=`", FutureWarning, stacklevel=2)
            cache = past_key_values
        outputs, cache = backbone_forward(
            self.backbone,
            cache,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
        )
        hidden = outputs.last_hidden_state if return_hidden else None
        if self.token_head:
            values = token_values(self.head, self.token_bias, self.backbone.get_input_embeddings().weight,
                                  outputs.last_hidden_state, next_tokens)
            return ValueModelOutput(values=values, cache=cache, hidden=hidden)
        head = self.head(outputs.last_hidden_state).float()  # (B, T, 1) or (B, T, A)
        logits = head if self.distributional else None
        values = head.softmax(-1) @ self.atoms if self.distributional else head.squeeze(-1)  # (B, T)
        return ValueModelOutput(values=values, logits=logits, cache=cache, hidden=hidden)

    def beta_times_q(self, output: ValueModelOutput, beta: float | torch.Tensor, last: int) -> torch.Tensor:
        """beta · Q for the last `last` positions of `output`, (batch, last) float32.

        Token head: the forward valued `last` next tokens at its last position; beta times those.
        Scalar head: beta · V. Distributional head: beta times the soft value (1/beta) log Σ_j p_j exp(beta z_j),
        i.e. log Σ_j p_j exp(beta z_j), computed stably as a logsumexp (0 at beta = 0, where Q is the mean).
        `beta` is one float, or a (batch,) tensor of one per row (vLLM: each request brings its own).
        """
        if isinstance(beta, torch.Tensor):
            beta = beta.to(torch.float32).view(-1, 1, 1) if self.distributional else beta.to(torch.float32).view(-1, 1)
        if self.token_head:
            return beta * output.values[:, -1, -last:]
        if not self.distributional:
            return beta * output.values[:, -last:]
        log_probs = output.logits[:, -last:].log_softmax(-1)  # (B, last, A)
        return torch.logsumexp(log_probs + beta * self.atoms, dim=-1)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_backbone(
        cls,
        source: PretrainedConfig | PreTrainedModel | str | os.PathLike,
        num_layers: int | None = None,
        dtype: torch.dtype | None = None,
        **metadata: Any,
    ) -> "ValueModel":
        """A new value model (head at zero) on a backbone taken from `source`.

        Args:
            source: A transformers config (random init), a loaded (causal) LM whose LM head is dropped, or a
                local path / Hub id of one.
            num_layers: Keep only the first `num_layers` layers: a cheap value model cut from the base itself.
            dtype: Parameter dtype; defaults to the source's.
            **metadata: ValueModelConfig fields such as `base_model`, `reward`, `beta`, `top_k`, `pad_token_id`.

        The weights are copied: the value model never shares a tensor with `source`.
        """
        if isinstance(source, PretrainedConfig):
            config = _truncate_config(source, num_layers)
            metadata.setdefault("pad_token_id", _pad_token_id(config))
            return cls(ValueModelConfig(backbone_config=config.to_dict(), **metadata), dtype=dtype).eval()
        if isinstance(source, (str, os.PathLike)):
            config = _truncate_config(AutoConfig.from_pretrained(source), num_layers)
            source_backbone = AutoModel.from_pretrained(source, config=config, dtype=dtype)
            metadata.setdefault("base_model", str(source))
        elif isinstance(source, PreTrainedModel):
            source_backbone = source.base_model
            config = _truncate_config(source_backbone.config, num_layers)
            metadata.setdefault("base_model", getattr(source.config, "_name_or_path", None) or None)
        else:
            raise TypeError(
                "`source` must be a transformers config, a PreTrainedModel, or a path / Hub id, "
                f"got {type(source).__name__}"
            )
        metadata.setdefault("pad_token_id", _pad_token_id(config))
        dtype = dtype or source_backbone.dtype
        model = cls(ValueModelConfig(backbone_config=config.to_dict(), **metadata), dtype=dtype)
        source_state = source_backbone.state_dict()
        wanted = model.backbone.state_dict().keys()
        missing = sorted(key for key in wanted if key not in source_state)
        if missing:
            raise ValueError(f"The source backbone lacks weights the value model needs: {missing[:10]}")
        with torch.no_grad():  # load_state_dict copies into the new parameters: nothing is shared
            model.backbone.load_state_dict({key: source_state[key] for key in wanted}, strict=True)
        return model.to(device=next(source_backbone.parameters()).device).eval()

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `config.json`, `model.safetensors` and a model card `README.md` into `save_directory`."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.backbone_config = json.loads(json.dumps(self.backbone.config.to_dict()))
        self.config.vas_logits_version = _library_version()
        self.config.save(directory / CONFIG_NAME)
        state = {key: tensor.detach().contiguous().cpu() for key, tensor in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        (directory / "README.md").write_text(self._model_card())

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike,
        *,
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> "ValueModel":
        """Load a value model from a local directory or a Hub repo id (through the Hub cache).

        Args:
            pretrained: A directory written by `save_pretrained`, or a Hub repo id such as "someone/vas-sentiment".
            revision: Hub branch, tag or commit.
            device: Where to put the model (default: CPU).
            dtype: Parameter dtype (default: the saved one).
            token, cache_dir, local_files_only: Passed to `huggingface_hub.hf_hub_download`. With
                `HF_HUB_OFFLINE=1` a cached repo loads without network access.

        Raises:
            FileNotFoundError: A local directory lacks config.json or model.safetensors.
            ValueError: A file is unreadable or truncated, or the weights' keys or shapes do not match the config.
        """
        config_file, weights_file = _resolve_files(pretrained, revision, token, cache_dir, local_files_only)
        config = ValueModelConfig.load(config_file)
        try:
            state = load_file(str(weights_file), device="cpu")
        except (SafetensorError, OSError) as error:
            raise ValueError(f"Could not read the weights file {weights_file}: {error}") from error
        not_finite = sorted(key for key, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all())
        if not_finite:
            raise ValueError(f"{weights_file} holds non-finite (NaN or inf) weights in {not_finite[:10]}")
        if dtype is None:
            dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        from transformers.initialization import no_init_weights

        with no_init_weights():  # every weight is overwritten below
            model = cls(config, dtype=dtype)
        expected = model.state_dict().keys()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{weights_file} does not match {config_file}: missing keys {missing[:10]}, "
                f"unexpected keys {unexpected[:10]}"
            )
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{weights_file} does not match {config_file}: {error}") from error
        model.eval()
        return model.to(device) if device is not None else model

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
    ) -> str:
        """Upload config.json, model.safetensors and the model card to `repo_id` (created if needed).

        Returns:
            The URL of the commit.
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload value model with vas_logits",
                revision=revision,
                repo_type="model",
            )
        return str(commit)

    def _model_card(self) -> str:
        from huggingface_hub import ModelCardData

        data = ModelCardData(
            library_name="vas_logits",
            base_model=self.config.base_model if _looks_like_hub_id(self.config.base_model) else None,
            tags=["vas", "value-model", "value-augmented-sampling"],
        )
        parameters = sum(p.numel() for p in self.parameters())
        return (
            f"---\n{data.to_yaml()}\n---\n\n"
            "# Value model for Value Augmented Sampling\n\n"
            f"A {parameters / 1e6:.1f}M-parameter `{self.backbone.config.model_type}` value model for "
            f"[vas_logits](https://pypi.org/project/vas-logits/), trained on samples of "
            f"`{self.config.base_model or 'an unnamed base model'}` to predict: "
            f"{self.config.reward or 'an unnamed reward'}.\n\n"
            "It re-weights the base model's top-k next tokens, pi(a|s) ∝ pi_ref(a|s) · exp(beta · V(s∘a)) "
            "(Han et al., arXiv 2405.06639). Use it with the base model it was trained for: both share one "
            f"tokenizer (vocabulary {self.config.vocab_size}).\n\n"
            "```python\n"
            "from vas_logits import VAS, ValueModel\n\n"
            'value_model = ValueModel.from_pretrained("REPO_ID").to(model.device)\n'
            "outputs = model.generate(**inputs, do_sample=True,\n"
            f"                         logits_processor=[VAS(value_model, beta={self.config.beta}, "
            f"top_k={self.config.top_k})])\n"
            "```\n"
        )


def _pad_token_id(config: PretrainedConfig) -> int | None:
    """The config's pad id (the text config's for multimodal configs), None when it has none."""
    pad = getattr(config.get_text_config(), "pad_token_id", None)
    return pad if isinstance(pad, int) else None


def _looks_like_hub_id(name: str | None) -> bool:
    return bool(name) and name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/"))


def _resolve_files(pretrained, revision, token, cache_dir, local_files_only) -> tuple[Path, Path]:
    directory = Path(pretrained)
    if directory.is_dir():
        files = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{file} not found: is {directory} a directory written by save_pretrained?")
        return files
    from huggingface_hub import hf_hub_download

    return tuple(
        Path(
            hf_hub_download(
                repo_id=str(pretrained),
                filename=name,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        )
        for name in (CONFIG_NAME, WEIGHTS_NAME)
    )
