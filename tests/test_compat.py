"""compat.py: the supported version range, and no deprecated transformers API in our own calls."""

import logging
import warnings

import pytest
import torch
from transformers import DynamicCache

from vas_logits import VAS, ValueModel, compat, fit
from vas_logits.compat import MIN_TORCH, MIN_TRANSFORMERS, backbone_forward, cache_keyword, check_versions

from .helpers import ARCHITECTURES, PAD, count_good_words, tiny_causal_lm, tiny_value_model, word_tokenizer


@pytest.mark.parametrize("package, installed", [("transformers", "4.57.1"), ("transformers", "5.3.0"),
                                                ("torch", "2.3.1+cu121")])
def test_a_release_below_the_floor_is_an_error_naming_both_versions(package, installed):
    with pytest.raises(ImportError) as error:
        check_versions(**{f"{package}_version": installed})
    floor = MIN_TRANSFORMERS if package == "transformers" else MIN_TORCH
    assert installed in str(error.value) and f"{package}>={floor}" in str(error.value)


@pytest.mark.parametrize("package, installed", [("transformers", "6.0.0"), ("torch", "3.1.0")])
def test_a_release_past_the_tested_major_is_a_warning(package, installed):
    with pytest.warns(UserWarning, match=f"{package} {installed} is installed and may not work"):
        check_versions(**{f"{package}_version": installed})


@pytest.mark.parametrize("installed", [MIN_TRANSFORMERS, "5.24.0", "5.30.0.dev0"])
def test_the_supported_range_passes_silently(installed):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_versions(transformers_version=installed, torch_version="2.13.0+cpu")


def test_the_floor_is_the_same_in_setup_cfg_compat_and_the_ci_pins():
    from pathlib import Path

    root = Path(__file__).parents[1]
    assert f"transformers>={MIN_TRANSFORMERS}," in (root / "setup.cfg").read_text()
    assert f"torch>={MIN_TORCH.removesuffix('.0')}" in (root / "setup.cfg").read_text()
    assert f"transformers=={MIN_TRANSFORMERS}" in (root / ".ci" / "oldest.txt").read_text().splitlines()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_backbone_forward_fills_the_cache_it_is_given(architecture):
    value_model = tiny_value_model(architecture)
    cache = DynamicCache()
    _, returned = backbone_forward(value_model.backbone, cache, input_ids=torch.tensor([[3, 4, 5]]), use_cache=True)
    assert returned is cache and cache.get_seq_length() == 3
    assert cache_keyword(value_model.backbone) in ("cache", "past_key_values")


def test_the_old_keyword_of_value_model_forward_still_works_with_a_warning():
    value_model = tiny_value_model("llama")
    first = value_model(torch.tensor([[3, 4]]), use_cache=True)
    with pytest.warns(FutureWarning, match="pass `cache=`"):
        second = value_model(torch.tensor([[5]]), past_key_values=first.cache, use_cache=True)
    with pytest.warns(FutureWarning, match="read `.cache`"):
        assert second.past_key_values is first.cache
    with pytest.raises(ValueError, match="not both"):
        value_model(torch.tensor([[5]]), cache=first.cache, past_key_values=first.cache)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_generate_with_vas_and_fit_use_no_deprecated_transformers_api():
    """transformers reports its renames once per process (warning_once), through its logger or as a
    FutureWarning: clear the once-cache and catch both around a VAS generate() and a fit() step."""
    logging.Logger.warning_once.cache_clear()
    handler = Records()
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokenizer, base = word_tokenizer(), tiny_causal_lm("llama")
            for cache_implementation in ("dynamic", "static"):
                vas = VAS(tiny_value_model("llama"), beta=1.0, top_k=4, cache_implementation=cache_implementation)
                base.generate(torch.tensor([[3, 4, 5]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                              max_new_tokens=3, do_sample=False, pad_token_id=PAD, logits_processor=[vas])
            value_model = fit(base, tokenizer, ["w5 w6", "w7 w8"], count_good_words, ValueModel.from_backbone(base, 1),
                              samples_per_prompt=2, max_new_tokens=3, epochs=1, batch_size=2, progress=False)
            value_model(torch.tensor([[3, 4]]), use_cache=True).cache
    finally:
        library_logger.removeHandler(handler)
    deprecations = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    deprecations += [message for message in handler.messages if "deprecat" in message.lower()]
    assert deprecations == []


def test_compat_is_the_only_module_that_names_the_cache_keywords():
    from pathlib import Path

    package = Path(compat.__file__).parent
    for module in package.glob("*.py"):
        if module.name in ("compat.py", "value_model.py"):  # value_model.py: the deprecated alias of forward()
            continue
        assert "past_key_values" not in module.read_text(), module.name
