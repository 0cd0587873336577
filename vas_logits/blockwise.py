"""Blockwise value-guided sampling: the value model chooses among whole blocks the base model sampled.

Token-level VAS re-weights every next token; this uses the same value model as Controlled Decoding's
blockwise variant does (Mudgal et al., ICML 2024). At every block boundary, for each row:

    M candidates    c_1 .. c_M ~ pi_ref(· | s), each B tokens (fewer when it ends with EOS or at max_new_tokens)
    choose          c_i with probability softmax_i(beta · V(s∘c_i))       (beta = inf: the argmax, best-of-M)
    continue        from s∘c_i

V is read after each candidate's last token, EOS included (fit() trains V(s∘EOS) toward the reward), in the
value model's standardised units, so beta is per reward standard deviation. The base model and the value
model each keep a KV cache of the chosen prefix: a block repeats it M times (`batch_repeat_interleave`),
forwards only the new tokens, and keeps the chosen candidate's rows (`batch_select_indices`).

KL from the base: each block's choice is a best-of-M (or softer) selection, so by the chain rule
KL <= sum over the row's blocks of (log M - (M - 1) / M) for beta = inf (exact when candidates never tie), and
<= blocks · log M for any beta (`kl_upper_bound`).

Through generate(): `model.generate(**inputs, custom_generate=BlockwiseSampler(value_model, ...),
max_new_tokens=..., do_sample=True)`; the user's logits processors, warpers (temperature, top-k/p) and
stopping criteria apply to the base's candidate tokens as in plain sampling.
"""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from .compat import backbone_forward
from .value_model import ValueModel


