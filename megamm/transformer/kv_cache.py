"""Keys and values of the tokens seen so far, so a generation step only runs the new tokens.

One `KVCache` belongs to one batch being generated and holds every language layer of this process;
`KVCache.layer(number)` is the per-layer view that `SelfAttention` writes into. Entries are the
keys after rotary embedding (positions are baked in, as Hugging Face caches them) and the values,
each `[b, groups/tp, max_length, head_dim]`: a tensor-parallel rank caches only its own key/value
groups, so the cache needs no communication and splits over tp like the attention does.

The buffers are allocated once, at the first write, for `max_length` positions (prompt plus new
tokens): appending into a preallocated buffer avoids a `torch.cat` per layer and step, whose copies
grow with the sequence. `LanguageModel.forward` advances the shared length after all its layers
wrote the step's positions, so every layer of a step writes at the same offset.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    """One layer's keys and values; writes go to the owner's current offset."""

    def __init__(self, owner: KVCache) -> None:
        self.owner = owner
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def offset(self) -> int:
        """Positions already cached before the step being run (the new tokens' first position)."""
        return self.owner.length

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's keys/values `[b, groups, s, d]` and return all cached ones `[b, groups, offset + s, d]`."""
        batch, groups, steps, dim = keys.shape
        end = self.offset + steps
        if batch != self.owner.batch_size:
            raise ValueError(f"the KV cache was made for a batch of {self.owner.batch_size}, got {batch}")
        if end > self.owner.max_length:
            raise ValueError(
                f"the KV cache holds {self.owner.max_length} positions; writing {steps} at offset "
                f"{self.offset} would overflow it"
            )
        if self.keys is None or self.values is None:
            shape = (batch, groups, self.owner.max_length, dim)
            self.keys = keys.new_empty(shape)
            self.values = values.new_empty(shape)
        self.keys[:, :, self.offset : end] = keys
        self.values[:, :, self.offset : end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """The caches of every layer this process holds, for a batch of `batch_size` sequences."""

    def __init__(self, batch_size: int, max_length: int) -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"need a positive batch size and length, got {batch_size} and {max_length}")
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0
        self._layers: dict[int, LayerKVCache] = {}

    def layer(self, number: int) -> LayerKVCache:
        """The cache of global language layer `number` (created empty on first use)."""
        if number not in self._layers:
            self._layers[number] = LayerKVCache(self)
        return self._layers[number]

    def advance(self, steps: int) -> None:
        """Count `steps` more positions as cached (called once per forward, after every layer wrote)."""
        if self.length + steps > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} positions, not {self.length + steps}")
        self.length += steps
