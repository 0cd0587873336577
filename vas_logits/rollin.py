"""Roll-in rounds for fit(): train the value model on the states that VAS itself visits (as Q-sharp does).

A value model trained on the base's own samples is accurate where the base goes; VAS, steering, goes elsewhere.
A round after the first (fit(rounds=n)):

    roll in    sample completions of the training prompts with VAS under the current value model
               (beta = rollin_beta, the top_k of the sibling rollouts, outside_top_k="keep")
    roll out   from a random state of each roll-in, sibling rollouts with the frozen base (siblings.py):
               max(1, siblings) top-k candidates, each continued by the base and scored, so the labels are
               still returns of the base's policy, Q^{pi_ref}(s, a), now at the states guidance reaches
    pool       the rollouts join the data of the earlier rounds; training continues for `epochs` more epochs

Only the rollouts are stored (`round-<r>-siblings-<n>-top<k>-beta<b>.jsonl` in output_dir): the roll-in of a prompt
is drawn again if its rollouts were not stored, from the same value model (the checkpoint of the round before).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .processor import VAS
from .samplers import Sampler, eval_mode
from .sampling import RewardFn, Sample, cut_completion, end_token_ids, pad_batch, sampling_kwargs
from .siblings import roll_out_siblings


class RollInSampler(Sampler):
    """A round's data: VAS roll-ins of the (index, text) prompts under `value_model`, then base sibling rollouts
    from them (`siblings` per roll-in, at least 1). Options are `roll_out_siblings`'s, plus `samples_per_prompt`."""

    def __init__(self, base_model, tokenizer, reward_fn: RewardFn, value_model, *, beta: float, siblings: int,
                 top_k: int, samples_per_prompt: int, max_new_tokens: int, temperature: float, pad_token_id: int,
                 prompts_per_batch: int, generate_batch_size: int, seed: int, generation_kwargs: dict | None = None):
        self.local_model, self.tokenizer, self.reward_fn = base_model, tokenizer, reward_fn
        self.value_model = value_model
        self.beta, self.samples_per_prompt, self.seed = beta, samples_per_prompt, seed
        self.options = dict(siblings=max(1, siblings), top_k=top_k, max_new_tokens=max_new_tokens,
                            temperature=temperature, pad_token_id=pad_token_id, prompts_per_batch=prompts_per_batch,
                            generate_batch_size=generate_batch_size, seed=seed, generation_kwargs=generation_kwargs)
        self.description = {"roll_in_beta": beta, "siblings": self.options["siblings"], "top_k": top_k}

    def __call__(self, prompts, store, progress):
        with eval_mode(self.local_model, self.value_model):
            roll_ins = self._roll_in(prompts, progress)
            return roll_out_siblings(self.local_model, self.tokenizer, roll_ins, dict(prompts), self.reward_fn, store,
                                     progress=progress, **self.options)

    @torch.no_grad()
    def _roll_in(self, prompts: Sequence[tuple[int, str]], progress: bool) -> list[Sample]:
        """`samples_per_prompt` VAS-guided completions of each prompt (unscored: only their states are used)."""
        base, options = self.local_model, self.options
        eos_token_ids = end_token_ids(base, self.tokenizer)
        sampling = sampling_kwargs(options["temperature"], options["pad_token_id"], eos_token_ids,
                                   options["generation_kwargs"])
        processor = VAS(self.value_model, beta=self.beta, top_k=options["top_k"], outside_top_k="keep",
                        pad_token_id=options["pad_token_id"])
        per_batch = max(1, options["generate_batch_size"] // self.samples_per_prompt)
        batches = [prompts[i : i + per_batch] for i in range(0, len(prompts), per_batch)]
        roll_ins = []
        for batch in tqdm(batches, desc=f"roll-in (VAS, beta {self.beta:g})", unit="batch", disable=not progress):
            prompt_ids = [self.tokenizer(text, add_special_tokens=True)["input_ids"] for _, text in batch]
            input_ids, attention_mask = (t.to(base.device) for t in pad_batch(prompt_ids, options["pad_token_id"]))
            output = base.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[processor],
                                   num_return_sequences=self.samples_per_prompt,
                                   max_new_tokens=options["max_new_tokens"], **sampling)
            for row, generated in enumerate(output[:, input_ids.shape[1] :].cpu()):
                index = batch[row // self.samples_per_prompt][0]
                roll_ins.append(Sample(index, prompt_ids[row // self.samples_per_prompt],
                                       cut_completion(generated, eos_token_ids), 0.0))
        return roll_ins
