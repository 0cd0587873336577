"""The one place that knows how torch and transformers releases differ.

transformers 5.24 renamed the key/value cache from `past_key_values` to `cache`: model forwards take
`cache=` (the old keyword warns and goes away in 5.40) and every ModelOutput stores it as `.cache` (a
metaclass rewrites `past_key_values=` in their constructors). Earlier 5.x releases know only
`past_key_values`. The rest of the package passes caches through `backbone_forward` and never names either.

Which name a model takes is read off its own forward signature, not off a version number, so remote-code
or patched models that differ from their release still work.

The supported range is the one CI tests (`.ci/run`): the oldest releases below and the newest on PyPI.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
import transformers
from packaging.version import Version

# Oldest releases the test suite runs on in CI (keep setup.cfg's install_requires in step).
MIN_TRANSFORMERS = "5.6.0"
MIN_TORCH = "2.6.0"
# First releases we have never run on: may work, so a warning rather than an error.
NEXT_MAJOR_TRANSFORMERS = "6.0.0"
NEXT_MAJOR_TORCH = "3.0.0"


def _release(version: str) -> Version:
    """'2.13.0+cpu' -> Version('2.13.0'); pre-releases of a supported release count as that release."""
    return Version(Version(version).base_version)


def check_versions(transformers_version: str | None = None, torch_version: str | None = None) -> None:
    """Refuse releases the package cannot work with, warn about ones it has never been tested on.

    Raises:
        ImportError: transformers older than MIN_TRANSFORMERS (4.x has tuple caches and another Cache API,
            and 5.x releases before the floor are untested), or torch older than MIN_TORCH.
    """
    installed = {
        "transformers": transformers_version or transformers.__version__,
        "torch": torch_version or torch.__version__,
    }
    limits = {
        "transformers": (MIN_TRANSFORMERS, NEXT_MAJOR_TRANSFORMERS),
        "torch": (MIN_TORCH, NEXT_MAJOR_TORCH),
    }
    for package, version in installed.items():
        low, high = limits[package]
        if _release(version) < Version(low):
            raise ImportError(
                f"vas_logits needs {package}>={low},<{high}, but {package} {version} is installed: "
                f"`pip install -U '{package}>={low}'`"
            )
        if _release(version) >= Version(high):
            warnings.warn(
                f"vas_logits is tested with {package}>={low},<{high}; {package} {version} is installed and may "
                "not work. Please report problems.",
                UserWarning,
                stacklevel=3,
            )


_CACHE_KEYWORDS: dict[type, str] = {}  # model class -> keyword; a plain dict, which torch.compile traces


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword `model.forward` takes its KV cache under: "cache" (transformers >= 5.24) or "past_key_values"."""
    keyword = _CACHE_KEYWORDS.get(type(model))
    if keyword is None:
        parameters = inspect.signature(type(model).forward).parameters
        keyword = _CACHE_KEYWORDS[type(model)] = "cache" if "cache" in parameters else "past_key_values"
    return keyword


def output_cache(outputs: Any) -> Any:
    """The cache a transformers ModelOutput carries, read without a deprecation warning on any release."""
    if "cache" in getattr(outputs, "__dataclass_fields__", {}):
        return outputs.cache
    return getattr(outputs, "past_key_values", None)


def backbone_forward(backbone: torch.nn.Module, cache: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """Run a transformers base model with `cache` under whichever keyword it takes.

    Returns:
        (outputs, cache): the model's output and the cache it returns (None when `use_cache` is off).
    """
    kwargs[cache_keyword(backbone)] = cache
    outputs = backbone(**kwargs)
    return outputs, (output_cache(outputs) if kwargs.get("use_cache") else None)
