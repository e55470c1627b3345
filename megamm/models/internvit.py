"""InternViT, InternVL's vision encoder: the ViT of megamm.models.vision with its own layer.

A layer is `x + lambda_1 * attn(norm(x))`, then `x + lambda_2 * mlp(norm(x))`: layer scale, one
learned vector per residual branch (transformers' InternVLVisionLayer). With `qk_norm` the query and
key projections are RMS-normalized over their full width, all heads together, before the heads are
split (InternVLVisionAttention's q_norm / k_norm). The patch embedding, class token and learned
positions are VisionTower's (class token, no pre-norm, a patch bias).

Tensor parallelism: heads are split over tp as in every attention, so each rank holds the
`h / tp` query (and key) channels of its own heads and the matching slice of the norm weights; the
sum of squares over the full width is all-reduced over tp, forward and backward (each rank's
outputs depend on the total, so each rank's gradient of it is partial). Under sequence parallelism
the QKV projection gathers the sequence first, so the norm sees whole sequences; the layer-scale
vectors multiply sequence chunks and their grads are partial sums over tp, as a norm weight's are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from megamm.config import InternViTConfig, TransformerConfig, VisionConfig
from megamm.parallel.mappings import copy_to_tensor_parallel_region, reduce_from_tensor_parallel_region
from megamm.parallel.params import ParamOwner, ParamSpec
from megamm.parallel.sharding import ParamLayout, constant_init
from megamm.parallel.state import ParallelState
from megamm.transformer.attention import SelfAttention
from megamm.transformer.layer import TransformerLayer
from megamm.transformer.mlp import MLP
from megamm.transformer.norm import build_norm
from megamm.transformer.recompute import recompute
from megamm.transformer.segments import Segments


class TensorParallelRMSNorm(ParamOwner):
    """RMSNorm over a width split across tp: `[s, b, width / tp] -> [s, b, width / tp]`.

    The mean of squares is taken over the full width (an all-reduce of the local sums whose
    backward all-reduces too), in fp32 and cast back, as transformers' InternVLVisionRMSNorm does.
    """

    def __init__(self, width: int, eps: float, state: ParallelState, dtype: torch.dtype) -> None:
        super().__init__()
        self.width = width
        self.eps = eps
        self.group = state.tp_group
        layout = ParamLayout((width,), constant_init(1.0), partition_dim=0)
        self.weight = self.create_parameter("weight", ParamSpec(layout), state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        squares = x32.pow(2).sum(-1, keepdim=True)
        total = reduce_from_tensor_parallel_region(copy_to_tensor_parallel_region(squares, self.group), self.group)
        normed = x32 * torch.rsqrt(total / self.width + self.eps)
        return self.weight * normed.to(x.dtype)


class InternViTAttention(SelfAttention):
    """SelfAttention with the q/k/v bias of `intern.qkv_bias` and, with `intern.qk_norm`, the
    full-width RMSNorm of queries and keys; no rotary (positions are the learned table)."""

    def __init__(self, config: TransformerConfig, intern: InternViTConfig, state: ParallelState,
                 sequence_parallel: bool) -> None:
        super().__init__(config, state, sequence_parallel, qkv_bias=intern.qkv_bias)
        width = config.num_attention_heads * config.head_dim
        self.q_norm = self.k_norm = None
        if intern.qk_norm:
            self.q_norm = TensorParallelRMSNorm(width, intern.qk_norm_epsilon, state, config.params_dtype)
            self.k_norm = TensorParallelRMSNorm(width, intern.qk_norm_epsilon, state, config.params_dtype)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | Segments | None = None,
        kv_cache: None = None,
    ) -> torch.Tensor:
        """`[s', b, h] -> [s', b, h]`; attention_mask as SelfAttention's (the padded keys under SP)."""
        if rotary is not None or kv_cache is not None:
            raise ValueError("an InternViT layer has learned positions and no KV cache")
        qkv = self.qkv(x)
        s, b = qkv.shape[:2]
        d = self.head_dim
        q, k, v = qkv.split([self.local_heads * d] * 3, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # [s, b, heads * d] -> [b, heads, s, d] for the attention core.
        q, k, v = (t.reshape(s, b, self.local_heads, d).permute(1, 2, 0, 3) for t in (q, k, v))
        if self.config.recompute == "selective":
            context = recompute(self._core, self.state.rng, q, k, v, attention_mask)
        else:
            context = self._core(q, k, v, attention_mask)
        return self.proj(context.permute(2, 0, 1, 3).reshape(s, b, self.local_heads * d))


class LayerScale(ParamOwner):
    """The two per-channel scale vectors of an InternViT layer, `lambda_1` and `lambda_2` `[h]`,
    replicated over tp (partial grads under sequence parallelism, like a norm weight's)."""

    def __init__(self, hidden: int, init: float, state: ParallelState, sequence_parallel: bool,
                 dtype: torch.dtype) -> None:
        super().__init__()
        spec = ParamSpec(ParamLayout((hidden,), constant_init(init)), sequence_partial_grad=sequence_parallel)
        self.lambda_1 = self.create_parameter("lambda_1", spec, state, dtype)
        self.lambda_2 = self.create_parameter("lambda_2", spec, state, dtype)


class InternViTLayer(TransformerLayer):
    """`x + lambda_1 * attn(norm(x))`, then `x + lambda_2 * mlp(norm(x))`, on `[s', b, h]`.

    A TransformerLayer, so --torch-compile's regional compilation finds it like every layer, with
    the same parts (norms, attention, MLP) under the same names; TransformerLayer.__init__ is not
    called because it would build a plain attention only to replace it.
    """

    def __init__(self, config: TransformerConfig, intern: InternViTConfig, state: ParallelState,
                 sequence_parallel: bool) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.state = state
        self.sequence_parallel = sequence_parallel
        self.input_norm = build_norm(config, state, sequence_parallel)
        self.self_attention = InternViTAttention(config, intern, state, sequence_parallel)
        self.pre_mlp_norm = build_norm(config, state, sequence_parallel)
        self.mlp = MLP(config, state, sequence_parallel)
        self.layer_scale = LayerScale(config.hidden_size, intern.layer_scale_init, state, sequence_parallel,
                                      config.params_dtype)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | Segments | None = None,
        kv_cache: None = None,
    ) -> torch.Tensor:
        x = x + self.layer_scale.lambda_1 * self.self_attention(self.input_norm(x), rotary, attention_mask, kv_cache)
        return x + self.layer_scale.lambda_2 * self.mlp(self.pre_mlp_norm(x))


def internvit_layer(vision: VisionConfig) -> Callable[[TransformerConfig, ParallelState, bool], InternViTLayer]:
    """The layer builder TransformerBlock takes for `vision` (its InternViT settings bound)."""
    intern = vision.intern_vit
    if intern is None:
        raise ValueError(f"the {vision.family} tower has no vision.intern_vit section")

    def build(config: TransformerConfig, state: ParallelState, sequence_parallel: bool) -> InternViTLayer:
        return InternViTLayer(config, intern, state, sequence_parallel)

    return build
