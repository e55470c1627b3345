"""The FLOP count and MFU of the training log (megamm/training/metrics.py, megamm/train.py), against
figures worked out by hand for the tiny LLaVA of tests/tiny.py.

The counting convention is the one metrics.py's docstring states (Megatron / PaLM MFU papers):
matrix multiplies only, 2 FLOPs per multiply-add, so an `[m, k] @ [k, n]` product costs `2 m n k`;
per transformer-layer token: QKV `2 h (n_q + 2 n_kv) d`, attention scores and context `4 s n_q d`
(the full s x s square), output projection `2 n_q d h`, MLP `2 h f` per matrix (3 for SwiGLU, else 2);
vision tower over its *used* layers plus the patch convolution; projector; language layers plus the
output layer `2 h V`. A trained part costs 3x its forward (4x with full recompute), a frozen part that
gradients flow through 2x, a frozen vision tower 1x.

Every expected value below is plain arithmetic on the tiny configuration's numbers, written out so a
reader can check it; no helper of metrics.py is used to produce an expected value. A wrong factor
anywhere (a missing `2`, `n_q` instead of `n_kv`, the wrong pass factor of a frozen part, all vision
layers instead of the used ones, ...) changes these integers.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from megamm import train as train_module
from megamm.config import LlavaConfig, ProjectorConfig, TransformerConfig
from megamm.config.run import RunConfig, TrainingConfig
from megamm.data.balance import SampleCost, sample_cost
from megamm.data.samples import SampleLayout
from megamm.training.metrics import (
    layer_flops_per_token,
    native_vision_flops,
    peak_tflops,
    sample_flops,
    step_flops,
)
from tests.tiny import language_config, llava_config, native_vision_config, vision_config

SEQ = 48  # language sequence length used throughout
SAMPLES = 4  # sequences in the step
IMAGES = 3  # images in the step

# --- The tiny vision tower (tests/tiny.py): h=32, 4 heads of d=8, MHA (n_kv = 4), f=64, quick-GELU
# (2 MLP matrices), 3 layers of which select_layer=-2 uses 2; 16x16 images in 4x4 patches -> 16 patches
# + class token = 17 tokens; 3 channels.
VIT_QKV = 2 * 32 * (4 + 2 * 4) * 8  # 6144
VIT_SCORES_CONTEXT = 4 * 17 * 4 * 8  # 2176: s = 17 tokens attend to all 17
VIT_OUT = 2 * 4 * 8 * 32  # 2048
VIT_MLP = 2 * 32 * 64 * 2  # 8192
VIT_LAYER_TOKEN = VIT_QKV + VIT_SCORES_CONTEXT + VIT_OUT + VIT_MLP  # 18560
VIT_PATCH_CONV = 2 * 3 * 4**2 * 32  # 3072 per patch: a [C p^2] -> [h] product
VIT_IMAGE = 2 * 17 * VIT_LAYER_TOKEN + 16 * VIT_PATCH_CONV  # 2 used layers x 17 tokens + 16 patches

# --- The projector: mlp2x_gelu, 32 -> 64 -> 64, on the 16 patch tokens (class token dropped).
PROJECTOR_TOKEN = 2 * 32 * 64 + 2 * 64 * 64  # 12288
PROJECTOR_IMAGE = 16 * PROJECTOR_TOKEN  # 196608

# --- The tiny language model: h=64, 8 query heads of d=8, 4 kv groups, f=96, SwiGLU (3 matrices),
# 2 layers, vocabulary 100 (the output layer counted over the real vocabulary, as the docstring says).
LM_QKV = 2 * 64 * (8 + 2 * 4) * 8  # 16384
LM_SCORES_CONTEXT = 4 * SEQ * 8 * 8  # 12288
LM_OUT = 2 * 8 * 8 * 64  # 8192
LM_MLP = 2 * 64 * 96 * 3  # 36864
LM_LAYER_TOKEN = LM_QKV + LM_SCORES_CONTEXT + LM_OUT + LM_MLP  # 73728
LM_TOKEN = 2 * LM_LAYER_TOKEN + 2 * 64 * 100  # 160256: 2 layers + output layer

VISION_FWD = IMAGES * VIT_IMAGE  # 2040576
PROJECTOR_FWD = IMAGES * PROJECTOR_IMAGE  # 589824
LANGUAGE_FWD = SAMPLES * SEQ * LM_TOKEN  # 30769152


def test_hand_arithmetic_is_for_the_tiny_config() -> None:
    """The literals above describe tests/tiny.py's model (so the hand figures are about it), and the
    intermediate sums are what the comments say."""
    config = llava_config()
    v, lt = config.vision, config.language.transformer
    vt = v.transformer
    def shape(t: TransformerConfig) -> tuple[int, ...]:
        return t.hidden_size, t.num_attention_heads, t.query_groups, t.head_dim, t.ffn_hidden_size

    assert shape(vt) == (32, 4, 4, 8, 64) and shape(lt) == (64, 8, 4, 8, 96)
    assert (vt.activation, vt.num_layers, v.num_layers_used) == ("quick_gelu", 3, 2)
    assert (v.seq_length, v.num_patches, v.num_channels, v.patch_size) == (17, 16, 3, 4)
    assert (config.projector.type, config.image_tokens_per_image) == ("mlp2x_gelu", 16)
    assert (lt.activation, lt.num_layers, config.language.vocab_size) == ("swiglu", 2, 100)
    assert VIT_LAYER_TOKEN == 18560 and VIT_IMAGE == 680192
    assert LM_LAYER_TOKEN == 73728 and LM_TOKEN == 160256
    assert (VISION_FWD, PROJECTOR_FWD, LANGUAGE_FWD) == (2040576, 589824, 30769152)


def test_layer_flops_per_token_by_hand() -> None:
    """One layer, one token: the vision layer at s=17 and the language layer at s=48, and a GELU
    (2-matrix) MLP variant of the language layer."""
    config = llava_config()
    assert layer_flops_per_token(config.vision.transformer, 17) == 18560
    assert layer_flops_per_token(config.language.transformer, SEQ) == 73728
    gelu = replace(config.language.transformer, activation="gelu")
    assert layer_flops_per_token(gelu, SEQ) == LM_QKV + LM_SCORES_CONTEXT + LM_OUT + 2 * 64 * 96 * 2  # 61440
    # Multi-head instead of GQA: k and v get 8 heads each.
    mha = replace(config.language.transformer, num_query_groups=None)
    mha_qkv = 2 * 64 * (8 + 2 * 8) * 8  # 24576
    assert layer_flops_per_token(mha, SEQ) == mha_qkv + LM_SCORES_CONTEXT + LM_OUT + LM_MLP  # 81920


# (freeze_vision, freeze_projector, freeze_language) -> pass factors (vision, projector, language)
# and the step's total by hand.
FREEZE_CASES = {
    "all trained": ((False, False, False), (3, 3, 3), 3 * (2040576 + 589824 + 30769152)),  # 100198656
    # LLaVA stage 2: frozen ViT runs forward only; projector and LM train.
    "stage 2": ((True, False, False), (1, 3, 3), 2040576 + 3 * 589824 + 3 * 30769152),  # 96117504
    # LLaVA stage 1: only the projector trains; gradients still flow back through the frozen LM (2x).
    "stage 1": ((True, False, True), (1, 3, 2), 2040576 + 3 * 589824 + 2 * 30769152),  # 65348352
    # Only the LM trains: nothing upstream needs gradients, vision and projector run forward only.
    "LM only": ((True, True, False), (1, 1, 3), 2040576 + 589824 + 3 * 30769152),  # 94937856
    # Only the ViT trains: gradients flow back through the frozen LM and the frozen projector.
    "ViT only": ((False, True, True), (3, 2, 2), 3 * 2040576 + 2 * 589824 + 2 * 30769152),  # 68839680
}


@pytest.mark.parametrize("case", FREEZE_CASES)
def test_step_flops_by_hand(case: str) -> None:
    """The whole step: vision + projector + language forward, each times its pass factor."""
    (freeze_vision, freeze_projector, freeze_language), factors, total = FREEZE_CASES[case]
    forwards = (VISION_FWD, PROJECTOR_FWD, LANGUAGE_FWD)
    assert total == sum(f * fwd for f, fwd in zip(factors, forwards, strict=True))
    config = llava_config(freeze_vision=freeze_vision, freeze_projector=freeze_projector,
                          freeze_language=freeze_language)
    assert step_flops(config, SEQ, SAMPLES, IMAGES) == total


def test_sample_flops_by_hand() -> None:
    """The weight of --balance-vision-work: two tiles (tower sequences of 17) and the language row,
    padded to 48 or (packed) the sample's own 24 tokens; no projector; the pass factors of the step."""
    config = llava_config()
    tiles = SampleCost((17, 17), 24)
    assert sample_flops(config, tiles, padded_length=SEQ) == 3 * (2 * VIT_IMAGE + SEQ * LM_TOKEN)
    lm_token_24 = 2 * (LM_QKV + 4 * 24 * 8 * 8 + LM_OUT + LM_MLP) + 2 * 64 * 100  # attention over 24 tokens
    assert sample_flops(config, tiles, padded_length=None) == 3 * (2 * VIT_IMAGE + 24 * lm_token_24)
    stage_1 = llava_config(freeze_vision=True, freeze_language=True)
    assert sample_flops(stage_1, SampleCost((), 24), padded_length=SEQ) == 2 * SEQ * LM_TOKEN
    assert sample_flops(stage_1, tiles, padded_length=SEQ) == 2 * VIT_IMAGE + 2 * SEQ * LM_TOKEN


