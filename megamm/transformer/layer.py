"""A pre-norm transformer layer and a stack of them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from megamm.config import TransformerConfig
from megamm.parallel.state import ParallelState
from megamm.transformer.attention import SelfAttention
from megamm.transformer.kv_cache import KVCache, LayerKVCache
from megamm.transformer.mlp import MLP
from megamm.transformer.norm import build_norm
from megamm.transformer.recompute import recompute

if TYPE_CHECKING:
    from megamm.transformer.segments import PackedRows, Segments


class TransformerLayer(nn.Module):
    """`x + attn(norm(x))`, then `x + mlp(norm(x))`, on `[s', b, h]` (s' = s/tp under SP)."""

    def __init__(self, config: TransformerConfig, state: ParallelState, sequence_parallel: bool) -> None:
        super().__init__()
        self.config = config
        self.state = state
        self.sequence_parallel = sequence_parallel
        self.input_norm = build_norm(config, state, sequence_parallel)
        self.self_attention = SelfAttention(config, state, sequence_parallel)
        self.pre_mlp_norm = build_norm(config, state, sequence_parallel)
        self.mlp = MLP(config, state, sequence_parallel)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.hidden_dropout
        if p == 0.0 or not self.training:
            return x
        # Under SP each tp rank holds a different sequence chunk: draw from the per-rank stream.
        # Otherwise the activation is replicated across tp and the masks must match.
        with self.state.rng.fork() if self.sequence_parallel else nullcontext():
            return F.dropout(x, p, training=True)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | Segments | PackedRows | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        x = x + self._dropout(self.self_attention(self.input_norm(x), rotary, attention_mask, kv_cache))
        return x + self._dropout(self.mlp(self.pre_mlp_norm(x)))


class TransformerBlock(nn.Module):
    """The layers of one tower held by this process, keyed by their global layer number.

    Keys are global numbers (`layers.17`) so parameter names, deterministic init and checkpoint
    keys are the same whichever pipeline stage holds the layer.
    """

    def __init__(
        self,
        config: TransformerConfig,
        state: ParallelState,
        sequence_parallel: bool,
        layer_numbers: Iterable[int],
        layer: Callable[[TransformerConfig, ParallelState, bool], nn.Module] = TransformerLayer,
    ) -> None:
        """layer: builds one layer from (config, state, sequence_parallel); a tower whose layer
        differs (InternViT's layer scale and QK norm) passes its own, and keeps recompute and the
        global layer numbering of this block."""
        super().__init__()
        self.config = config
        self.state = state
        self.layers = nn.ModuleDict({str(i): layer(config, state, sequence_parallel) for i in layer_numbers})

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | Segments | PackedRows | None = None,
        num_layers: int | None = None,
        kv_cache: KVCache | None = None,
        layer_masks: Mapping[int, torch.Tensor | Segments] | None = None,
    ) -> torch.Tensor:
        """Run the first `num_layers` held layers (all by default) in order; with `kv_cache`
        (generation) each layer appends to its own entry, keyed by its global number.

        layer_masks: a mask per global layer number, used instead of `attention_mask` (window
        attention, where most layers attend within windows and a few across the whole image)."""
        layers = list(self.layers.items())[:num_layers]
        full = self.config.recompute == "full"
        limit = self.config.recompute_num_layers
        for position, (number, layer) in enumerate(layers):
            if layer_masks is not None:
                attention_mask = layer_masks[int(number)]
            if kv_cache is not None:
                x = layer(x, rotary, attention_mask, kv_cache.layer(int(number)))
            elif full and (limit is None or position < limit) and torch.is_grad_enabled():
                x = recompute(layer, self.state.rng, x, rotary, attention_mask)
            else:
                x = layer(x, rotary, attention_mask)
        return x
