"""Attention segments: a sequence cut into runs that attend only within themselves.

Several images (or windows of them) packed into one sequence attend as separate sequences. On
CUDA in fp16 / bf16 the attention core hands the cumulative lengths to torch's variable-length
flash kernel (`torch.nn.attention.varlen.varlen_attn`), which never forms the s x s scores of the
padding between segments; everywhere else it uses the equivalent block-diagonal boolean mask with
SDPA. The mask is built once per Segments object and reused by every layer that attends with it.

`PackedRows` is the language model's form of packed rows under context parallelism: per-token
segment ids `[b, s]` over the whole sequence, from which ring attention derives each block's mask
(megamm.transformer.ring_attention), so no `[s, s]` mask exists.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch

VARLEN_DTYPES = (torch.float16, torch.bfloat16)


def varlen_kernel_available() -> bool:
    """Whether this torch has the variable-length attention entry point (torch >= 2.10)."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


@dataclass(eq=False)
class Segments:
    """Lengths of consecutive segments covering a sequence of `sum(lengths)` positions."""

    lengths: tuple[int, ...]
    _masks: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"segment lengths must be >= 1 and at least one, got {self.lengths}")

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    def cumulative(self, device: torch.device) -> torch.Tensor:
        """`[segments + 1]` int32 boundaries (0, l0, l0 + l1, ...): the variable-length kernels' cu_seqlens."""
        lengths = torch.tensor((0, *self.lengths), dtype=torch.int32, device=device)
        return lengths.cumsum(0, dtype=torch.int32)

    def mask(self, device: torch.device) -> torch.Tensor:
        """`[1, 1, s, s]` bool, True where query and key are in the same segment."""
        if device not in self._masks:
            # output_size: the length is known on the host, so the device need not report it (a sync).
            segment = torch.repeat_interleave(torch.arange(len(self.lengths), device=device),
                                              torch.tensor(self.lengths, device=device), output_size=self.total)
            self._masks[device] = (segment[:, None] == segment[None, :])[None, None]
        return self._masks[device]

    def uses_varlen(self, q: torch.Tensor, dropout: float) -> bool:
        """Whether the attention core can run `q` `[1, heads, s, d]` on the variable-length kernel."""
        return (q.is_cuda and q.dtype in VARLEN_DTYPES and q.shape[0] == 1 and dropout == 0.0
                and varlen_kernel_available())

    def varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v within each segment, `[1, heads, s, d]` in and out."""
        from torch.nn.attention.varlen import varlen_attn

        cu = self.cumulative(q.device)
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # [s, heads, d]
        # enable_gqa only where needed: the first torch releases with varlen_attn lack the keyword.
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        out = varlen_attn(q, k, v, cu, cu, self.max_length, self.max_length, **gqa)
        return out.transpose(0, 1).unsqueeze(0)


@dataclass(frozen=True, eq=False)
class PackedRows:
    """Packed rows as segment ids `[b, s]` int64 over the whole sequence (every cp rank holds all of
    them: O(s)): query i may attend key j where their ids are equal (and j <= i under causality)."""

    ids: torch.Tensor

    def allowed(self, query_positions: slice, key_positions: slice) -> torch.Tensor:
        """`[b, 1, queries, keys]` bool: True where the queries at `query_positions` (global) and the
        keys at `key_positions` (global) are in the same segment (causality is the caller's)."""
        return self.ids[:, None, query_positions, None] == self.ids[:, None, None, key_positions]
