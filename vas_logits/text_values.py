"""TextValuer: a value model's Q for candidate *texts*, when the base model is known only by the text it emits.

An API returns the next token's top-k alternatives as text pieces, tokenised by the served model's tokenizer,
which need not be the value model's. So each candidate is valued as a text:

    Q(prefix, piece) = V(tokenize(prefix + piece))      the value model's value after the last token

with the value model's own tokenizer, re-tokenising the whole text (a piece may merge with the end of the
prefix, or split into several tokens). To stay cheap, the valuer keeps a KV cache over the token prefix that
every candidate shares and feeds, in ONE forward, the shared tokens not cached yet followed by each
candidate's own tokens as a block; a 4-D attention mask lets each block see the shared prefix and itself
(siblings at the same positions, as the processor's candidates are). The blocks are then cropped from the
cache, which thus follows the decoded text one step behind.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from .processor import attention_layout
from .value_model import ValueModel, ValueModelOutput


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


class TextValuer:
    """Values candidate continuations of one growing text with one value model and its tokenizer.

    One valuer follows one decoding stream (one prompt); it is not thread-safe, but valuers of different
    streams may run in different threads.

    Args:
        value_model: The ValueModel (eval mode).
        tokenizer: The value model's tokenizer (the one its fit() samples were tokenised with).
        add_special_tokens: Passed to the tokenizer, as fit() does when tokenising prompts.

    Example:
        >>> valuer = TextValuer(value_model, tokenizer)
        >>> output = valuer.values("The movie was", [" great", " bad", ""])  # values (1, 3)
    """

    def __init__(self, value_model: ValueModel, tokenizer, *, add_special_tokens: bool = True):
        if value_model.token_head:
            raise ValueError(
                "`value_model` has a token head (Q of the value model's own next tokens), but the API mode values "
                "text pieces that its tokenizer may split or merge: use a scalar or distributional head here"
            )
        self.value_model = value_model
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        self.layer_types, self.window = attention_layout(value_model)
        self.cache: DynamicCache | None = None
        self.cached_ids: list[int] = []  # the token ids whose keys and values `cache` holds

    def reset(self) -> None:
        self.cache, self.cached_ids = None, []

    @torch.no_grad()
    def values(self, prefix: str, candidates: Sequence[str]) -> ValueModelOutput:
        """V(prefix + candidate) for each candidate text.

        Returns:
            ValueModelOutput with `values` (1, k) float32 and, for a distributional head, `logits` (1, k, atoms),
            ready for `value_model.beta_times_q(output, beta, k)`.

        Raises:
            ValueError: A prefix + candidate that tokenises to no token at all, or to more tokens than the value
                model has positions for.
        """
        texts = [prefix + candidate for candidate in candidates]
        candidate_ids = self.tokenizer(texts, add_special_tokens=self.add_special_tokens)["input_ids"] if texts else []
        if not candidate_ids or min(len(ids) for ids in candidate_ids) == 0:
            raise ValueError(f"Cannot value an empty text: prefix {prefix[-40:]!r}, candidates {list(candidates)!r:.200}")
        self.value_model.check_length(max(len(ids) for ids in candidate_ids),
                                      f"The text to value ({prefix[-40:]!r} + a candidate)")
        # Tokens every candidate shares, leaving each at least its last token: its value is read there.
        shared = min(len(ids) for ids in candidate_ids) - 1
        for ids in candidate_ids[1:]:
            shared = min(shared, common_prefix_length(candidate_ids[0], ids))
        shared_ids = candidate_ids[0][:shared]

        keep = common_prefix_length(self.cached_ids, shared_ids)
        if self.cache is None or keep == 0:
            self.cache, keep = DynamicCache(), 0
        elif keep < len(self.cached_ids):
            self.cache.crop(keep - len(self.cached_ids))  # the text moved back or re-tokenised differently
        blocks = [ids[shared:] for ids in candidate_ids]  # k lists, each >= 1 token
        step_ids = shared_ids[keep:] + [token for block in blocks for token in block]
        device = self.value_model.device
        mask, positions = self._step_mask(keep, shared, [len(block) for block in blocks], device)
        try:
            output = self.value_model(
                input_ids=torch.tensor([step_ids], device=device),
                attention_mask=mask,
                position_ids=positions,
                cache=self.cache,
                use_cache=True,
            )
        except BaseException:  # layers written half-way (an error, Ctrl-C): start the next call from scratch
            self.reset()
            raise
        self.cache.crop(-sum(len(block) for block in blocks))  # drop the candidate blocks, keep the shared tokens
        self.cached_ids = shared_ids

        lengths = torch.tensor([len(block) for block in blocks], device=device)
        last = (shared - keep) + lengths.cumsum(0) - 1  # each block's last token in step_ids
        logits = output.logits[:, last] if output.logits is not None else None
        return ValueModelOutput(values=output.values[:, last], logits=logits)

    def _step_mask(self, keep: int, shared: int, block_lengths: list[int], device):
        """Additive (1, 1, n, keep + n) mask (or one per layer type) and (1, n) position ids for a step of the
        shared tokens keep..shared-1 followed by the candidate blocks."""
        num_new = shared - keep
        block_of = torch.cat([torch.full((num_new,), -1)] +
                             [torch.full((length,), index) for index, length in enumerate(block_lengths)])
        offsets = torch.cat([torch.arange(num_new)] + [torch.arange(length) for length in block_lengths])
        query_positions = torch.where(block_of < 0, keep + offsets, shared + offsets)  # (n,)
        key_positions = torch.cat([torch.arange(keep), query_positions])  # (keep + n,)
        key_block = torch.cat([torch.full((keep,), -1), block_of])
        # A key is visible if it precedes the query and is shared, or precedes it in the query's own block.
        earlier = key_positions[None, :] <= query_positions[:, None]
        related = (key_block[None, :] < 0) | (key_block[None, :] == block_of[:, None])
        by_type = {}
        for layer_type in set(self.layer_types):
            allowed = earlier & related
            if layer_type == "sliding_attention":  # keys within the window: q_pos - k_pos < window
                allowed = allowed & (query_positions[:, None] - key_positions[None, :] < self.window)
            dtype = self.value_model.dtype
            additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
            by_type[layer_type] = additive[None, None].to(device)
        mask = next(iter(by_type.values())) if len(by_type) == 1 else by_type
        return mask, query_positions[None].to(device)
