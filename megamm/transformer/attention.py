"""Self-attention with a fused, column-parallel QKV projection and GQA.

Per tp rank: `heads/tp` query heads and `groups/tp` key/value groups, whole heads only, so the
attention core needs no communication. The fused QKV weight's master layout is `[q; k; v]` along
the output dim (see `megamm.parallel.sharding`), each rank computing `[q_r; k_r; v_r]`.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from megamm.config import TransformerConfig
from megamm.kernels.attention import unfused_attention
from megamm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megamm.parallel.sharding import normal_init, scaled_init
from megamm.parallel.state import ParallelState
from megamm.transformer.kv_cache import LayerKVCache
from megamm.transformer.recompute import recompute
from megamm.transformer.ring_attention import ring_attention
from megamm.transformer.rope import apply_rotary
from megamm.transformer.segments import PackedRows, Segments


class SelfAttention(nn.Module):
    """`[s', b, h] -> [s', b, h]` where s' is s, or s/tp under sequence parallelism."""

    def __init__(self, config: TransformerConfig, state: ParallelState, sequence_parallel: bool,
                 qkv_bias: bool | None = None) -> None:
        """qkv_bias: a bias on the QKV projection alone (None: `add_bias_linear or add_qkv_bias`);
        InternViT sets it apart from the output projection's (`add_bias_linear`)."""
        super().__init__()
        tp = state.tp_size
        self.config = config
        self.state = state
        self.head_dim = config.head_dim
        self.local_heads = config.num_attention_heads // tp
        self.local_groups = config.query_groups // tp
        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.query_groups * self.head_dim
        self.qkv = ColumnParallelLinear(
            config.hidden_size,
            q_width + 2 * kv_width,
            state=state,
            init=normal_init(config.init_method_std),
            bias=(config.add_bias_linear or config.add_qkv_bias) if qkv_bias is None else qkv_bias,
            sequence_parallel=sequence_parallel,
            fused_parts=(q_width, kv_width, kv_width),
            dtype=config.params_dtype,
        )
        self.proj = RowParallelLinear(
            q_width,
            config.hidden_size,
            state=state,
            init=scaled_init(config.init_method_std, config.num_layers),
            bias=config.add_bias_linear,
            sequence_parallel=sequence_parallel,
            dtype=config.params_dtype,
        )

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | Segments | PackedRows | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """rotary: (cos, sin) `[s, b, 1, d]`; attention_mask: bool, broadcastable to
        `[b, heads, s, s_k]`, True where a query may attend a key (combined with causality), or
        Segments (b = 1, no cache: attention within each segment, megamm.transformer.segments).

        kv_cache (generation): the s new positions' keys and values are appended to it at its
        offset and the queries attend to every cached key, s_k = offset + s; the queries are the
        last s positions, which is how the attention core aligns causality when s < s_k.
        """
        qkv = self.qkv(x)
        s, b = qkv.shape[:2]
        d = self.head_dim
        q, k, v = qkv.split([self.local_heads * d, self.local_groups * d, self.local_groups * d], dim=-1)
        q = q.view(s, b, self.local_heads, d)
        k = k.view(s, b, self.local_groups, d)
        v = v.view(s, b, self.local_groups, d)
        if rotary is not None:
            q = apply_rotary(q, *rotary)
            k = apply_rotary(k, *rotary)
        # [s, b, heads, d] -> [b, heads, s, d] for scaled_dot_product_attention.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
            if attention_mask is None:
                # An all-true mask makes the core align causality to the last query (s < s_k); the
                # bare is_causal flag would align it to the first.
                attention_mask = torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool, device=q.device)
        if self.config.recompute == "selective":
            context = recompute(self._core, self.state.rng, q, k, v, attention_mask)
        else:
            context = self._core(q, k, v, attention_mask)
        return self.proj(context.permute(2, 0, 1, 3).reshape(s, b, self.local_heads * d))

    def _core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | Segments | PackedRows | None
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v on `[b, heads, s, d]`: sdpa (flash/efficient kernels on GPU) or,
        with attention_backend="unfused", `megamm.kernels.attention.unfused_attention`; Segments
        run on the variable-length kernel where it applies (bidirectional, sdpa backend), else
        as their block-diagonal mask."""
        causal = self.config.causal
        if self.state.cp_size > 1:
            return self._context_parallel_core(q, k, v, attention_mask)
        dropout = self.config.attention_dropout if self.training else 0.0
        if isinstance(attention_mask, Segments):
            if (not causal and self.config.attention_backend == "sdpa"
                    and attention_mask.uses_varlen(q, dropout)):
                return attention_mask.varlen_attention(q, k, v)
            attention_mask = attention_mask.mask(q.device)
        if attention_mask is not None and causal:
            s_q, s_k = q.shape[2], k.shape[2]
            lower = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(s_k - s_q)
            attention_mask = attention_mask & lower
            causal = False
        if self.config.attention_backend == "unfused":
            return unfused_attention(q, k, v, attention_mask, causal, dropout, self.state.rng)
        if self.config.attention_backend != "sdpa":
            raise ValueError(
                f"unknown attention_backend {self.config.attention_backend!r}; expected sdpa or unfused"
            )
        # Heads are split across tp, so each rank's dropout mask must come from its own stream.
        # GQA: each group of heads/groups consecutive query heads shares one key/value head, the
        # grouping enable_gqa uses, so no expanded copy of k and v is made.
        with self.state.rng.fork() if dropout > 0 else nullcontext():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal,
                enable_gqa=self.local_groups != self.local_heads,
            )

    def _context_parallel_core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | Segments | PackedRows | None
    ) -> torch.Tensor:
        """The core over the sequence split across cp ranks (megamm.transformer.ring_attention): q, k,
        v hold this rank's `s/cp` positions, attention_mask (packed rows) its rows over the global
        keys, `[b, 1, s/cp, s]`, or the rows' segment ids (PackedRows, O(s))."""
        if isinstance(attention_mask, Segments):
            raise TypeError("attention segments (a packed vision sequence) are not split over context parallelism")
        if self.training and self.config.attention_dropout > 0:
            raise ValueError("ring attention has no attention dropout; megamm.config refuses it with cp > 1")
        if isinstance(attention_mask, PackedRows):
            return ring_attention(q, k, v, self.state, self.config.causal, segments=attention_mask)
        return ring_attention(q, k, v, self.state, self.config.causal, attention_mask)
