"""Throughput, FLOPs, MFU and memory figures for the training log.

FLOPs are counted for matrix multiplies only (2 FLOPs per multiply-add), the convention of the
Megatron and PaLM MFU papers:

- transformer layer, per token of a sequence of length s:
  QKV `2 h (n_q + 2 n_kv) d`, attention scores and context `4 s n_q d` (the full s x s square,
  causal or not), output projection `2 n_q d h`, MLP `2 h f` x (3 for SwiGLU, else 2);
- vision tower: the above for its `used` layers over patches (+ class token) per image, plus the
  patch convolution `2 C p^2 h` per patch;
- native-resolution tower (the Qwen2-VL family): the actual patches of the step's images and videos,
  from their (t, h, w) grids: the layers' linear parts per patch, attention within each frame (`4 n^2
  n_q d` for a frame of n patches) in full-attention layers and within each window in windowed
  ones (Qwen2.5-VL: windows of `window_size` pixels, the last per row and column cut short), the
  patch embedding `2 C T p^2 h` per patch and the patch merger (`2 (m h)^2 + 2 (m h) out` per merged
  token, m = merge_size^2 patches); it has no separate projector;
- projector: each type counts its own (`Projector.flops_per_token`: `2 c_in h`, + `2 h h` for
  mlp2x_gelu) per image token;
- language model: its layers plus the output layer `2 h V` per token.

A training step costs 3x the forward (forward, backward for activations, backward for weights),
plus one more forward where full recompute is on. Frozen parts that gradients still flow through
(the language model in LLaVA stage 1) cost 2x; a frozen vision tower runs once, without backward.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from megamm.config import LlavaConfig, TransformerConfig
from megamm.models.projectors import projector_class

if TYPE_CHECKING:
    from megamm.data.balance import SampleCost

# Dense bf16/fp16 tensor-core peaks (TFLOP/s), matched in this order against the device name, so the
# more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A10G", 125.0),
    ("L4", 121.0),
)


def layer_flops_per_token(config: TransformerConfig, seq_length: int) -> float:
    h, d = config.hidden_size, config.head_dim
    n_q, n_kv = config.num_attention_heads, config.query_groups
    mlp_mats = 3 if config.activation == "swiglu" else 2
    return (
        2 * h * (n_q + 2 * n_kv) * d
        + 4 * seq_length * n_q * d
        + 2 * n_q * d * h
        + 2 * h * config.ffn_hidden_size * mlp_mats
    )


def _pass_factor(trainable: bool, backprop_through: bool, recompute: str) -> int:
    if trainable:
        return 4 if recompute == "full" else 3
    return 2 if backprop_through else 1


Grid = Sequence[int]


def _window_sides(length: int, window: int | None) -> list[int]:
    """Sides of the windows a frame's `length` patches split into along one axis (one window: the axis)."""
    if window is None or window >= length:
        return [length]
    return [window] * (length // window) + ([length % window] if length % window else [])


def native_vision_flops(config: LlavaConfig, grids: Sequence[Grid]) -> float:
    """Forward FLOPs of a native-resolution tower over images / videos of these (t, h, w) patch grids."""
    vision = config.vision
    native, vt = vision.native_resolution, vision.transformer
    merged = native.window_merged_size(vision.patch_size)
    window = None if merged is None else merged * native.spatial_merge_size
    windowed = 0 if window is None else vt.num_layers - len(native.fullatt_block_indexes)
    attention_per_square = 4 * vt.num_attention_heads * vt.head_dim
    wide = vt.hidden_size * native.merge_unit
    per_patch = (
        vt.num_layers * layer_flops_per_token(vt, 0)
        + 2 * vision.num_channels * native.temporal_patch_size * vision.patch_size**2 * vt.hidden_size
        + (2 * wide * wide + 2 * wide * native.out_hidden_size) / native.merge_unit
    )
    total = 0.0
    for t, h, w in grids:
        frame_squares = (h * w) ** 2
        window_squares = sum(a * a for a in _window_sides(h, window)) * sum(
            b * b for b in _window_sides(w, window)
        )
        total += t * h * w * per_patch + t * attention_per_square * (
            (vt.num_layers - windowed) * frame_squares + windowed * window_squares
        )
    return total


def step_flops(config: LlavaConfig, seq_length: int, samples: int, images: int | Sequence[Grid]) -> float:
    """Model FLOPs of one training step over `samples` sequences holding `images`: the number of
    vision-tower inputs (tiles) for a fixed-size tower, the (t, h, w) grids of the step's images and
    videos for a native-resolution tower (its cost follows each image's own size)."""
    vision, language = config.vision, config.language
    vt, lt = vision.transformer, language.transformer
    native = vision.native_resolution is not None
    if native == isinstance(images, int):
        raise TypeError(f"step_flops: a {vision.family} tower counts "
                        f"{'grids of its images and videos' if native else 'its tower inputs'}, got {images!r}")
    if native:
        vision_forward = native_vision_flops(config, images)
        projector_forward = 0.0  # the patch merger is part of the tower
    else:
        vision_forward = images * (
            vision.num_layers_used * vision.seq_length * layer_flops_per_token(vt, vision.seq_length)
            + vision.num_patches * 2 * vision.num_channels * vision.patch_size**2 * vt.hidden_size
        )
        projector_in = vt.hidden_size * config.projector.merged_patches
        per_image_token = projector_class(config.projector).flops_per_token(projector_in, lt.hidden_size)
        projector_forward = images * config.tile_tokens * per_image_token
    language_forward = samples * seq_length * (
        lt.num_layers * layer_flops_per_token(lt, seq_length) + 2 * lt.hidden_size * language.vocab_size
    )
    projector_or_vision_trains = not (config.freeze_projector and config.freeze_vision)
    return (
        vision_forward * _pass_factor(not config.freeze_vision, False, vt.recompute)
        + projector_forward * _pass_factor(not config.freeze_projector, not config.freeze_vision, "none")
        + language_forward
        * _pass_factor(not config.freeze_language, projector_or_vision_trains, lt.recompute)
    )


def sample_flops(config: LlavaConfig, cost: SampleCost, padded_length: int | None) -> float:
    """Model FLOPs of training one sample (the weight of --balance-vision-work, megamm.data.balance):
    each tower input is its own sequence, so its attention is quadratic in its own length (a tile;
    a native-resolution image or video, counted from its grid by `native_vision_flops`, patch merger
    included); the language model runs `padded_length` tokens per sample for padded rows, else
    (packed rows) the sample's own tokens, attending within the sample. Pass factors as
    `step_flops`; the fixed-size towers' projector is left out (a few percent of the tower)."""
    vision, language = config.vision, config.language
    vt, lt = vision.transformer, language.transformer
    if vision.native_resolution is not None:
        vision_forward = native_vision_flops(config, cost.grids)
    else:
        patch = 2 * vision.num_channels * vision.patch_size**2 * vt.hidden_size
        extra = vision.seq_length - vision.num_patches  # a class token is no patch
        vision_forward = sum(n * vision.num_layers_used * layer_flops_per_token(vt, n) + (n - extra) * patch
                             for n in cost.vision)
    tokens = padded_length if padded_length is not None else cost.text
    language_forward = tokens * (lt.num_layers * layer_flops_per_token(lt, tokens) + 2 * lt.hidden_size * language.vocab_size)
    projector_or_vision_trains = not (config.freeze_projector and config.freeze_vision)
    return (vision_forward * _pass_factor(not config.freeze_vision, False, vt.recompute)
            + language_forward * _pass_factor(not config.freeze_language, projector_or_vision_trains, lt.recompute))


def peak_tflops(device: torch.device, override: float | None, half_precision: bool) -> float | None:
    """The peak for MFU: the flag if given, else a known GPU's bf16 peak for bf16/fp16 runs, else
    None (fp32 runs and CPUs have no default: pass --peak-tflops)."""
    if override is not None:
        return override
    if device.type != "cuda" or not half_precision:
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_TFLOPS if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory (CUDA), or the process's peak resident memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30
