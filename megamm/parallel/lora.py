"""Low-rank adapters (LoRA, and DoRA) on the tensor-parallel linears, sharded like their base weight.

An adapter adds `s * B A` (s = alpha / r) to the weight `W [out, in]` of a `ColumnParallelLinear`
or `RowParallelLinear`; the layer calls it (its `adapter` attribute) between its matmul and its
collective, so the adapter adds no collective to the layer's forward or backward:

- column-parallel (W split by output rows): A `[r, in]` replicated, B `[out/tp, r]` split by output
  rows like W. Each rank computes its own output features `B_r (A x)` from the input the layer
  already gathered (sequence parallelism) or copied.
- row-parallel (W split by input columns): A `[r, in/tp]` split by input like W, B `[out, r]`
  replicated. `B (A_r x_r)` is rank r's partial output; the layer's all-reduce (reduce-scatter
  under sequence parallelism) sums the partials with the base's: `sum_r B A_r x_r = B A x`, exact,
  because the update is linear in the partial.

The other choice for each (A split for column, B split for row) needs an all-gather of `A x` or an
all-reduce of the rank-r partial inside the layer. The price of replicating the small factor is
that its local gradient is a partial sum over tp (column: each rank back-propagates only through
its rows of B; row: each rank's B saw only its partial `A_r x_r`); the record says so
(`ParamSpec.tp_partial_grad`) and the training step sums those grads over tp in the one flat
all-reduce it already does for sequence-parallel norm grads, once per step, not per layer.

Fused projections (QKV `[q; k; v]`, SwiGLU `[gate; up]`, megamm.parallel.sharding) get one adapter
per targeted part, as PEFT has for the separate q_proj / k_proj / v_proj: A stacks the parts' A
matrices `[T*r, in]`, B stacks their B matrices with `fused_parts`, each split over tp like the
base's part, so rank r's B rows line up with its `[q_r; k_r; v_r]` output. Untargeted parts get no
update. A fused layer whose Hugging Face form is one module (the Qwen2-VL tower's `attn.qkv`) gets
instead one adapter of the whole layer (`shared`): one A `[r, in]` for every part, B over all the
parts' rows, split like the weight; that is PEFT's adapter of that module, rank for rank.

DoRA (Liu et al. 2024, PEFT's `use_dora`): the adapted weight's rows are renormalized to a trained
magnitude m, `W' = m * (W + s B A) / ||W + s B A||` with the row norm over the input features,
detached as in the paper (section 4.3) and PEFT. For a column-parallel layer each rank holds whole
rows, so the norm is local and m is split like the rows; for a row-parallel layer each rank holds a
slice of every row, so the squared norms are all-reduced over tp (one `[out]` vector per layer per
forward: DoRA's only extra collective) and m is replicated (a tp-partial grad, like B's).

Dropout applies to the adapter's input only: in a column-parallel layer the input is identical on
every tp rank, so the mask comes from the default generator (identical across tp, as replicated
activations need); in a row-parallel layer each rank holds different input features, so the mask
comes from the tensor-parallel generator stream.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from megamm.parallel.mappings import all_reduce
from megamm.parallel.params import ParamOwner, ParamSpec
from megamm.parallel.sharding import InitFn, ParamLayout, constant_init
from megamm.parallel.state import ParallelState

if TYPE_CHECKING:
    from megamm.config.lora import LoraConfig


def uniform_init(bound: float) -> InitFn:
    def init(tensor: torch.Tensor, generator: torch.Generator) -> None:
        tensor.uniform_(-bound, bound, generator=generator)

    return init


class LowRankAdapter(ParamOwner):
    """The update of one parallel linear `[out, in]` (parameters `lora_a`, `lora_b`, DoRA's `magnitude`).

    out_parts: the global sizes of the base's fused output parts (`(out,)` when not fused);
    targeted: the indices of the parts that get an update, in increasing order; row_parallel: the
    base splits its input features (else its output features) over tp; shared: one A for every
    part (the adapter of the whole fused layer; every part targeted), else one A per targeted part.
    """

    def __init__(self, in_features: int, out_parts: tuple[int, ...], targeted: tuple[int, ...], *,
                 row_parallel: bool, lora: LoraConfig, state: ParallelState, dtype: torch.dtype,
                 shared: bool = False) -> None:
        super().__init__()
        if not targeted or list(targeted) != sorted(set(targeted)) or targeted[-1] >= len(out_parts):
            raise ValueError(f"targeted parts {targeted} must be increasing indices into {out_parts}")
        if row_parallel and len(out_parts) != 1:
            raise ValueError("a row-parallel layer has no fused output parts")
        if shared and len(targeted) != len(out_parts):
            raise ValueError(f"a shared adapter covers every part of {out_parts}, got parts {targeted}")
        r = lora.rank
        self.state = state
        self.rank = r
        self.scale = lora.scale
        self.dropout = lora.dropout
        self.dora = lora.dora
        self.row_parallel = row_parallel
        self.out_parts = tuple(out_parts)
        self.targeted = tuple(targeted)
        self.shared = shared
        tp = state.tp_size
        sizes = tuple(out_parts[j] for j in targeted)
        fused = sizes if len(sizes) > 1 else None
        # PEFT's init: A as nn.Linear's default (kaiming uniform, a = sqrt(5): bound 1/sqrt(in)), B
        # zero, so a fresh adapter leaves the model unchanged.
        a_init = uniform_init(1.0 / math.sqrt(in_features))
        if row_parallel:
            a_layout = ParamLayout((r, in_features), a_init, partition_dim=1)
            b_layout = ParamLayout((out_parts[0], r), constant_init(0.0))
            m_layout = ParamLayout((out_parts[0],), constant_init(1.0))
        else:
            a_layout = ParamLayout(((1 if shared else len(targeted)) * r, in_features), a_init)
            b_layout = ParamLayout((sum(sizes), r), constant_init(0.0), partition_dim=0, fused_parts=fused)
            m_layout = ParamLayout((sum(sizes),), constant_init(1.0), partition_dim=0, fused_parts=fused)
        self.lora_a = self.create_parameter("lora_a", ParamSpec(a_layout, tp_partial_grad=not row_parallel),
                                            state, dtype)
        self.lora_b = self.create_parameter("lora_b", ParamSpec(b_layout, tp_partial_grad=row_parallel), state, dtype)
        self.magnitude = (
            self.create_parameter("magnitude", ParamSpec(m_layout, tp_partial_grad=row_parallel), state, dtype)
            if lora.dora else None
        )
        self.local_parts = tuple(p // tp for p in out_parts) if not row_parallel else tuple(out_parts)
        self.local_targeted = tuple(self.local_parts[j] for j in targeted)

    # ---- the update ------------------------------------------------------------------------------

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout == 0.0 or not self.training:
            return x
        with self.state.rng.fork() if self.row_parallel else nullcontext():
            return F.dropout(x, self.dropout, training=True)

    def _per_part(self, value: torch.Tensor, dim: int) -> list[torch.Tensor]:
        """Each targeted part's share of `value` (A's rows, dim 0, or `A x`'s features, dim -1): its
        own r rows, or all of them when the adapter is shared."""
        if self.shared:
            return [value] * len(self.targeted)
        return list(value.split(self.rank, dim=dim))

    def delta_weight(self) -> list[torch.Tensor]:
        """`s * B_t A_t` of each targeted part t: local `[part rows, local in]` (row-parallel: one)."""
        a_parts = self._per_part(self.lora_a, 0)
        b_parts = self.lora_b.split(list(self.local_targeted), dim=0) if not self.row_parallel else [self.lora_b]
        return [self.scale * (b @ a) for a, b in zip(a_parts, b_parts)]

    def _row_norms(self, weight_rows: list[torch.Tensor], deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        """`||W + s B A||` per output row of each targeted part, detached; summed over tp for a
        row-parallel layer, whose ranks hold slices of every row."""
        with torch.no_grad():
            squares = [(w.float() + d.float()).pow(2).sum(dim=1) for w, d in zip(weight_rows, deltas)]
            if self.row_parallel:
                squares = [all_reduce(squares[0], self.state.tp_group)]
            return [s.sqrt() for s in squares]

    def _targeted_rows(self, weight: torch.Tensor) -> list[torch.Tensor]:
        parts = weight.split(list(self.local_parts), dim=0)
        return [parts[j] for j in self.targeted]

    def forward(self, x: torch.Tensor, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The layer's local output with the update, before its bias and collective.

        x: the input the base multiplied, `[.., in]` (column: gathered / replicated) or `[.., in/tp]`
        (row); weight: the base's local weight; base: `x W^T` `[.., local out]` (row: a partial sum).
        """
        x_dropped = self._dropped(x)
        z = self._per_part(F.linear(x_dropped, self.lora_a), -1)  # T x [.., r]
        b_parts = self.lora_b.split(list(self.local_targeted), dim=0) if not self.row_parallel else [self.lora_b]
        updates = [self.scale * F.linear(z_t, b_t) for z_t, b_t in zip(z, b_parts)]
        if self.magnitude is not None:
            updates = self._dora(x_dropped is not x, x_dropped, weight, base, updates)
        if len(self.out_parts) == 1:
            return updates[0] if self.magnitude is not None else base + updates[0]
        outputs = list(base.split(list(self.local_parts), dim=-1))
        for t, j in enumerate(self.targeted):
            outputs[j] = updates[t] if self.magnitude is not None else outputs[j] + updates[t]
        return torch.cat(outputs, dim=-1)

    def _dora(self, dropped: bool, x_dropped: torch.Tensor, weight: torch.Tensor, base: torch.Tensor,
              updates: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each targeted part's whole output `m / n * (W x + s B A x)` (PEFT's form; with dropout in
        training, `W x + (m / n - 1) W x' + m / n * s B A x'` with x' the dropped input)."""
        rows = self._targeted_rows(weight)
        norms = self._row_norms([w.detach() for w in rows], [d.detach() for d in self.delta_weight()])
        magnitudes = self.magnitude.split(list(self.local_targeted), dim=0) if not self.row_parallel else [
            self.magnitude]
        base_parts = base.split(list(self.local_parts), dim=-1)
        out = []
        for t, j in enumerate(self.targeted):
            factor = (magnitudes[t] / norms[t].to(magnitudes[t].dtype)).to(base.dtype)
            if dropped:
                out.append(base_parts[j] + (factor - 1) * F.linear(x_dropped, rows[t]) + factor * updates[t])
            else:
                out.append(factor * (base_parts[j] + updates[t]))
        return out

    # ---- DoRA's magnitude and merging ------------------------------------------------------------

    @torch.no_grad()
    def reset_magnitude(self, weight: torch.Tensor) -> None:
        """DoRA's start: m = ||W + s B A|| row by row, so the adapted layer equals the base (with B
        zero) or the loaded LoRA update. Call after the base weights are final; collective over tp
        for a row-parallel layer."""
        if self.magnitude is None:
            return
        norms = self._row_norms(self._targeted_rows(weight), self.delta_weight())
        self.magnitude.copy_(torch.cat(norms).to(self.magnitude.dtype))

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The local weight with the update folded in (fp32 arithmetic, the weight's dtype):
        `W + s B A`, or with DoRA `m * (W + s B A) / ||W + s B A||` on the targeted rows. Collective
        over tp for a row-parallel DoRA layer (its row norms)."""
        deltas = self.delta_weight()
        rows = self._targeted_rows(weight)
        norms = self._row_norms(rows, deltas) if self.magnitude is not None else None
        magnitudes = (self.magnitude.split(list(self.local_targeted), dim=0) if not self.row_parallel
                      else [self.magnitude]) if self.magnitude is not None else None
        parts = list(weight.float().split(list(self.local_parts), dim=0))
        for t, j in enumerate(self.targeted):
            merged = parts[j] + deltas[t].float()
            if norms is not None:
                merged = merged * (magnitudes[t].float() / norms[t]).unsqueeze(1)
            parts[j] = merged
        return torch.cat(parts, dim=0).to(weight.dtype)
