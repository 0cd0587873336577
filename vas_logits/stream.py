"""One decoding stream of the VAS processor: what each value model's cache holds, row by row.

A LogitsProcessor sees only `input_ids` (batch, seq) and the scores, never generate()'s attention mask or
cache. A stream therefore keeps a copy of the ids its caches were built from and works out, at each call,
how the new `input_ids` relate to them:

    the usual step         every row is last step's row plus one token: feed that token
    beam search            rows were reordered: find each row's parent among last step's rows, reorder caches
    rollback / new call    keep the longest column prefix all rows share (assisted decoding moves backwards;
                           a new generate() call may share nothing), crop the rest

Columns are "real" or left padding. Padding comes from the prompt's attention mask when the user gave one
(exact), else from `pad_token_id`: leading pad ids are padding, as generate() builds its own mask. Position
ids count real tokens from each row's first one (`attention_mask.cumsum(-1) - 1`, as generate() does).

The processor keeps one stream per thread, so concurrent generate() calls never share caches.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .static_cache import StaticColumnCache, round_up_capacity


def within_window(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
    """(B, Q, K) bool: the keys a sliding-window layer lets each query see, q_pos − k_pos < window (itself, at
    distance 0, included), from position ids (B, Q) and (B, K). Causality is the caller's `allowed`."""
    return query_positions[:, :, None] - key_positions[:, None, :] < window


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, Q, K) the additive float mask transformers takes for a 4-D attention_mask: 0 where `allowed`
    (B, Q, K) is True, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]


