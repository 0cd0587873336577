"""vas_logits: Value Augmented Sampling (Han et al., arXiv 2405.06639) for any Hugging Face `generate()` call.

A small value model V re-weights a frozen base model's next-token distribution:

    pi(a|s) ∝ pi_ref(a|s) · exp(beta · Q(s, a)),    Q(s, a) = V(s∘a)

>>> from vas_logits import VAS, ValueModel
>>> value_model = ValueModel.from_pretrained("someone/vas-sentiment")          # doctest: +SKIP
>>> model.generate(**inputs, logits_processor=[VAS(value_model, beta=2.0)])   # doctest: +SKIP

A model reachable only through an OpenAI-compatible API (needs `pip install "vas-logits[api]"`):

>>> from vas_logits import VASClient
>>> client = VASClient("http://127.0.0.1:8000/v1", value_model, tokenizer, beta=2.0)  # doctest: +SKIP
>>> client.generate(["The movie was"], max_new_tokens=32)                             # doctest: +SKIP
"""

__version__ = "0.4.0.dev0"

from .compat import check_versions

check_versions()  # a clear error for torch/transformers releases the package cannot work with


from .api import APICompletion, APIGenerationError, VASClient
from .blockwise import BlockwiseSampler
from .endpoint import CompletionsEndpoint, EndpointError
from .fit import fit
from .fit_config import FitConfig
from .prefix_rewards import PrefixRewards
from .processor import VAS, ValueAugmentedLogitsProcessor
from .rewards import reward_model_fn
from .rollouts import Rollouts
from .targets import td_lambda_targets
from .text_values import TextValuer
from .value_model import ValueModel, ValueModelConfig, ValueModelOutput

__all__ = [
    "APICompletion",
    "APIGenerationError",
    "BlockwiseSampler",
    "CompletionsEndpoint",
    "PrefixRewards",
    "Rollouts",
    "EndpointError",
    "FitConfig",
    "TextValuer",
    "VAS",
    "VASClient",
    "ValueAugmentedLogitsProcessor",
    "ValueModel",
    "ValueModelConfig",
    "ValueModelOutput",
    "__version__",
    "fit",
    "reward_model_fn",
    "td_lambda_targets",
]
