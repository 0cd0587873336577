"""Where fit()'s samples come from: one small interface over every source it knows.

    GenerateSampler   a local transformers model, through its own generate()                     (sampling.py)
    EndpointSampler   a model behind an OpenAI-compatible API (CompletionsEndpoint)             (text_samples.py)
    VLLMSampler       an offline vLLM engine (`vllm.LLM`): n completions per prompt in one call, on
                      as many GPUs as the engine was given (tensor_parallel_size, data_parallel_size)
    GivenSamples      samples generated elsewhere, handed over as text with their rewards        (text_samples.py)

A sampler turns (prompt index, text) pairs into scored Samples, appending each batch to the store as soon as
it is scored, and describes its source for the run directory's fingerprint (`sampling.json`), so stored
samples are reused only by the same source. `make_sampler` picks one from what fit() was given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from .endpoint import CompletionsEndpoint
from .run_dir import describe_base_model
from .sampling import RewardFn, Sample, SampleStore, sample_and_score, score_batch
from .text_samples import endpoint_sample_and_score, given_samples


class Sampler:
    """Draws and scores samples for fit(). Subclasses set `description` and implement `__call__`.

    Attributes:
        description: What identifies the samples' source (recorded in sampling.json).
        local_model: The transformers model sampled from, when there is one (fit() can cut a default value model
            from it); None otherwise.
        vocab_size: The sampled model's vocabulary size where it is known (the value model's must equal it).
    """

    description: dict[str, Any]
    local_model = None
    vocab_size: int | None = None

    def __call__(self, prompts: Sequence[tuple[int, str]], store: SampleStore, progress: bool) -> list[Sample]:
        """New Samples of the (index, text) prompts, each batch appended to `store` once scored."""
        raise NotImplementedError


@contextlib.contextmanager
def eval_mode(*modules):
    """The modules in eval mode for the block, each back in its own train/eval mode afterwards."""
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)


class GenerateSampler(Sampler):
    def __init__(self, base_model, tokenizer, reward_fn: RewardFn, **options):
        self.local_model, self.tokenizer, self.reward_fn, self.options = base_model, tokenizer, reward_fn, options
        self.description = describe_base_model(base_model)
        self.vocab_size = base_model.get_output_embeddings().weight.shape[0]

    def __call__(self, prompts, store, progress):
        with eval_mode(self.local_model):
            return sample_and_score(self.local_model, self.tokenizer, prompts, self.reward_fn, store,
                                    progress=progress, **self.options)


class EndpointSampler(Sampler):
    def __init__(self, endpoint: CompletionsEndpoint, tokenizer, reward_fn: RewardFn, **options):
        options.pop("pad_token_id", None)  # the server pads for itself
        self.endpoint, self.tokenizer, self.reward_fn, self.options = endpoint, tokenizer, reward_fn, options
        self.description = describe_base_model(endpoint)

    def __call__(self, prompts, store, progress):
        return endpoint_sample_and_score(self.endpoint, self.tokenizer, prompts, self.reward_fn, store,
                                         progress=progress, **self.options)


class GivenSamples(Sampler):
    def __init__(self, records: list[dict], tokenizer):
        self.records, self.tokenizer = records, tokenizer
        self.description = describe_base_model(None, records)

    def __call__(self, prompts, store, progress):
        return given_samples(self.records, self.tokenizer, prompts, store, progress)


class VLLMSampler(Sampler):
    """Samples from an offline vLLM engine in the value model's token ids (the prompt tokenised with `tokenizer`,
    which must be the served model's). Each prompt's request is seeded from `seed` and its index, so a rerun
    draws the same samples; plain sampling at `temperature` (no top-k/top-p unless generation_kwargs asks)."""

    def __init__(self, llm, tokenizer, reward_fn: RewardFn, *, samples_per_prompt: int, max_new_tokens: int,
                 temperature: float, prompts_per_batch: int, pad_token_id: int | None = None,
                 generation_kwargs: dict | None = None, seed: int = 0):
        self.llm, self.tokenizer, self.reward_fn = llm, tokenizer, reward_fn
        self.samples_per_prompt, self.max_new_tokens, self.temperature = samples_per_prompt, max_new_tokens, temperature
        self.prompts_per_batch, self.seed = prompts_per_batch, seed
        self.generation_kwargs = dict(generation_kwargs or {})
        model_config = llm.llm_engine.model_config
        self.description = {"name": str(model_config.model), "engine": "vllm", "dtype": str(model_config.dtype),
                            "vocab_size": model_config.get_vocab_size()}
        self.vocab_size = model_config.get_vocab_size()

    def __call__(self, prompts, store, progress):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        eos = self.tokenizer.eos_token_id
        samples = []
        batches = [prompts[i : i + self.prompts_per_batch] for i in range(0, len(prompts), self.prompts_per_batch)]
        for batch_index, batch in enumerate(tqdm(batches, desc="sampling (vLLM)", unit="batch", disable=not progress)):
            prompt_ids = [self.tokenizer(text, add_special_tokens=True)["input_ids"] for _, text in batch]
            params = [SamplingParams(n=self.samples_per_prompt, temperature=self.temperature, top_k=0, top_p=1.0,
                                     max_tokens=self.max_new_tokens, seed=self.seed * 1_000_003 + index,
                                     **self.generation_kwargs)
                      for index, _ in batch]
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                        use_tqdm=False)
            completions = []
            for output in outputs:
                for completion in output.outputs:
                    ids = list(completion.token_ids)
                    if completion.finish_reason == "stop" and eos is not None and (not ids or ids[-1] != eos):
                        ids.append(eos)  # a stop string ended it: the value model learns V(s∘EOS) as elsewhere
                    completions.append(ids)
            prompt_texts = [text for _, text in batch for _ in range(self.samples_per_prompt)]
            completion_texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
            rewards = score_batch(self.reward_fn, prompt_texts, completion_texts, store, batch, batch_index)
            indices = [index for index, _ in batch for _ in range(self.samples_per_prompt)]
            repeated_ids = [ids for ids in prompt_ids for _ in range(self.samples_per_prompt)]
            new = [Sample(index, ids, completion, reward)
                   for index, ids, completion, reward in zip(indices, repeated_ids, completions, rewards)]
            store.append(new)
            samples.extend(new)
        return samples


def is_vllm_engine(model) -> bool:
    """Whether `model` is a `vllm.LLM` (checked without importing vLLM)."""
    return any(cls.__name__ == "LLM" and cls.__module__.startswith("vllm.") for cls in type(model).__mro__)


def make_sampler(base_model, tokenizer, reward_fn: RewardFn | None, records: list[dict] | None, *, seed: int,
                 **options) -> Sampler:
    """The sampler for what fit() was given: records (given samples), an endpoint, a vLLM engine or a local model."""
    if records is not None:
        return GivenSamples(records, tokenizer)
    if isinstance(base_model, CompletionsEndpoint):
        return EndpointSampler(base_model, tokenizer, reward_fn, **options)
    if is_vllm_engine(base_model):
        return VLLMSampler(base_model, tokenizer, reward_fn, seed=seed, **options)
    return GenerateSampler(base_model, tokenizer, reward_fn, **options)
