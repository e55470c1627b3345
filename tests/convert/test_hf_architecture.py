"""megamm's single-process modules compute what Hugging Face transformers computes, for the same weights.

Tiny fp32 models on the CPU with random weights: every Hugging Face parameter (norm weights and
biases included) is drawn at random, copied into megamm through an explicit name mapping, and the
outputs are compared number by number. Hugging Face runs its eager attention, an implementation
independent of megamm's `scaled_dot_product_attention`.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from megamm.config import LanguageConfig, TransformerConfig, VisionConfig
from megamm.config.constants import IGNORE_INDEX
from megamm.models.language import LanguageModel
from megamm.models.vision import VisionTower
from megamm.parallel.state import ParallelState

ATOL = 1e-5
RTOL = 1e-5

VOCAB = 101
HIDDEN = 64
HEADS = 4
GROUPS = 2
FFN = 96
LM_LAYERS = 2
ROPE_THETA = 500_000.0

VIT_HIDDEN = 48
VIT_HEADS = 4
VIT_FFN = 80
VIT_LAYERS = 3
IMAGE = 32
PATCH = 8


# ----------------------------------------------------------------------------------------------
# Helpers: random weights, key mapping, loading.
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Draw every parameter at random, norms and biases included, so a mis-mapped one shows."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        is_norm = re.search(r"(norm|layrnorm|layer_norm\d?)\.weight$", name) is not None
        if is_norm:
            param.copy_(1.0 + 0.2 * noise)
        elif param.dim() >= 2:
            fan_in = param[0].numel()
            param.copy_(noise * fan_in**-0.5)
        else:
            param.copy_(0.2 * noise)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop `prefix` from the keys that carry it (the nesting differs across transformers versions)."""
    return {key.removeprefix(prefix): value for key, value in state.items()}


