"""transformers' InternVLForConditionalGeneration: an InternViT tower, pixel shuffle (downsample ratio
0.5) with InternVL's projector (LayerNorm + two-layer GELU MLP) and a Qwen2 or Llama language model,
in one directory.

Key spellings read:
  published -hf checkpoints    language_model.model.*, language_model.lm_head.*, vision_tower.*,
                               multi_modal_projector.*   (transformers renames them on load)
  transformers in memory       model.language_model.*, lm_head.*, model.vision_tower.*,
                               model.multi_modal_projector.*
The export writes the first or the installed version's own. The projector's canonical names are
`projector.layer_norm.*` and `projector.linear_{1,2}.*`. Embeddings are tied when the top-level
`tie_word_embeddings` says so (the flag transformers' tying reads for this model).

Refused: a downsample ratio other than 0.5, several feature layers, the 'full' feature strategy, a
projector activation other than exact GELU, and whatever the tower or language family refuses.
"""

from __future__ import annotations

import torch

from megamm.config import LlavaConfig, ProjectorConfig
from megamm.config.model import PIXEL_SHUFFLE_BLOCK
from megamm.convert import ConversionError
from megamm.convert.adapters.base import ExportAdapter
from megamm.convert.adapters.causal_lm import language_config_from_hf
from megamm.convert.adapters.llava_hf import PREFIXES
from megamm.convert.hf_config import (
    HfExtras,
    architecture_config,
    check_token_id,
    feature_problems,
    raise_problems,
)
from megamm.convert.hf_keys import installed_key_map, rename
from megamm.models.decoders import decoder_family
from megamm.models.towers.internvit import INTERNVIT

# The one downsample ratio megamm's pixel shuffle has: a 2x2 block per token.
DOWNSAMPLE_RATIO = 1 / PIXEL_SHUFFLE_BLOCK
ARCHITECTURE = "InternVLForConditionalGeneration"
MODEL_TYPE = "internvl"


class InternVLHfAdapter(ExportAdapter):
    name = "internvl-hf"
    LEGACY_PREFIXES = (("text.lm_head.", "language_model.lm_head."), ("text.", "language_model.model."),
                       ("vision.", "vision_tower."), ("projector.", "multi_modal_projector."))

    def canonical_name(self, key: str) -> str | None:
        return rename(key, PREFIXES)

    def config_from_hf(self, tree: dict, where: str) -> tuple[LlavaConfig, HfExtras]:
        """config.json of an InternVLForConditionalGeneration -> (LlavaConfig, extras)."""
        cfg = architecture_config(tree, where, MODEL_TYPE, ARCHITECTURE)
        problems = feature_problems(cfg, where, "megamm's InternVL projector")
        if cfg.downsample_ratio != DOWNSAMPLE_RATIO:
            problems.append(f"{where}: downsample_ratio {cfg.downsample_ratio}: megamm's pixel shuffle merges "
                            f"{PIXEL_SHUFFLE_BLOCK}x{PIXEL_SHUFFLE_BLOCK} blocks (ratio {DOWNSAMPLE_RATIO}) only")
        layer = cfg.vision_feature_layer
        vision = INTERNVIT.config_from_hf(cfg.vision_config, layer if isinstance(layer, int) else -1,
                                          cfg.vision_feature_select_strategy == "full", f"{where} vision_config",
                                          problems)
        raise_problems(problems)
        language, extras = language_config_from_hf(cfg.text_config.to_dict(), f"{where} text_config")
        check_token_id("image_token_id", cfg.image_token_id, language.vocab_size, where)
        language.image_token_id = int(cfg.image_token_id)
        language.tie_word_embeddings = bool(cfg.tie_word_embeddings)
        config = LlavaConfig(vision=vision, language=language,
                             projector=ProjectorConfig(type="internvl_mlp", pixel_shuffle=True, add_bias=True))
        if cfg.image_seq_length != config.image_tokens_per_image:
            raise ConversionError(f"{where}: image_seq_length {cfg.image_seq_length}, but the tower gives "
                                  f"{config.image_tokens_per_image} tokens per tile ((image_size / patch_size)^2 / 4)")
        return config, extras

    # ---- export ---------------------------------------------------------------------------------

    def export_problems(self, config: LlavaConfig) -> list[str]:
        if config.vision.family != INTERNVIT.name:
            return [f"vision.family {config.vision.family!r}: {ARCHITECTURE} has an {INTERNVIT.name} tower"]
        found = []
        projector = config.projector
        if projector is None or projector.type != "internvl_mlp" or not projector.pixel_shuffle or not projector.add_bias:
            found.append(f"projector: {ARCHITECTURE} has pixel shuffle and the biased internvl_mlp projector")
        found += INTERNVIT.problems(config.vision)
        return found + decoder_family(config.language.family).problems(config.language)

    def config_to_hf(self, config: LlavaConfig, extras: HfExtras, kept_aside: list[str]) -> dict:
        raise_problems(self.export_problems(config), f"the model cannot be written as {ARCHITECTURE}")
        v, lang = config.vision, config.language
        text = decoder_family(lang.family).config_to_hf(lang, extras.to_dict())
        text.pop("architectures", None)
        return {
            "model_type": MODEL_TYPE,
            "architectures": [ARCHITECTURE],
            "image_token_id": lang.image_token_id,
            "image_seq_length": config.image_tokens_per_image,
            "downsample_ratio": DOWNSAMPLE_RATIO,
            "projector_hidden_act": "gelu",
            "vision_feature_select_strategy": "default",
            "vision_feature_layer": v.select_layer,
            "tie_word_embeddings": lang.tie_word_embeddings,
            "vision_config": INTERNVIT.config_to_hf(v, kept_aside),
            "text_config": text,
        }

    def installed_keys(self, hf_config: dict) -> dict[str, str]:
        return installed_key_map(ARCHITECTURE, MODEL_TYPE, hf_config, self.canonical_name)

    def export_fill(self, config: LlavaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return INTERNVIT.export_fill(config.vision, dtype)


ADAPTER = InternVLHfAdapter()