class DecodingStream:
    """Bookkeeping and caches of one sequence of generate() steps (one thread's).

    Attributes:
        caches: One transformers Cache per value model; its columns mirror the columns of `seen_ids`.
        seen_ids: (B, C) a copy of the ids the caches hold (None: nothing cached).
        key_is_real: (B, C) bool, False for left padding.
        positions: (B, C) position ids.
        next_position: (B, 1) the position of this step's candidates.
        consistent: False from the moment a step starts changing the caches until it has finished; a step that
            failed half-way (an exception, Ctrl-C, CUDA OOM) leaves it False and the next call starts over.
    """

    def __init__(self, value_models, cache_implementation: str, pad_token_id: int | None, bos_token_id: int | None):
        self.value_models = value_models
        self.cache_implementation = cache_implementation
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.caches: list = []
        self.prompt_mask: torch.BoolTensor | None = None  # (P, W) the prompts' attention mask, when given
        self.prompt_ids: torch.LongTensor | None = None  # (B, W) the prompt columns the mask was matched to
        self.generation = self.weights_version = None  # the processor's reset count and weights when built
        self.forget()

    def forget(self) -> None:
        """Drop the bookkeeping; the next `sync` starts from the full `input_ids` (static buffers are reused)."""
        self.seen_ids = self.key_is_real = self.positions = self.next_position = None
        self.consistent = True

    @property
    def cached_length(self) -> int:
        return 0 if self.seen_ids is None else self.seen_ids.shape[1]

    # ------------------------------------------------------------------ syncing with input_ids

    def sync(self, input_ids: torch.LongTensor, room: int, recompute_last: bool = False) -> int:
        """Bring the caches in line with `input_ids`; returns the first column they do not hold yet.

        Args:
            input_ids: (B, T) this step's ids.
            room: Slots needed past the ids (the candidates), for static buffers.
            recompute_last: Leave at least the last column uncached (a token head reads its hidden state,
                which is not kept between calls, so ids already cached in full are re-fed from the last one).
        """
        batch_size, length = input_ids.shape
        cached = self.cached_length
        seen = self.seen_ids
        if seen is None or seen.shape[0] != batch_size:
            keep = self._start(input_ids)
        elif length > cached and torch.equal(input_ids[:, :cached], seen):  # the usual step: one more token
            keep = cached
        else:
            keep = self._reorder_or_crop(input_ids)
        if recompute_last and keep == length:  # the same ids twice (assisted decoding): re-feed the last one
            for cache in self.caches:
                cache.crop(-1)
            keep -= 1
            self.key_is_real, self.positions = self.key_is_real[:, :keep], self.positions[:, :keep]
        self._append_columns(input_ids, keep)
        if self.cache_implementation == "static":
            for cache in self.caches:
                cache.ensure_capacity(length + room)
        return keep

    def _reorder_or_crop(self, input_ids: torch.LongTensor) -> int:
        """Columns to keep when rows were reordered (beam search) or the ids moved backwards or changed."""
        length, cached, seen = input_ids.shape[1], self.cached_length, self.seen_ids
        if length > cached:
            # Beam search reorders rows: find each row's parent among last step's rows. Equal prefixes have
            # equal caches, so any matching row will do.
            matches = (input_ids[:, None, :cached] == seen[None, :, :]).all(dim=-1)  # (B, B)
            if bool(matches.any(dim=-1).all()):
                parents = matches.int().argmax(dim=-1)  # (B,)
                for cache in self.caches:
                    cache.reorder_cache(parents)
                self.key_is_real, self.positions = self.key_is_real[parents], self.positions[parents]
                return cached
        # Keep the longest prefix all rows share with what is cached (a rollback in assisted decoding, or a
        # new generate() call whose prompts start alike); nothing shared means a fresh start.
        shared = min(length, cached)
        same_column = (input_ids[:, :shared] == seen[:, :shared]).all(dim=0)  # (shared,)
        keep = shared if bool(same_column.all()) else int(same_column.int().argmin())
        if keep == 0:
            return self._start(input_ids)
        if keep < cached:
            for cache in self.caches:
                cache.crop(keep - cached)
            self.key_is_real, self.positions = self.key_is_real[:, :keep], self.positions[:, :keep]
        return keep

    def _start(self, input_ids: torch.LongTensor) -> int:
        """Empty caches and bookkeeping for `input_ids`; static buffers of the right batch size are reused."""
        batch_size = input_ids.shape[0]
        if input_ids.shape[1] == 0:
            raise ValueError(
                "The value models need the prompt's token ids, but generate() passed none to the logits processors "
                "(inputs_embeds without input_ids?): call generate(input_ids=..., inputs_embeds=...) with both"
            )
        if self.cache_implementation == "dynamic":
            self.caches = [DynamicCache() for _ in self.value_models]
        elif self.caches and all(cache.can_hold(batch_size, model.device)
                                 for cache, model in zip(self.caches, self.value_models)):
            for cache in self.caches:
                cache.rewind()  # every layer's pointer back to 0; the buffers keep their addresses
        else:
            capacity = round_up_capacity(input_ids.shape[1])  # grown by sync() if the candidates need more
            self.caches = [StaticColumnCache(model.backbone_config.num_hidden_layers, capacity)
                           for model in self.value_models]
        self.key_is_real = input_ids.new_zeros((batch_size, 0), dtype=torch.bool)
        self.positions = input_ids.new_zeros((batch_size, 0))
        self._match_prompt_mask(input_ids)
        return 0

    def _match_prompt_mask(self, input_ids: torch.LongTensor) -> None:
        """Use the prompt mask for these ids if it belongs to them, else fall back to `pad_token_id`."""
        if self.prompt_mask is not None:
            rows, width = self.prompt_mask.shape
            batch_size = input_ids.shape[0]
            if self.prompt_ids is None:  # the first start after set_attention_mask(): the mask's own call
                if batch_size % rows or input_ids.shape[1] < width:
                    raise ValueError(
                        f"The attention mask given to the processor has shape {(rows, width)}, which does not fit "
                        f"input_ids of shape {tuple(input_ids.shape)}: give the mask of the prompts passed to "
                        "generate()"
                    )
                self.prompt_ids = input_ids[:, :width].clone()
            elif self.prompt_ids.shape[0] != batch_size or not torch.equal(input_ids[:, :width], self.prompt_ids):
                self.prompt_mask = self.prompt_ids = None  # a new generate() call: the mask was for other prompts
        if self.prompt_mask is not None:
            return
        if self.pad_token_id is None:
            if input_ids.shape[0] > 1:
                raise ValueError(
                    "The processor cannot tell left padding from tokens: no pad_token_id was given and the value "
                    "model's config has none. Pass VAS(..., pad_token_id=tokenizer.pad_token_id) or the prompts' "
                    "mask with processor.set_attention_mask(inputs['attention_mask'])"
                )
        elif self.pad_token_id == self.bos_token_id and bool((input_ids[:, 0] == self.pad_token_id).any()):
            raise ValueError(
                f"pad_token_id {self.pad_token_id} is also the value model's BOS token id, so left padding cannot be "
                "told from a real first token: pass the prompts' mask with "
                "processor.set_attention_mask(inputs['attention_mask'])"
            )

    def _append_columns(self, input_ids: torch.LongTensor, keep: int) -> None:
        """Record the bookkeeping of the columns after the first `keep` (which are cached already)."""
        new_ids = input_ids[:, keep:]  # (B, n)
        if self.prompt_mask is not None:
            # Columns past the prompt are generated tokens, all real: only a start expands the prompts' mask.
            new_is_real = torch.ones_like(new_ids, dtype=torch.bool)
            rows, width = self.prompt_mask.shape
            if keep < width:
                prompt = self.prompt_mask[:, keep:].to(input_ids.device)
                new_is_real[:, : prompt.shape[1]] = prompt.repeat_interleave(input_ids.shape[0] // rows, dim=0)
        elif self.pad_token_id is None:
            new_is_real = torch.ones_like(new_ids, dtype=torch.bool)
        else:
            # Only leading pads are padding: once a row has a real token, every later token counts, as in
            # generate()'s attention mask (finished rows keep receiving pad ids).
            started = self.key_is_real.any(dim=-1, keepdim=True)  # (B, 1)
            new_is_real = started | (new_ids != self.pad_token_id).cumsum(dim=-1).bool()
        real_before = self.key_is_real.sum(dim=-1, keepdim=True)  # (B, 1)
        real_so_far = real_before + new_is_real.cumsum(dim=-1)  # (B, n)
        self.next_position = real_so_far[:, -1:] if new_ids.shape[1] else real_before  # (B, 1): the candidates'
        self.key_is_real = torch.cat([self.key_is_real, new_is_real], dim=-1)
        self.positions = torch.cat([self.positions, (real_so_far - 1).clamp(min=0)], dim=-1)
        self.seen_ids = input_ids.clone()  # a copy: the caller may reuse its tensor

    # ------------------------------------------------------------------ masks

    def step_masks(self, new_start: int, top_k: int, layouts, key_width: int | None = None):
        """Attention masks and position ids for one forward of [new tokens + k candidates] per row.

        Args:
            new_start: The first column not cached yet.
            layouts: Per value model, (layer types, sliding window) from `attention_layout`.
            key_width: Key columns of the mask (static caches: their capacity; the slots past the prefix and
                the candidates are masked). Default: C + k.

        Returns:
            One mask per value model ((B, 1, n + k, key_width) additive float in its dtype, or a dict of them
            per layer type when its layers differ), and position ids (B, n + k).
        """
        key_is_real, key_positions = self.key_is_real, self.positions  # (B, C), C = all columns incl. new
        batch_size, total = key_is_real.shape
        device = key_is_real.device
        num_new = total - new_start
        query_positions = torch.cat([key_positions[:, new_start:], self.next_position.expand(-1, top_k)], dim=-1)

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

        masks, built = [], {}  # value models of one dtype and attention layout share their mask
        for value_model, (layer_types, window) in zip(self.value_models, layouts):
            key = (value_model.dtype, frozenset(layer_types), window)
            if key not in built:
                by_type = {}
                for layer_type in key[1]:
                    allowed = prefix_allowed
                    if layer_type == "sliding_attention":
                        allowed = allowed & within_window(query_positions, key_positions, window)
                        allowed[:, new_rows, new_start + new_rows] = True  # a pad's own column, at any position
                    # (B, 1, n + k, C + k)
                    by_type[layer_type] = additive_mask(torch.cat([allowed, candidate_allowed], dim=-1),
                                                        value_model.dtype)
                built[key] = next(iter(by_type.values())) if len(by_type) == 1 else by_type
            masks.append(built[key])
        return masks, query_positions
