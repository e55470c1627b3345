"""llava-hf's LlavaForConditionalGeneration: a vision tower family, the mlp2x_gelu projector and a
language-model family, in one directory.

Key spellings read:
  transformers < 4.52   language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*,
                        multi_modal_projector.*
  transformers >= 4.52  model.language_model.*, lm_head.*, model.vision_tower.[vision_model.]*,
                        model.multi_modal_projector.*  (transformers 5 dropped "vision_model.")
The export writes the first (every transformers version loads it) or the installed version's own.

Refused: several feature layers concatenated, a projector activation other than exact GELU, an
unknown feature strategy; on export, a projector other than mlp2x_gelu, pixel shuffle, and whatever
the tower or language family refuses.
"""

from __future__ import annotations

import torch

from megamm.config import LlavaConfig, ProjectorConfig
from megamm.convert.adapters.base import ExportAdapter
from megamm.convert.adapters.causal_lm import language_config_from_hf
from megamm.convert.adapters.vision_tower import vision_config_from_hf
from megamm.convert.hf_config import (
    HfExtras,
    architecture_config,
    check_token_id,
    feature_problems,
    raise_problems,
)
from megamm.convert.hf_keys import installed_key_map, rename
from megamm.models.decoders import decoder_family
from megamm.models.towers import tower_family

PREFIXES = (
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("language_model.lm_head.", "text.lm_head."),
    ("lm_head.", "text.lm_head."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
)


class LlavaHfAdapter(ExportAdapter):
    name = "llava-hf"
    # config.json's model_type and the transformers class (LLaVA-NeXT subclasses this adapter).
    model_type = "llava"
    architecture = "LlavaForConditionalGeneration"
    LEGACY_PREFIXES = (("text.lm_head.", "language_model.lm_head."), ("text.", "language_model.model."),
                       ("vision.", "vision_tower.vision_model."), ("projector.", "multi_modal_projector."))

    def canonical_name(self, key: str) -> str | None:
        return rename(key, PREFIXES)

    def config_from_hf(self, tree: dict, where: str) -> tuple[LlavaConfig, HfExtras]:
        """config.json of a LlavaForConditionalGeneration -> (LlavaConfig, extras)."""
        cfg = architecture_config(tree, where, self.model_type, self.architecture)
        raise_problems(feature_problems(cfg, where, "megamm's mlp2x_gelu"))
        vision = vision_config_from_hf(cfg.vision_config.to_dict(), cfg.vision_feature_layer,
                                       cfg.vision_feature_select_strategy == "full", f"{where} vision_config")
        language, extras = language_config_from_hf(cfg.text_config.to_dict(), f"{where} text_config")
        image_token = getattr(cfg, "image_token_index", None)
        if image_token is None:
            image_token = cfg.image_token_id
        check_token_id("image_token_index", image_token, language.vocab_size, where)
        language.image_token_id = image_token
        language.tie_word_embeddings = bool(cfg.text_config.tie_word_embeddings or tree.get("tie_word_embeddings"))
        if tree.get("pad_token_id") is not None:
            extras.pad_token_id = tree["pad_token_id"]
        projector = ProjectorConfig(type="mlp2x_gelu", add_bias=bool(cfg.multimodal_projector_bias))
        return LlavaConfig(vision=vision, language=language, projector=projector), extras

    # ---- export ---------------------------------------------------------------------------------

    def export_problems(self, config: LlavaConfig) -> list[str]:
        if config.vision.native_resolution is not None or config.projector is None:
            return [(f"vision.family {config.vision.family!r}: LlavaForConditionalGeneration holds a fixed-size ViT "
                    f"and a projector; a native-resolution model exports as qwen2-vl-hf / qwen2.5-vl-hf")]
        found = self.layout_problems(config)
        if config.projector.type != "mlp2x_gelu":
            found.append(f"projector.type {config.projector.type!r}: LlavaForConditionalGeneration has a two-layer "
                         f"GELU projector only (mlp2x_gelu)")
        if config.projector.pixel_shuffle:
            found.append("projector.pixel_shuffle: LlavaForConditionalGeneration does not merge patches")
        found += tower_family(config.vision.family).problems(config.vision)
        return found + decoder_family(config.language.family).problems(config.language)

    def layout_problems(self, config: LlavaConfig) -> list[str]:
        """What the image layout asks of the architecture (LLaVA: one tile per image)."""
        if config.anyres is not None:
            return ["anyres: LlavaForConditionalGeneration has no any-resolution tiling; export as llava-next-hf"]
        return []

    def config_to_hf(self, config: LlavaConfig, extras: HfExtras, kept_aside: list[str]) -> dict:
        raise_problems(self.export_problems(config), f"the model cannot be written as {self.architecture}")
        v, lang = config.vision, config.language
        return {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "image_token_index": lang.image_token_id,
            "image_seq_length": config.tile_tokens,
            "projector_hidden_act": "gelu",
            "vision_feature_select_strategy": "full" if (not v.class_token or not v.drop_class_token) else "default",
            "vision_feature_layer": v.select_layer,
            "multimodal_projector_bias": config.projector.add_bias,
            "tie_word_embeddings": lang.tie_word_embeddings,
            "pad_token_id": extras.pad_token_id,
            "vision_config": tower_family(v.family).config_to_hf(v, kept_aside),
            "text_config": decoder_family(lang.family).config_to_hf(lang, extras.to_dict()),
        }

    def installed_keys(self, hf_config: dict) -> dict[str, str]:
        return installed_key_map(self.architecture, self.model_type, hf_config, self.canonical_name)

    def export_fill(self, config: LlavaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return tower_family(config.vision.family).export_fill(config.vision, dtype)


ADAPTER = LlavaHfAdapter()
