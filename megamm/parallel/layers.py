"""Tensor-parallel linear and embedding layers.

A column-parallel linear splits its output features across tp ranks (each rank computes whole
heads / whole channels); a row-parallel linear splits its input features and sums the partial
outputs. Chaining column -> (elementwise) -> row needs exactly one all-reduce in forward and one in
backward, Megatron's trick. With sequence parallelism the all-reduce becomes an all-gather before
the column layer and a reduce-scatter after the row layer, so everything outside the pair (norms,
dropout, residual adds) works on `[s/tp, b, h]`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from megamm.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megamm.parallel.params import ParamOwner, ParamSpec, TiedEmbedding
from megamm.parallel.sharding import InitFn, ParamLayout, constant_init
from megamm.parallel.state import ParallelState

if TYPE_CHECKING:
    from megamm.parallel.lora import LowRankAdapter


class ColumnParallelLinear(ParamOwner):
    """`y = x W^T + b` with W `[out, in]` split along `out` across tp.

    Input: `[s, b, in]` replicated, or `[s/tp, b, in]` when `sequence_parallel` (gathered here).
    Output: `[s, b, out/tp]`, or `[s, b, out]` with `gather_output=True`.

    `fused_parts` lists the global sizes of sub-projections concatenated along `out` (q, k, v or
    gate, up); each is split separately, see `megamm.parallel.sharding`. `padded_out_features`
    appends zero rows (vocabulary padding of an output layer). `skip_weight` builds no weight: the
    caller passes one to `forward` (an output layer tied to the embedding table).

    `adapter` (None unless megamm.models.lora adds one): a low-rank update applied to the gathered
    input before the bias (megamm.parallel.lora).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        state: ParallelState,
        init: InitFn,
        bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        fused_parts: tuple[int, ...] | None = None,
        padded_out_features: int | None = None,
        skip_weight: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        tp = state.tp_size
        if fused_parts is not None:
            if sum(fused_parts) != out_features:
                raise ValueError(f"fused parts {fused_parts} do not add up to {out_features}")
            if gather_output:
                raise ValueError("gather_output would interleave fused parts; gather them per part")
            if any(part % tp for part in fused_parts):
                raise ValueError(f"every fused part {fused_parts} must be divisible by tp={tp}")
        if (padded_out_features or out_features) % tp != 0:
            raise ValueError(f"output features {padded_out_features or out_features} not divisible by tp={tp}")
        if padded_out_features is not None and (fused_parts or bias):
            raise ValueError("output padding is supported for a plain, bias-free projection only")
        self.state = state
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        weight_layout = ParamLayout(
            (out_features, in_features),
            init,
            partition_dim=0,
            fused_parts=fused_parts,
            padded_size=padded_out_features,
        )
        self.weight = None if skip_weight else self.create_parameter("weight", ParamSpec(weight_layout), state, dtype)
        bias_layout = ParamLayout((out_features,), constant_init(0.0), partition_dim=0, fused_parts=fused_parts)
        self.bias = self.create_parameter("bias", ParamSpec(bias_layout), state, dtype) if bias else None
        self.adapter: LowRankAdapter | None = None

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """`weight` overrides the own weight (tied output layer reusing the embedding table)."""
        group = self.state.tp_group
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, group, grad_is_partial=True)
        else:
            x = copy_to_tensor_parallel_region(x, group)
        weight = self.weight if weight is None else weight
        if weight is None:
            raise ValueError("this layer was built with skip_weight; pass the weight to forward")
        if self.adapter is None:
            y = F.linear(x, weight, self.bias)
        else:
            y = self.adapter(x, weight, F.linear(x, weight))
            y = y if self.bias is None else y + self.bias
        return gather_from_tensor_parallel_region(y, group) if self.gather_output else y


class RowParallelLinear(ParamOwner):
    """`y = x W^T + b` with W `[out, in]` split along `in` across tp.

    Input: `[s, b, in/tp]` (already split, e.g. the output of a column-parallel layer).
    Output: `[s, b, out]` replicated, or `[s/tp, b, out]` when `sequence_parallel`.
    The bias is added once, after the reduction; under sequence parallelism it is applied to this
    rank's sequence chunk only, so its record says its grad is a partial sum over tp.
    `adapter` (None unless megamm.models.lora adds one): a low-rank update of the partial output,
    summed by the same reduction (megamm.parallel.lora).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        state: ParallelState,
        init: InitFn,
        bias: bool = True,
        sequence_parallel: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        tp = state.tp_size
        if in_features % tp != 0:
            raise ValueError(f"input features {in_features} not divisible by tp={tp}")
        self.state = state
        self.sequence_parallel = sequence_parallel
        self.weight = self.create_parameter(
            "weight", ParamSpec(ParamLayout((out_features, in_features), init, partition_dim=1)), state, dtype
        )
        bias_spec = ParamSpec(
            ParamLayout((out_features,), constant_init(0.0)), sequence_partial_grad=self.sequence_parallel
        )
        self.bias = self.create_parameter("bias", bias_spec, state, dtype) if bias else None
        self.adapter: LowRankAdapter | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.adapter is not None:
            partial = self.adapter(x, self.weight, partial)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(partial, self.state.tp_group)
        else:
            y = reduce_from_tensor_parallel_region(partial, self.state.tp_group)
        return y if self.bias is None else y + self.bias


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Round the vocabulary up to a multiple of `divisible_by * tp` (even shards, aligned GEMMs)."""
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


class VocabParallelEmbedding(ParamOwner):
    """Embedding table `[V_pad, h]` split along the vocabulary across tp.

    Input: token ids `[b, s]`. Output: `[b, s, h]`, replicated across tp (each rank looks up the
    ids in its own vocabulary range, zeros elsewhere, then the ranks sum).
    Rows past the real `vocab_size` are zero padding that no valid id reaches. `tied` is the
    table's role when the output layer multiplies by it too (tied word embeddings).
    """

    def __init__(
        self,
        vocab_size: int,
        padded_vocab_size: int,
        hidden_size: int,
        *,
        state: ParallelState,
        init: InitFn,
        dtype: torch.dtype = torch.float32,
        tied: TiedEmbedding | None = None,
    ) -> None:
        super().__init__()
        tp = state.tp_size
        if padded_vocab_size % tp != 0 or padded_vocab_size < vocab_size:
            raise ValueError(f"padded vocab {padded_vocab_size} must be >= {vocab_size} and divisible by tp={tp}")
        self.state = state
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.rows_per_rank = padded_vocab_size // tp
        self.vocab_start = state.tp_rank * self.rows_per_rank
        layout = ParamLayout((vocab_size, hidden_size), init, partition_dim=0, padded_size=padded_vocab_size)
        self.weight = self.create_parameter("weight", ParamSpec(layout, tied=tied), state, dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.state.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.rows_per_rank)
        embedded = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        embedded = embedded.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(embedded, self.state.tp_group)