def test_step_flops_full_recompute_adds_one_forward() -> None:
    """Full recompute of both towers: trained parts cost 4 forwards; the projector (no recompute) 3."""
    config = LlavaConfig(vision=vision_config(recompute="full"), language=language_config(recompute="full"),
                         projector=ProjectorConfig())
    assert step_flops(config, SEQ, SAMPLES, IMAGES) == 4 * 2040576 + 3 * 589824 + 4 * 30769152  # 133008384
    # Selective recompute is not counted as extra model FLOPs (it is hardware FLOPs, not model FLOPs).
    selective = LlavaConfig(vision=vision_config(recompute="selective"),
                            language=language_config(recompute="selective"), projector=ProjectorConfig())
    assert step_flops(selective, SEQ, SAMPLES, IMAGES) == 100198656


def test_step_flops_pixel_shuffle_linear_projector() -> None:
    """Pixel shuffle merges 2x2 patches: 4 image tokens per image, each of width 4 x 32 = 128; a linear
    projector is one [128] -> [64] product per image token."""
    config = llava_config(projector=ProjectorConfig(type="linear", pixel_shuffle=True))
    projector = IMAGES * 4 * (2 * 128 * 64)  # 196608
    assert step_flops(config, SEQ, SAMPLES, IMAGES) == 3 * (VISION_FWD + projector + LANGUAGE_FWD)  # 99019008