def map_llama(state: dict[str, torch.Tensor], num_layers: int) -> tuple[dict[str, torch.Tensor], set[str]]:
    """LlamaForCausalLM name -> tensor into megamm LanguageModel name -> tensor, plus unused keys."""
    hf_state = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        return hf_state.pop(key)

    out["embedding.weight"] = take("model.embed_tokens.weight")
    for i in range(num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = src + "self_attn."
        out[dst + "self_attention.qkv.weight"] = torch.cat(
            [take(attn + "q_proj.weight"), take(attn + "k_proj.weight"), take(attn + "v_proj.weight")]
        )
        out[dst + "self_attention.proj.weight"] = take(attn + "o_proj.weight")
        out[dst + "mlp.fc1.weight"] = torch.cat(
            [take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")]
        )
        out[dst + "mlp.fc2.weight"] = take(src + "mlp.down_proj.weight")
        out[dst + "input_norm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "pre_mlp_norm.weight"] = take(src + "post_attention_layernorm.weight")
    out["final_norm.weight"] = take("model.norm.weight")
    out["output_layer.weight"] = take("lm_head.weight")
    return out, set(hf_state)


def map_vit(hf: nn.Module, num_layers: int) -> tuple[dict[str, torch.Tensor], set[str]]:
    """megamm VisionTower name -> tensor for a CLIP or SigLIP vision model, and the unused keys."""
    hf_state = _strip(dict(hf.state_dict()), "vision_model.")
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        return hf_state.pop(key)

    out["patch_embedding"] = take("embeddings.patch_embedding.weight")
    if "embeddings.patch_embedding.bias" in hf_state:
        out["patch_bias"] = take("embeddings.patch_embedding.bias")
    if "embeddings.class_embedding" in hf_state:
        out["class_embedding"] = take("embeddings.class_embedding")
    out["position_embedding"] = take("embeddings.position_embedding.weight")
    if "pre_layrnorm.weight" in hf_state:
        out["pre_norm.weight"] = take("pre_layrnorm.weight")
        out["pre_norm.bias"] = take("pre_layrnorm.bias")
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"encoder.layers.{i}."
        attn = src + "self_attn."
        for kind in ("weight", "bias"):
            out[dst + f"self_attention.qkv.{kind}"] = torch.cat(
                [take(attn + f"q_proj.{kind}"), take(attn + f"k_proj.{kind}"), take(attn + f"v_proj.{kind}")]
            )
            out[dst + f"self_attention.proj.{kind}"] = take(attn + f"out_proj.{kind}")
            out[dst + f"mlp.fc1.{kind}"] = take(src + f"mlp.fc1.{kind}")
            out[dst + f"mlp.fc2.{kind}"] = take(src + f"mlp.fc2.{kind}")
            out[dst + f"input_norm.{kind}"] = take(src + f"layer_norm1.{kind}")
            out[dst + f"pre_mlp_norm.{kind}"] = take(src + f"layer_norm2.{kind}")
    return out, set(hf_state)


@torch.no_grad()
def load_(model: nn.Module, weights: dict[str, torch.Tensor], seed: int = 0) -> None:
    """Copy `weights` into `model`; every parameter must be covered exactly.

    A parameter longer than its source along dim 0 (vocabulary padding) gets the source in its
    first rows and random values after them, so the padding is shown never to reach a result.
    """
    params = dict(model.named_parameters())
    assert set(params) == set(weights), (
        f"missing in the mapping: {sorted(set(params) - set(weights))}; "
        f"not in megamm: {sorted(set(weights) - set(params))}"
    )
    generator = torch.Generator().manual_seed(seed)
    for name, param in params.items():
        source = weights[name]
        rows = source.shape[0]
        assert param.shape[1:] == source.shape[1:] and param.shape[0] >= rows, (
            f"{name}: megamm {tuple(param.shape)} vs Hugging Face {tuple(source.shape)}"
        )
        param[:rows].copy_(source)
        if param.shape[0] > rows:
            param[rows:].copy_(torch.randn(param[rows:].shape, generator=generator))


# ----------------------------------------------------------------------------------------------
# Language model vs LlamaForCausalLM.
# ----------------------------------------------------------------------------------------------


def build_llama_pair(divisible_by: int) -> tuple[LanguageModel, LlamaForCausalLM]:
    """A megamm LanguageModel and a LlamaForCausalLM (GQA, rope_theta != 1e4) with equal weights."""
    hf_config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LM_LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=GROUPS,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    hf = LlamaForCausalLM(hf_config).eval()
    randomize_(hf, seed=1)
    config = LanguageConfig(
        transformer=TransformerConfig(
            hidden_size=HIDDEN,
            num_layers=LM_LAYERS,
            num_attention_heads=HEADS,
            num_query_groups=GROUPS,
            ffn_hidden_size=FFN,
            normalization="rmsnorm",
            norm_epsilon=1e-6,
            activation="swiglu",
            position_embedding="rope",
            rotary_base=ROPE_THETA,
            max_position_embeddings=64,
            causal=True,
        ),
        vocab_size=VOCAB,
        make_vocab_size_divisible_by=divisible_by,
        image_token_id=VOCAB - 1,
    )
    model = LanguageModel(config, ParallelState.single(), sequence_parallel=False).eval()
    weights, unused = map_llama(hf.state_dict(), LM_LAYERS)
    assert unused == set(), f"Hugging Face weights not mapped: {sorted(unused)}"
    load_(model, weights)
    return model, hf


def random_batch(seed: int, batch: int = 3, seq: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids `[b, s]` and HF-style labels (a copy of the ids) with some positions at -100."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    labels = input_ids.clone()
    labels[torch.rand((batch, seq), generator=generator) < 0.3] = IGNORE_INDEX
    labels[0, :4] = IGNORE_INDEX  # a prompt-like ignored prefix
    return input_ids, labels


def megamm_lm(model: LanguageModel, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    hidden = model.embed(input_ids).transpose(0, 1).contiguous()  # [s, b, h]
    return model(hidden, labels=labels, return_logits=True)


def test_llama_config_under_test_is_gqa_with_custom_rope() -> None:
    """The reference model really has GQA and rope_theta != 10000 (the cases the parity covers)."""
    model, hf = build_llama_pair(divisible_by=1)
    assert hf.config.num_key_value_heads < hf.config.num_attention_heads
    head_dim = HIDDEN // HEADS
    expected = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    torch.testing.assert_close(hf.model.rotary_emb.inv_freq.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(model.rotary.inv_freq.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("divisible_by", [1, 64], ids=["unpadded", "padded-vocab"])
def test_language_model_logits_match_llama(divisible_by: int) -> None:
    """Same logits as LlamaForCausalLM (GQA, rope_theta 5e5); padded vocab columns aside."""
    model, hf = build_llama_pair(divisible_by)
    input_ids, labels = random_batch(seed=2)
    with torch.no_grad():
        expected = hf(input_ids=input_ids).logits  # [b, s, V]
        out = megamm_lm(model, input_ids, labels)
    logits = out["logits"].transpose(0, 1)  # [b, s, V_pad]
    assert logits.shape[-1] == model.padded_vocab_size >= VOCAB
    if divisible_by == 1:
        assert logits.shape[-1] == VOCAB
    torch.testing.assert_close(logits[..., :VOCAB], expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("divisible_by", [1, 64], ids=["unpadded", "padded-vocab"])
def test_language_model_loss_matches_llama(divisible_by: int) -> None:
    """Per-token losses equal HF's next-token cross entropy, and their masked mean equals HF's loss.

    With a padded vocabulary the padding rows of the output layer hold random values: they must
    still be excluded from the softmax.
    """
    model, hf = build_llama_pair(divisible_by)
    input_ids, labels = random_batch(seed=3)
    with torch.no_grad():
        hf_out = hf(input_ids=input_ids, labels=labels)
        out = megamm_lm(model, input_ids, labels)

    loss, mask = out["loss"], out["loss_mask"]
    assert loss.shape == mask.shape == input_ids.shape
    targets = labels[:, 1:]
    torch.testing.assert_close(mask[:, :-1], targets != IGNORE_INDEX)
    assert not mask[:, -1].any()
    assert torch.all(loss[~mask] == 0)

    per_token = F.cross_entropy(
        hf_out.logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    torch.testing.assert_close(loss[:, :-1], per_token, rtol=RTOL, atol=ATOL)

    mean = loss[mask].sum() / mask.sum()
    torch.testing.assert_close(mean, hf_out.loss, rtol=RTOL, atol=ATOL)


def test_language_model_gradients_match_llama() -> None:
    """Backward through megamm's vocab-parallel loss gives HF's gradients for every weight."""
    model, hf = build_llama_pair(divisible_by=1)
    input_ids, labels = random_batch(seed=4)
    hf(input_ids=input_ids, labels=labels).loss.backward()
    out = megamm_lm(model, input_ids, labels)
    mask = out["loss_mask"]
    (out["loss"].sum() / mask.sum()).backward()

    expected, _ = map_llama({name: param.grad for name, param in hf.named_parameters()}, LM_LAYERS)
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(
            param.grad, expected[name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}"
        )


# ----------------------------------------------------------------------------------------------
# Vision tower vs CLIPVisionModel / SiglipVisionModel.
# ----------------------------------------------------------------------------------------------


def vit_transformer(activation: str, eps: float) -> TransformerConfig:
    return TransformerConfig(
        hidden_size=VIT_HIDDEN,
        num_layers=VIT_LAYERS,
        num_attention_heads=VIT_HEADS,
        ffn_hidden_size=VIT_FFN,
        normalization="layernorm",
        norm_epsilon=eps,
        activation=activation,
        add_bias_linear=True,
        position_embedding="learned",
        causal=False,
    )


def hf_vit_kwargs(activation: str, eps: float) -> dict:
    """The Hugging Face vision config fields shared by the CLIP and SigLIP references."""
    return {
        "hidden_size": VIT_HIDDEN,
        "intermediate_size": VIT_FFN,
        "num_hidden_layers": VIT_LAYERS,
        "num_attention_heads": VIT_HEADS,
        "image_size": IMAGE,
        "patch_size": PATCH,
        "hidden_act": activation,
        "layer_norm_eps": eps,
        "attn_implementation": "eager",
    }


def build_clip_pair(select_layer: int, drop_class_token: bool) -> tuple[VisionTower, CLIPVisionModel]:
    hf = CLIPVisionModel(CLIPVisionConfig(**hf_vit_kwargs("quick_gelu", 1e-5))).eval()
    randomize_(hf, seed=5)
    config = VisionConfig(
        transformer=vit_transformer("quick_gelu", 1e-5),
        image_size=IMAGE,
        patch_size=PATCH,
        class_token=True,
        pre_norm=True,
        select_layer=select_layer,
        drop_class_token=drop_class_token,
    )
    tower = VisionTower(config, ParallelState.single(), sequence_parallel=False).eval()
    weights, unused = map_vit(hf, VIT_LAYERS)
    assert unused == {"post_layernorm.weight", "post_layernorm.bias"}, sorted(unused)
    load_(tower, weights)
    return tower, hf


def random_pixels(seed: int, n: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, IMAGE, IMAGE), generator=generator)


@pytest.mark.parametrize(
    ("select_layer", "drop_class_token"),
    [(-2, True), (-1, False), (-2, False), (1, True)],
    ids=["penultimate-drop-cls", "last-keep-cls", "penultimate-keep-cls", "layer1-drop-cls"],
)
def test_vision_tower_matches_clip(select_layer: int, drop_class_token: bool) -> None:
    """The selected hidden state equals CLIP's `hidden_states[select_layer]` (class token dropped
    or kept), with megamm's output sequence-first."""
    tower, hf = build_clip_pair(select_layer, drop_class_token)
    pixels = random_pixels(seed=6)
    with torch.no_grad():
        hidden_states = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
        out = tower(pixels)
    assert len(hidden_states) == VIT_LAYERS + 1
    expected = hidden_states[select_layer]
    if drop_class_token:
        expected = expected[:, 1:]
    assert out.shape == (tower.config.output_tokens, pixels.shape[0], VIT_HIDDEN)
    torch.testing.assert_close(out.transpose(0, 1), expected, rtol=RTOL, atol=ATOL)


def build_siglip_pair() -> tuple[VisionTower, SiglipVisionModel]:
    hf = SiglipVisionModel(SiglipVisionConfig(**hf_vit_kwargs("gelu_pytorch_tanh", 1e-6))).eval()
    randomize_(hf, seed=7)
    config = VisionConfig(
        transformer=vit_transformer("gelu_tanh", 1e-6),
        image_size=IMAGE,
        patch_size=PATCH,
        class_token=False,
        pre_norm=False,
        patch_bias=True,
        select_layer=-2,
        drop_class_token=True,
    )
    tower = VisionTower(config, ParallelState.single(), sequence_parallel=False).eval()
    weights, unused = map_vit(hf, VIT_LAYERS)
    # The post-norm and the pooling head are not part of the LLaVA path.
    assert all(key.startswith(("post_layernorm.", "head.")) for key in unused), sorted(unused)
    load_(tower, weights)
    return tower, hf


def test_vision_tower_matches_siglip() -> None:
    """SigLIP-style (no class token, no pre-norm, patch bias, tanh GELU) matches
    SiglipVisionModel's `hidden_states[-2]`."""
    tower, hf = build_siglip_pair()
    pixels = random_pixels(seed=8)
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        out = tower(pixels)
    assert out.shape == (tower.config.num_patches, pixels.shape[0], VIT_HIDDEN)
    torch.testing.assert_close(out.transpose(0, 1), expected, rtol=RTOL, atol=ATOL)
