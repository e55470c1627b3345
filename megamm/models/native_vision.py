"""The native-resolution vision tower of the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL).

patches `[p, C*T*P*P]` + grids `[images, 3]` -> linear patch embedding -> [window reorder] ->
2D rotary layers, attention kept inside each frame (and inside each window in windowed layers)
-> patch merger (norm, then an MLP over each `m x m` block of patches) -> [inverse reorder] ->
`[p / m^2, out_hidden_size]`, one token per merge block in the image processor's order.

Every image of the microbatch is in one sequence (batch 1) and the attention stays inside each
segment (megamm.transformer.segments: the variable-length flash kernel on CUDA in half
precision, a block-diagonal mask with SDPA elsewhere). The layers are the shared TransformerLayer (heads split over tp:
column-parallel QKV and fc1, row-parallel proj and fc2), so tensor and sequence parallelism are
those of every other tower; under sequence parallelism the sequence is padded to a multiple of tp
and the padding is a segment of its own, so no real patch attends to it and no row of the mask is
empty.

The patch merger is part of this module rather than a registered projector: it is part of Hugging
Face's `visual` module, its norm follows the tower's normalization, its input is the packed
sequence in merge-block order (not `[tokens, n, c]` with a fixed grid) and its width is the
tower's `out_hidden_size`; a Projector would also compose with pixel shuffle, which would merge
the same patches twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamm import kernels
from megamm.config.model import NativeResolutionConfig, VisionConfig
from megamm.models.patch_grids import (
    expand_to_patches,
    frame_lengths,
    grid_list,
    patch_positions,
    window_order,
)
from megamm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megamm.parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megamm.parallel.params import ParamOwner, ParamSpec
from megamm.parallel.sharding import ParamLayout, normal_init
from megamm.parallel.state import ParallelState
from megamm.transformer.layer import TransformerBlock
from megamm.transformer.norm import Norm
from megamm.transformer.rope import AxialRotaryEmbedding
from megamm.transformer.segments import Segments


class PatchMerger(nn.Module):
    """`[p, c]` in merge-block order -> norm -> `[p / m^2, m^2 c]` -> fc1, GELU, fc2 -> `[p / m^2, out]`,
    replicated across tp (fc1 column-parallel, fc2 row-parallel: one all-reduce)."""

    def __init__(self, vision: VisionConfig, native: NativeResolutionConfig, state: ParallelState) -> None:
        super().__init__()
        tcfg = vision.transformer
        self.width = tcfg.hidden_size * native.merge_unit
        common = {"state": state, "init": normal_init(tcfg.init_method_std), "bias": True, "dtype": tcfg.params_dtype}
        self.norm = Norm(tcfg.hidden_size, tcfg.normalization, native.merger_norm_epsilon, state,
                         sequence_parallel=False, dtype=tcfg.params_dtype)
        self.fc1 = ColumnParallelLinear(self.width, self.width, **common)
        self.fc2 = RowParallelLinear(self.width, native.out_hidden_size, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = self.norm(x).reshape(-1, self.width)
        return self.fc2(kernels.gelu(self.fc1(merged)))


class NativeResolutionTower(ParamOwner):
    """The tower of a VisionConfig with `native_resolution` set; see the module docstring."""

    def __init__(self, config: VisionConfig, state: ParallelState, sequence_parallel: bool) -> None:
        super().__init__()
        if config.native_resolution is None:
            raise ValueError("NativeResolutionTower needs vision.native_resolution (the Qwen2-VL family's fields)")
        tcfg = config.transformer
        native = config.native_resolution
        self.config = config
        self.native = native
        self.state = state
        self.sequence_parallel = sequence_parallel
        self.patch_values = config.num_channels * native.temporal_patch_size * config.patch_size**2
        # Hugging Face's Conv3d weight shape: stride = kernel, so the convolution is a linear map of
        # each flattened patch (C, T, P, P order, as the image processor flattens it).
        shape = (tcfg.hidden_size, config.num_channels, native.temporal_patch_size, config.patch_size,
                 config.patch_size)
        self.patch_embedding = self.create_parameter(
            "patch_embedding", ParamSpec(ParamLayout(shape, normal_init(tcfg.init_method_std))), state,
            tcfg.params_dtype)
        self.rotary = AxialRotaryEmbedding(tcfg.head_dim, axes=2, base=tcfg.rotary_base)
        self.encoder = TransformerBlock(tcfg, state, sequence_parallel, range(tcfg.num_layers))
        self.merger = PatchMerger(config, native, state)

    def forward(self, patches: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """patches `[p, C*T*P*P]`, grids `[images, 3]` (t, h, w) -> `[p / m^2, out_hidden_size]`, replicated."""
        native, merge = self.native, self.native.spatial_merge_size
        grid = self.check(patches, grids)
        x = F.linear(patches.to(self.patch_embedding.dtype), self.patch_embedding.flatten(1))  # [p, h]
        positions = patch_positions(grid, merge).to(x.device)
        window = native.window_merged_size(self.config.patch_size)
        order, window_lengths = None, None
        if window is not None:
            order, window_lengths = window_order(grid, merge, window)
            order = order.to(x.device)
            patch_order = expand_to_patches(order, native.merge_unit)
            x, positions = x[patch_order], positions[patch_order]
        x = self._run_layers(x, positions, frame_lengths(grid), window_lengths)
        merged = self.merger(x)
        if order is not None:
            merged = merged[torch.argsort(order)]
        return merged

    def check(self, patches: torch.Tensor, grids: torch.Tensor) -> list[tuple[int, int, int]]:
        """Refuse patches and grids that do not fit this tower; returns the grids as int triples."""
        merge = self.native.spatial_merge_size
        grid = grid_list(grids)
        if patches.dim() != 2 or patches.shape[1] != self.patch_values:
            raise ValueError(f"patches has shape {tuple(patches.shape)}; the {self.config.family} tower expects "
                             f"[patches, {self.patch_values}] (channels x temporal_patch_size x patch_size^2)")
        bad = [g for g in grid if min(g) < 1 or g[1] % merge or g[2] % merge]
        if bad:
            raise ValueError(f"grids {bad}: t, h, w must be >= 1 and h, w divisible by spatial_merge_size {merge}")
        total = sum(t * h * w for t, h, w in grid)
        if total != patches.shape[0]:
            raise ValueError(f"the grids cover {total} patches but patches has {patches.shape[0]} rows")
        return grid

    def _run_layers(self, x: torch.Tensor, positions: torch.Tensor, frames: list[int],
                    windows: list[int] | None) -> torch.Tensor:
        """`[p, h]` -> `[p, h]` through every layer (frames, windows: segment lengths in patches)."""
        seq = x.shape[0]
        padding = (-seq) % self.state.tp_size if self.sequence_parallel else 0
        if padding:
            x = F.pad(x, (0, 0, 0, padding))
            positions = F.pad(positions, (0, 0, 0, padding))
            frames = [*frames, padding]
            windows = None if windows is None else [*windows, padding]
        full = Segments(tuple(frames))
        windowed = None if windows is None else Segments(tuple(windows))
        full_layers = set(self.native.fullatt_block_indexes)
        masks = {i: full if windowed is None or i in full_layers else windowed
                 for i in range(self.config.transformer.num_layers)}
        rotary = self.rotary(positions)
        x = x.unsqueeze(1)  # [s, 1, h]: the whole microbatch is one sequence
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, self.state.tp_group)
        x = self.encoder(x, rotary, layer_masks=masks)
        if self.sequence_parallel:
            # The merger computes replicated, so backward only needs this rank's slice.
            x = gather_from_sequence_parallel_region(x, self.state.tp_group, grad_is_partial=False)
        return x[:seq, 0]
