"""Hugging Face config.json <-> megamm's LlavaConfig.

Reading goes through transformers' own config classes (`AutoConfig.for_model`), because a saved
config.json usually lists only the fields that differ from the class defaults (llava-hf's text
config names little more than the vocabulary size): the defaults of the installed transformers are
the ones the file was written against. Both spellings of the rope base are read (`rope_theta`
before transformers 5, `rope_parameters` after).

Every field that changes the computation is either mapped or refused with a `ConversionError` that
names it; problems are collected and reported together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megamm.config import LanguageConfig, LlavaConfig, ProjectorConfig, TransformerConfig, VisionConfig
from megamm.convert import ConversionError

VISION_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
VISION_ACTIVATIONS_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
VISION_MODEL_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
TEXT_MODEL_TYPES = ("llama", "mistral")


@dataclass
class HfExtras:
    """Hugging Face fields megamm does not use but an export should give back."""

    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    vision_model_type: str = "clip_vision_model"
    text_model_type: str = "llama"
    sliding_window: int | None = None

    def to_dict(self) -> dict:
        return {"pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id, "vision_model_type": self.vision_model_type,
                "text_model_type": self.text_model_type, "sliding_window": self.sliding_window}

    @classmethod
    def from_dict(cls, tree: dict | None) -> HfExtras:
        tree = tree or {}
        known = {k: tree[k] for k in cls().to_dict() if k in tree}
        return cls(**known)


def _hf_config(tree: dict, where: str):
    """A transformers config object for `tree` (defaults filled in by the installed transformers)."""
    from transformers import AutoConfig

    tree = dict(tree)
    model_type = tree.pop("model_type", None)
    if model_type is None:
        raise ConversionError(f"{where}: no model_type, so the architecture is unknown")
    for key in ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"):
        tree.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **tree)
    except (ValueError, KeyError) as error:
        raise ConversionError(f"{where}: unsupported architecture {model_type!r} ({error})") from error


def _rope_theta(cfg: Any, where: str, problems: list[str]) -> float:
    params = getattr(cfg, "rope_parameters", None)
    scaling = getattr(cfg, "rope_scaling", None)
    if isinstance(params, dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    else:
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        theta = getattr(cfg, "rope_theta", 10000.0)
    if rope_type != "default":
        problems.append(f"{where}: rope scaling {rope_type!r} is not implemented by megamm's rotary embedding")
    return float(theta)


def vision_config_from_hf(tree: dict, select_layer: int, keep_class_token: bool, where: str) -> tuple[VisionConfig, str]:
    """A CLIP/SigLIP vision config (or a full CLIP/SigLIP model's, whose vision part is used) ->
    (VisionConfig, the Hugging Face vision model type)."""
    model_type = tree.get("model_type")
    if model_type in VISION_MODEL_TYPES:
        sub = dict(tree.get("vision_config") or {})
        sub["model_type"] = VISION_MODEL_TYPES[model_type]
        tree, where = sub, f"{where} vision_config"
    model_type = tree.get("model_type")
    if model_type not in VISION_MODEL_TYPES.values():
        raise ConversionError(
            f"{where}: unsupported vision architecture {model_type!r}; supported: "
            f"{', '.join(sorted(VISION_MODEL_TYPES.values()))} (or a full clip / siglip model)"
        )
    cfg = _hf_config(tree, where)
    problems: list[str] = []
    activation = VISION_ACTIVATIONS.get(cfg.hidden_act)
    if activation is None:
        problems.append(f"{where}: hidden_act {cfg.hidden_act!r} has no megamm equivalent "
                        f"({', '.join(sorted(VISION_ACTIVATIONS))})")
    clip = model_type == "clip_vision_model"
    if not clip and not keep_class_token:
        problems.append(f"{where}: vision_feature_select_strategy 'default' drops the first token, but a SigLIP "
                        f"tower has no class token (it would drop a patch); use 'full'")
    if problems:
        raise ConversionError(problems[0] if len(problems) == 1 else "; ".join(problems))
    transformer = TransformerConfig(
        hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size, normalization="layernorm", norm_epsilon=float(cfg.layer_norm_eps),
        activation=activation, add_bias_linear=True, position_embedding="learned",
        max_position_embeddings=(cfg.image_size // cfg.patch_size) ** 2 + int(clip), causal=False,
        attention_dropout=float(getattr(cfg, "attention_dropout", 0.0)),
    )
    config = VisionConfig(
        transformer=transformer, image_size=cfg.image_size, patch_size=cfg.patch_size,
        num_channels=cfg.num_channels, class_token=clip, pre_norm=clip, patch_bias=not clip,
        select_layer=select_layer, drop_class_token=not keep_class_token,
    )
    return config, model_type


def language_config_from_hf(tree: dict, where: str) -> tuple[LanguageConfig, HfExtras]:
    """A LLaMA/Mistral causal-LM config -> LanguageConfig (image_token_id still to be set)."""
    model_type = tree.get("model_type")
    if model_type not in TEXT_MODEL_TYPES:
        raise ConversionError(f"{where}: unsupported language architecture {model_type!r}; supported: "
                              f"{', '.join(TEXT_MODEL_TYPES)}")
    cfg = _hf_config(tree, where)
    problems: list[str] = []
    if cfg.hidden_act != "silu":
        problems.append(f"{where}: hidden_act {cfg.hidden_act!r}: megamm's decoder MLP is SwiGLU (silu) only")
    attention_bias, mlp_bias = bool(getattr(cfg, "attention_bias", False)), bool(getattr(cfg, "mlp_bias", False))
    if attention_bias != mlp_bias:
        problems.append(f"{where}: attention_bias={attention_bias} with mlp_bias={mlp_bias}: megamm has biases on "
                        f"all linear layers or none")
    sliding = getattr(cfg, "sliding_window", None)
    if sliding is not None and sliding < cfg.max_position_embeddings:
        problems.append(f"{where}: sliding_window {sliding} < max_position_embeddings {cfg.max_position_embeddings}: "
                        f"megamm has no sliding-window attention")
    theta = _rope_theta(cfg, where, problems)
    if problems:
        raise ConversionError("; ".join(problems))
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    transformer = TransformerConfig(
        hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_attention_heads=heads,
        num_query_groups=getattr(cfg, "num_key_value_heads", None) or heads,
        kv_channels=None if head_dim * heads == cfg.hidden_size else head_dim,
        ffn_hidden_size=cfg.intermediate_size, normalization="rmsnorm", norm_epsilon=float(cfg.rms_norm_eps),
        activation="swiglu", add_bias_linear=attention_bias, position_embedding="rope", rotary_base=theta,
        max_position_embeddings=cfg.max_position_embeddings, causal=True,
        attention_dropout=float(getattr(cfg, "attention_dropout", 0.0)),
    )
    language = LanguageConfig(
        transformer=transformer, vocab_size=cfg.vocab_size, make_vocab_size_divisible_by=128,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), image_token_id=0,
    )
    extras = HfExtras(pad_token_id=getattr(cfg, "pad_token_id", None), bos_token_id=getattr(cfg, "bos_token_id", None),
                      eos_token_id=getattr(cfg, "eos_token_id", None), text_model_type=model_type, sliding_window=sliding)
    return language, extras


def llava_config_from_hf(tree: dict, where: str) -> tuple[LlavaConfig, HfExtras]:
    """A llava-hf LlavaForConditionalGeneration config.json -> (LlavaConfig, extras)."""
    if tree.get("model_type") != "llava":
        raise ConversionError(f"{where}: model_type {tree.get('model_type')!r} is not 'llava' "
                              f"(LlavaForConditionalGeneration)")
    cfg = _hf_config(tree, where)
    problems = []
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        problems.append(f"{where}: vision_feature_layer {layer!r}: megamm feeds the projector one hidden state, "
                        f"not a concatenation of several layers")
    if cfg.projector_hidden_act != "gelu":
        problems.append(f"{where}: projector_hidden_act {cfg.projector_hidden_act!r}: megamm's mlp2x_gelu uses "
                        f"exact (erf) GELU only")
    strategy = cfg.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        problems.append(f"{where}: unknown vision_feature_select_strategy {strategy!r}")
    if problems:
        raise ConversionError("; ".join(problems))
    vision, vision_type = vision_config_from_hf(cfg.vision_config.to_dict(), layer, strategy == "full",
                                                f"{where} vision_config")
    language, extras = language_config_from_hf(cfg.text_config.to_dict(), f"{where} text_config")
    image_token = getattr(cfg, "image_token_index", None)
    if image_token is None:
        image_token = cfg.image_token_id
    if not 0 <= image_token < language.vocab_size:
        raise ConversionError(f"{where}: image_token_index {image_token} is outside the text vocabulary "
                              f"of {language.vocab_size} tokens (mismatched vocab)")
    language.image_token_id = image_token
    language.tie_word_embeddings = bool(cfg.text_config.tie_word_embeddings or tree.get("tie_word_embeddings", False))
    if tree.get("pad_token_id") is not None:
        extras.pad_token_id = tree["pad_token_id"]
    extras.vision_model_type = vision_type
    projector = ProjectorConfig(type="mlp2x_gelu", add_bias=bool(cfg.multimodal_projector_bias))
    return LlavaConfig(vision=vision, language=language, projector=projector), extras


ORIGINAL_LLAVA_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral", "llava": "llama"}


def original_llava_config(tree: dict, where: str) -> tuple[LanguageConfig, HfExtras, ProjectorConfig, int, bool]:
    """An original LLaVA (LlavaLlamaForCausalLM) config.json -> (language config, extras, projector,
    vision select layer, keep the class token)."""
    model_type = tree.get("model_type")
    if model_type not in ORIGINAL_LLAVA_TYPES:
        raise ConversionError(f"{where}: model_type {model_type!r} is not an original LLaVA model "
                              f"({', '.join(ORIGINAL_LLAVA_TYPES)})")
    problems = []
    projector_type = tree.get("mm_projector_type", "linear")
    if projector_type not in ("linear", "mlp2x_gelu"):
        problems.append(f"{where}: mm_projector_type {projector_type!r}: megamm has linear and mlp2x_gelu")
    feature = tree.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        problems.append(f"{where}: mm_vision_select_feature {feature!r}: expected patch or cls_patch")
    if tree.get("image_aspect_ratio") == "anyres" or tree.get("mm_patch_merge_type", "flat") != "flat":
        problems.append(f"{where}: any-resolution tiling (LLaVA-NeXT) is not part of this model")
    if problems:
        raise ConversionError("; ".join(problems))
    text = {k: v for k, v in tree.items() if not k.startswith("mm_")}
    text["model_type"] = ORIGINAL_LLAVA_TYPES[model_type]
    language, extras = language_config_from_hf(text, where)
    projector = ProjectorConfig(type=projector_type, add_bias=True)
    return language, extras, projector, int(tree.get("mm_vision_select_layer", -2)), feature == "cls_patch"


# ---- export -------------------------------------------------------------------------------------


def _export_problems(config: LlavaConfig) -> list[str]:
    v, t, lang = config.vision, config.vision.transformer, config.language.transformer
    found = []
    if config.projector.type != "mlp2x_gelu":
        found.append(f"projector.type {config.projector.type!r}: LlavaForConditionalGeneration has a two-layer "
                     f"GELU projector only (mlp2x_gelu)")
    if config.projector.pixel_shuffle:
        found.append("projector.pixel_shuffle: LlavaForConditionalGeneration does not merge patches")
    clip_like = v.class_token and v.pre_norm and not v.patch_bias
    siglip_like = not v.class_token and not v.pre_norm and v.patch_bias
    if not (clip_like or siglip_like):
        found.append(f"vision tower (class_token={v.class_token}, pre_norm={v.pre_norm}, patch_bias={v.patch_bias}) "
                     f"is neither CLIP (True, True, False) nor SigLIP (False, False, True)")
    if t.normalization != "layernorm" or not t.add_bias_linear or t.activation == "swiglu":
        found.append("vision.transformer: a Hugging Face ViT has LayerNorm, biased linears and an elementwise activation")
    if t.num_query_groups not in (None, t.num_attention_heads) or t.kv_channels not in (None, t.hidden_size // t.num_attention_heads):
        found.append("vision.transformer: GQA or a custom head dimension has no CLIP/SigLIP equivalent")
    if lang.normalization != "rmsnorm" or lang.activation != "swiglu":
        found.append("language.transformer: LLaMA/Mistral need rmsnorm and swiglu")
    if lang.add_qkv_bias and not lang.add_bias_linear:
        found.append("language.transformer.add_qkv_bias: LLaMA biases q, k, v and o together (attention_bias)")
    return found


def hf_config_from_llava(config: LlavaConfig, extras: HfExtras) -> dict:
    """LlavaConfig -> a llava-hf config.json tree (raises ConversionError if it has no HF form)."""
    problems = _export_problems(config)
    if problems:
        raise ConversionError("the model cannot be written as LlavaForConditionalGeneration:\n  - "
                              + "\n  - ".join(problems))
    v, vt = config.vision, config.vision.transformer
    lang, lt = config.language, config.language.transformer
    vision = {
        "model_type": "clip_vision_model" if v.class_token else "siglip_vision_model",
        "hidden_size": vt.hidden_size, "intermediate_size": vt.ffn_hidden_size,
        "num_hidden_layers": vt.num_layers, "num_attention_heads": vt.num_attention_heads,
        "num_channels": v.num_channels, "image_size": v.image_size, "patch_size": v.patch_size,
        "hidden_act": VISION_ACTIVATIONS_TO_HF[vt.activation], "layer_norm_eps": vt.norm_epsilon,
        "attention_dropout": vt.attention_dropout,
    }
    if vision["model_type"] == "siglip_vision_model":
        vision["vision_use_head"] = False
    text_type = extras.text_model_type if extras.text_model_type in TEXT_MODEL_TYPES else "llama"
    text = {
        "model_type": text_type, "architectures": ["MistralForCausalLM" if text_type == "mistral" else "LlamaForCausalLM"],
        "vocab_size": lang.vocab_size, "hidden_size": lt.hidden_size, "intermediate_size": lt.ffn_hidden_size,
        "num_hidden_layers": lt.num_layers, "num_attention_heads": lt.num_attention_heads,
        "num_key_value_heads": lt.query_groups, "head_dim": lt.head_dim, "hidden_act": "silu",
        "max_position_embeddings": lt.max_position_embeddings, "rms_norm_eps": lt.norm_epsilon,
        # Both spellings: transformers < 5 reads rope_theta, >= 5 rope_parameters.
        "rope_theta": lt.rotary_base, "rope_parameters": {"rope_type": "default", "rope_theta": lt.rotary_base},
        "tie_word_embeddings": lang.tie_word_embeddings, "attention_dropout": lt.attention_dropout,
        "pad_token_id": extras.pad_token_id, "bos_token_id": extras.bos_token_id, "eos_token_id": extras.eos_token_id,
    }
    if text_type == "llama":
        text.update(attention_bias=lt.add_bias_linear, mlp_bias=lt.add_bias_linear)
    else:
        if lt.add_bias_linear:
            raise ConversionError("language.transformer.add_bias_linear: Mistral has no linear biases")
        text["sliding_window"] = extras.sliding_window
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": lang.image_token_id,
        "image_seq_length": config.image_tokens_per_image,
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "full" if (not v.class_token or not v.drop_class_token) else "default",
        "vision_feature_layer": v.select_layer,
        "multimodal_projector_bias": config.projector.add_bias,
        "tie_word_embeddings": lang.tie_word_embeddings,
        "pad_token_id": extras.pad_token_id,
        "vision_config": vision,
        "text_config": text,
    }