def test_step_flops_scale_with_sequence_length_and_counts() -> None:
    """Text-only sequences of length 96: the attention term grows with s, the rest per token."""
    config = llava_config()
    per_layer = 16384 + 4 * 96 * 8 * 8 + 8192 + 36864  # 86016
    per_token = 2 * per_layer + 2 * 64 * 100  # 184832
    assert step_flops(config, 96, 2, 0) == 3 * 2 * 96 * per_token  # 106463232


# The native-resolution tower of tests/tiny.py: h 32, 4 heads of 8, ffn 64 (2 matrices), 2 layers.
# Per patch: layers 2 x (2*32*(4+8)*8 + 2*4*8*32 + 2*32*64*2) = 2 x 16384 = 32768; patch embedding
# 2*3*2*4*4*32 = 6144; merger per merged token 2*128*128 + 2*128*64 = 49152, per patch / 4 = 12288.
NATIVE_PER_PATCH = 32768 + 6144 + 12288  # 51200
NATIVE_ATTENTION = 4 * 4 * 8  # 128 per (query, key) pair of one layer
NATIVE_GRIDS = [(1, 4, 6), (2, 4, 4)]  # an image of 24 patches, a video of 2 frames of 16
# No windows: every layer attends each frame whole: 24^2 for the image, 2 x 16^2 for the video.
NATIVE_FULL = 24 * NATIVE_PER_PATCH + 2 * NATIVE_ATTENTION * 576 + 32 * NATIVE_PER_PATCH + 2 * 2 * NATIVE_ATTENTION * 256
# Windows of 4x4 patches in layer 0: the 4x6 image splits into 4x4 and 4x2 windows (256 + 64 pairs);
# the 4x4 frames are one window each.
NATIVE_WINDOWED = (24 * NATIVE_PER_PATCH + NATIVE_ATTENTION * (576 + 320)
                   + 32 * NATIVE_PER_PATCH + 2 * NATIVE_ATTENTION * (256 + 256))


