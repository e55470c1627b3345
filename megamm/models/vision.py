"""A CLIP/SigLIP-style ViT vision tower (InternViT: the same tower with megamm.models.internvit's layer).

pixels `[n, C, H, W]` -> conv patch embedding [+ bias] -> [class token] -> + learned positions ->
[pre-norm] -> the first `num_layers_used` layers -> `[tokens, n, h]` (sequence first).

Layers after the selected one (e.g. the last layer when LLaVA takes the penultimate hidden state)
are built so checkpoints round-trip with Hugging Face, but they never run and are frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamm.config import VisionConfig
from megamm.models.internvit import internvit_layer
from megamm.parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megamm.parallel.params import ParamOwner, ParamSpec
from megamm.parallel.sharding import ParamLayout, constant_init, normal_init
from megamm.parallel.state import ParallelState
from megamm.transformer.layer import TransformerBlock, TransformerLayer
from megamm.transformer.norm import build_norm


class VisionTower(ParamOwner):
    def __init__(self, config: VisionConfig, state: ParallelState, sequence_parallel: bool) -> None:
        super().__init__()
        tcfg = config.transformer
        self.config = config
        self.state = state
        self.sequence_parallel = sequence_parallel
        h, p, dtype, std = tcfg.hidden_size, config.patch_size, tcfg.params_dtype, tcfg.init_method_std

        def replicated(name: str, shape: tuple[int, ...]) -> nn.Parameter:
            return self.create_parameter(name, ParamSpec(ParamLayout(shape, normal_init(std))), state, dtype)

        self.patch_embedding = replicated("patch_embedding", (h, config.num_channels, p, p))
        self.patch_bias = (
            self.create_parameter("patch_bias", ParamSpec(ParamLayout((h,), constant_init(0.0))), state, dtype)
            if config.patch_bias
            else None
        )
        # InternViT's Hugging Face tensors are [1, 1, h] and [1, s, h]; they are kept in that shape
        # (both broadcast alike), so conversion copies them unchanged.
        lead = (1, 1) if config.intern_vit is not None else ()
        self.class_embedding = replicated("class_embedding", (*lead, h)) if config.class_token else None
        self.position_embedding = replicated("position_embedding", (*lead[1:], config.seq_length, h))
        # The pre-norm runs on the full, replicated sequence, before any sequence split.
        self.pre_norm = build_norm(tcfg, state, sequence_parallel=False) if config.pre_norm else None
        layer = TransformerLayer if config.intern_vit is None else internvit_layer(config)
        self.encoder = TransformerBlock(tcfg, state, sequence_parallel, range(tcfg.num_layers), layer=layer)
        for position, layer in enumerate(self.encoder.layers.values()):
            if position >= config.num_layers_used:
                layer.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values `[n, C, H, W]` -> selected hidden state `[output_tokens, n, h]`, replicated."""
        cfg = self.config
        if pixel_values.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; the vision tower expects "
                f"[n, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}]"
            )
        pixels = pixel_values.to(self.patch_embedding.dtype)
        patches = F.conv2d(pixels, self.patch_embedding, self.patch_bias, stride=cfg.patch_size)  # [n, h, g, g]
        x = patches.flatten(2).transpose(1, 2)  # [n, g*g, h]
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.position_embedding
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = x.transpose(0, 1).contiguous()  # [s, n, h]
        x = self._run_layers(x)
        if cfg.class_token and cfg.drop_class_token:
            x = x[1:]
        return x

    def _run_layers(self, x: torch.Tensor) -> torch.Tensor:
        used = self.config.num_layers_used
        if not self.sequence_parallel:
            return self.encoder(x, num_layers=used)
        # The patch count (+ class token) rarely divides tp (577 for CLIP-L/336): pad the sequence
        # and mask the padded keys so they never influence a real token.
        seq, tp = x.shape[0], self.state.tp_size
        padded = -(-seq // tp) * tp
        mask = None
        if padded != seq:
            x = F.pad(x, (0, 0, 0, 0, 0, padded - seq))
            mask = (torch.arange(padded, device=x.device) < seq).view(1, 1, 1, padded)
        x = scatter_to_sequence_parallel_region(x, self.state.tp_group)
        x = self.encoder(x, attention_mask=mask, num_layers=used)
        # Consumers (the projector) compute replicated, so backward only needs this rank's slice.
        x = gather_from_sequence_parallel_region(x, self.state.tp_group, grad_is_partial=False)
        return x[:seq]