class BlockwiseSampler:
    """Blockwise value-guided sampling as a `custom_generate` callable for `model.generate()`.

    Args:
        value_model: A ValueModel (scalar or distributional head; eval mode) sharing the base's tokenizer.
        block_size: Tokens per block, B >= 1.
        num_candidates: Blocks sampled per row at each boundary, M >= 1 (M = 1 is plain sampling).
        beta: Selection strength, > 0 or math.inf (the best candidate).

    Example:
        >>> sampler = BlockwiseSampler(value_model, block_size=8, num_candidates=4)
        >>> model.generate(**inputs, custom_generate=sampler, do_sample=True, max_new_tokens=32)
    """

    def __init__(self, value_model: ValueModel, block_size: int = 8, num_candidates: int = 4,
                 beta: float = math.inf):
        if not isinstance(value_model, ValueModel):
            raise ValueError(f"`value_model` must be a ValueModel, got {type(value_model).__name__}")
        if value_model.token_head:
            raise ValueError("`value_model` has a token head; blockwise sampling reads V(s∘block) from a scalar or "
                             "distributional head")
        self.value_model = value_model
        self.block_size = _positive_int("block_size", block_size)
        self.num_candidates = _positive_int("num_candidates", num_candidates)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or math.isnan(beta):
            raise ValueError(f"`beta` must be a number > 0 (math.inf: take the best candidate), got {beta!r}")
        self.beta = float(beta)

    def kl_upper_bound(self, num_blocks: int | torch.Tensor):
        """Nats: the bound on KL(this sampler || base) of a completion that used `num_blocks` blocks."""
        m = self.num_candidates
        per_block = math.log(m) - (m - 1) / m if math.isinf(self.beta) else math.log(m)
        return num_blocks * per_block

    @torch.no_grad()
    def __call__(self, model, input_ids: torch.LongTensor, logits_processor, stopping_criteria, generation_config,
                 **model_kwargs) -> torch.LongTensor:
        """The `custom_generate` entry point: (R, P) prompt ids -> (R, P + generated) ids, padded after EOS."""
        if not generation_config.do_sample:
            raise ValueError("Blockwise sampling draws its candidates from the base: pass do_sample=True")
        vocab_size = self.value_model.backbone_config.vocab_size
        if model.get_output_embeddings().weight.shape[0] != vocab_size:
            raise ValueError(
                f"The base model has a vocabulary of {model.get_output_embeddings().weight.shape[0]} tokens but the "
                f"value model's is {vocab_size}: a value model must share the base model's tokenizer")
        if self.value_model.device != input_ids.device:
            raise ValueError(f"The value model is on {self.value_model.device} but the inputs are on {input_ids.device}: "
                             f"move it with `value_model.to({str(input_ids.device)!r})`")
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pad_token_id = generation_config._pad_token_tensor
        if pad_token_id is None:
            raise ValueError("Blockwise sampling pads finished rows: set pad_token_id (or eos_token_id)")
        max_new_tokens = generation_config.max_length - input_ids.shape[1]
        self.value_model.check_length(generation_config.max_length, "A completed sequence")
        return self._decode(model, input_ids, attention_mask, max_new_tokens, logits_processor, stopping_criteria,
                            pad_token_id)

    def _decode(self, model, input_ids, attention_mask, max_new_tokens, logits_processor, stopping_criteria,
                pad_token_id) -> torch.LongTensor:
        """Block by block until every row has stopped or max_new_tokens are generated; (R, P + T) ids."""
        rows, m = input_ids.shape[0], self.num_candidates
        # Prefill both caches with the prompt, keeping the base's next-token logits.
        logits, base_cache = _forward(model, input_ids, attention_mask, None)
        base_next = logits[:, -1].float()  # (R, V)
        _, value_cache = _forward(self.value_model, input_ids, attention_mask, None)
        finished = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        generated = 0
        while generated < max_new_tokens and not bool(finished.all()):
            length = min(self.block_size, max_new_tokens - generated)
            # (R·M, ...): every row's prefix M times
            ids, mask = input_ids.repeat_interleave(m, 0), attention_mask.repeat_interleave(m, 0)
            base_cache.batch_repeat_interleave(m)
            value_cache.batch_repeat_interleave(m)
            next_logits, done = base_next.repeat_interleave(m, 0), finished.repeat_interleave(m)
            block_start = ids.shape[1]
            for step in range(length):
                scores = logits_processor(ids, next_logits)
                tokens = torch.multinomial(scores.softmax(-1), 1).squeeze(1)  # (R·M,)
                tokens = torch.where(done, pad_token_id, tokens)
                ids = torch.cat([ids, tokens[:, None]], dim=1)
                mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
                done = done | stopping_criteria(ids, scores)
                if step == length - 1 or bool(done.all()):
                    break  # the chosen candidate's last token is forwarded after the choice: once, not M times
                logits, base_cache = _forward(model, tokens[:, None], mask, base_cache)
                next_logits = logits[:, -1].float()
            # V after each candidate's last real token: one forward of the block's tokens
            block_ids, block_mask = ids[:, block_start:], mask[:, block_start:]
            block_values, value_cache = _forward(self.value_model, block_ids, mask, value_cache)  # (R·M, B)
            real = block_mask.sum(1)  # (R·M,) tokens each candidate added (0 for rows already finished)
            last = (real - 1).clamp(min=0)
            values = block_values.gather(1, last[:, None]).squeeze(1).view(rows, m)  # (R, M)
            chosen = self._choose(values, finished)  # (R,) candidate index
            keep = torch.arange(rows, device=ids.device) * m + chosen  # rows of the R·M batch to keep
            input_ids, attention_mask, finished = ids[keep], mask[keep], done[keep]
            base_cache.batch_select_indices(keep)
            value_cache.batch_select_indices(keep)
            generated += ids.shape[1] - block_start
            if generated < max_new_tokens and not bool(finished.all()):
                # the chosen candidates' last tokens are not in the base cache yet: forward them
                logits, base_cache = _forward(model, input_ids[:, -1:], attention_mask, base_cache)
                base_next = logits[:, -1].float()
        return input_ids

    def _choose(self, values: torch.Tensor, finished: torch.Tensor) -> torch.LongTensor:
        """(R, M) values -> (R,) the chosen candidate of each row (0 for finished rows, whose blocks are padding)."""
        if math.isinf(self.beta):
            chosen = values.argmax(-1)
        else:
            chosen = torch.multinomial((self.beta * values).softmax(-1), 1).squeeze(1)
        return torch.where(finished, 0, chosen)


def _forward(model, new_ids: torch.LongTensor, mask: torch.LongTensor, cache):
    """One incremental forward of a causal LM or ValueModel: (logits or values, updated cache)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new_ids.shape[1]:]
    if isinstance(model, ValueModel):
        output = model(input_ids=new_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        return output.values, output.cache
    if cache is None:
        cache = DynamicCache(config=model.config)
    output, cache = backbone_forward(model, cache, input_ids=new_ids, attention_mask=mask, position_ids=positions,
                                     use_cache=True, logits_to_keep=1)
    return output.logits, cache


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value