def test_native_vision_flops_by_hand() -> None:
    """The actual patches of the step: each image's and video's own grid, attention within frames and
    windows, the merger; the language model as for any family, no projector."""
    assert NATIVE_FULL == 3145728 and NATIVE_WINDOWED == 3112960
    for windows, vision in ((False, NATIVE_FULL), (True, NATIVE_WINDOWED)):
        config = llava_config(vision=native_vision_config(windows))
        assert native_vision_flops(config, NATIVE_GRIDS) == vision
        assert step_flops(config, SEQ, SAMPLES, NATIVE_GRIDS) == 3 * (vision + LANGUAGE_FWD)
        frozen = replace(config, freeze_vision=True)
        assert step_flops(frozen, SEQ, SAMPLES, NATIVE_GRIDS) == vision + 3 * LANGUAGE_FWD
        # One sample holding that image and video, as --balance-vision-work weighs it (its grids, not
        # tiles of the tower's fixed length), padded to SEQ; frozen, the tower runs once.
        cost = sample_cost(SampleLayout((1,), 40, tuple(NATIVE_GRIDS)), tower_tokens=None)
        assert cost.vision == (24, 32)
        assert sample_flops(config, cost, padded_length=SEQ) == 3 * (vision + SEQ * LM_TOKEN)
        assert sample_flops(frozen, cost, padded_length=SEQ) == vision + 3 * SEQ * LM_TOKEN
    with pytest.raises(TypeError, match="a qwen2_vl tower counts grids of its images and videos"):
        step_flops(llava_config(vision=native_vision_config()), SEQ, SAMPLES, IMAGES)
    with pytest.raises(ValueError, match="a native-resolution sample .* weighed as tiles of 17 tokens"):
        sample_cost(SampleLayout((1,), 40, tuple(NATIVE_GRIDS)), tower_tokens=17)
    with pytest.raises(TypeError, match="a clip tower counts its tower inputs"):
        step_flops(llava_config(), SEQ, SAMPLES, NATIVE_GRIDS)


def test_peak_tflops_table_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flag wins; fp32 and CPU runs have no default peak; GPUs match the most specific name first."""
    cuda = torch.device("cuda", 0)
    assert peak_tflops(torch.device("cpu"), 123.0, half_precision=False) == 123.0
    assert peak_tflops(torch.device("cpu"), None, half_precision=True) is None
    assert peak_tflops(cuda, None, half_precision=False) is None
    names = {
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA H100 80GB HBM3": 989.0,
        "NVIDIA H200": 989.0,
        "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA L40S": 362.0,
        "NVIDIA L40": 181.0,
        "NVIDIA A10G": 125.0,
        "NVIDIA L4": 121.0,
        "Some Future GPU": None,
    }
    for name, expected in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device, name=name: name)
        assert peak_tflops(cuda, None, half_precision=True) == expected, name


def test_log_line_mfu_and_throughput_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """The log line's tokens/s, TFLOP/s/device and MFU for a simulated dp=2 run.

    Each of the 2 ranks logged 2 steps in 3.0 s holding 4 rows and 3 images: per step 2 x 4 / 2 = 4 rows
    and 2 x 3 / 2 = 3 images, 1.5 s. The step's FLOPs are the hand figure 100198656 (all trained), of
    which each rank counted its half in each of the 2 steps (`IntervalStats.flops` = 100198656);
    per device and second: 100198656 / 1.5 / 2 = 33399552 FLOP/s = 3.3399552e-5 TFLOP/s; with a peak of
    1e-4 TFLOP/s the MFU is 33.4%. Tokens/s: 4 rows x 48 tokens / 1.5 s = 128.
    """
    monkeypatch.setattr(train_module, "_sum_dp", lambda value, state: 2 * value)  # 2 identical dp ranks
    monkeypatch.setattr(train_module, "gather_step_times", lambda seconds, state: [seconds, seconds])
    config = RunConfig(model=llava_config(), training=TrainingConfig(seq_length=SEQ, peak_tflops=1e-4,
                                                                     global_batch_size=8, train_iters=10))
    state = SimpleNamespace(world_size=2, device=torch.device("cpu"))
    trainer = SimpleNamespace(config=config, state=state, model=SimpleNamespace(config=config.model))
    stats = train_module.IntervalStats(steps=2, loss_sum=9.0, loss_steps=2, seconds=3.0, flops=100198656, rows=4,
                                       grad_norms=[0.5])
    lines: list[str] = []
    scalars: dict[str, float] = {}
    reporter = SimpleNamespace(line=lines.append, scalars=lambda _iteration, values: scalars.update(values))
    train_module._log(reporter, trainer, 2, 16, stats, 0, 1e-3)
    (line,) = lines
    assert "consumed samples:         16 |" in line, line
    assert "tokens/s: 128 |" in line and "MFU: 33.4% |" in line, line
    assert "lm loss: 4.500000E+00" in line and "elapsed time per iteration (ms): 1500.0" in line, line
    assert scalars["tokens-per-second"] == pytest.approx(128.0, rel=1e-12)
    assert scalars["tflops-per-device"] == pytest.approx(100198656 / 1.5 / 2 / 1e12, rel=1e-12)
