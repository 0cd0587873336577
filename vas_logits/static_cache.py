"""A transformers Cache of fixed-address buffers for the processor's compiled path.

The processor's columns grow by one per step and the k candidates are written just after them, then
dropped. With transformers' `StaticLayer`s that is a write pointer (`cumulative_length`) moving over
preallocated (batch, heads, capacity, head_dim) buffers: the candidates land in scratch slots that the next
step overwrites, a crop only moves the pointer back, and a beam reorder copies rows in place. The buffers
never move, so a compiled value-model step (and a CUDA graph of it) stays valid from step to step. Slots at
or past the pointer hold stale entries; the processor's 4-D mask hides them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer

CAPACITY_STEP = 256  # capacity grows in multiples of this: each growth means one recompilation


def round_up_capacity(columns: int) -> int:
    return -(-columns // CAPACITY_STEP) * CAPACITY_STEP


class StaticColumnCache(Cache):
    """`num_layers` StaticLayers of `capacity` slots, with in-place crop / reorder and growth.

    Args:
        num_layers: The value model's decoder layers (every one a full-attention layer: sliding windows are
            applied by the processor's mask, not by evicting slots).
        capacity: Slots per layer; `ensure_capacity` grows it when a step would run past the end.
    """

    def __init__(self, num_layers: int, capacity: int = CAPACITY_STEP):
        super().__init__(layers=[StaticLayer(max_cache_len=capacity) for _ in range(num_layers)])

    @property
    def capacity(self) -> int:
        return self.layers[0].max_cache_len

    @property
    def length(self) -> int:
        """Slots in use (the write pointer)."""
        layer = self.layers[0]
        return int(layer.cumulative_length) if layer.is_initialized else 0

    def can_hold(self, batch_size: int, device: torch.device) -> bool:
        """Whether these buffers (if allocated yet) have this batch size and device, so a new call can reuse them."""
        layer = self.layers[0]
        return not layer.is_initialized or (layer.keys.shape[0] == batch_size and layer.keys.device == device)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` slots (as DynamicCache.crop takes it: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"`tokens_to_remove` must be <= 0 (a count from the end), got {tokens_to_remove}")
        for layer in self.layers:
            if layer.is_initialized:
                layer.cumulative_length.sub_(-tokens_to_remove)

    def rewind(self) -> None:
        """Every layer's write pointer back to 0 (after a failed step the layers may disagree); buffers stay."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.cumulative_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows become rows `beam_idx` of before, copied in place so the buffers keep their addresses."""
        for layer in self.layers:
            if layer.is_initialized:
                index = beam_idx.to(layer.keys.device)
                layer.keys.copy_(layer.keys.index_select(0, index))
                layer.values.copy_(layer.values.index_select(0, index))

    def ensure_capacity(self, columns: int) -> None:
        """Make room for `columns` slots, copying the used ones into larger buffers if needed."""
        if columns <= self.capacity:
            return
        capacity, length = round_up_capacity(columns), self.length
        old_layers = self.layers
        self.layers = [StaticLayer(max_cache_len=capacity) for _ in old_layers]
        for old, new in zip(old_layers, self.layers):
            if old.is_initialized:
                new.lazy_initialization(old.keys, old.values)  # same batch, heads, head_dim, dtype, device
                new.keys[:, :, :length] = old.keys[:, :, :length]
                new.values[:, :, :length] = old.values[:, :, :length]
                new.cumulative_length.fill_(length)
