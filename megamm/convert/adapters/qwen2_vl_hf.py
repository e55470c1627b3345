"""Qwen2VLForConditionalGeneration: the Qwen2-VL native-resolution tower (its patch merger is the
projector) and a Qwen2 language model with M-RoPE, in one directory. Qwen2.5-VL's directory has the
same layout (megamm.convert.adapters.qwen2_5_vl_hf builds this adapter for its tower family).

Key spellings read:
  published checkpoints, transformers < 4.52   visual.*, model.*, lm_head.*
  transformers >= 4.52 (5.x in memory)         model.visual.*, model.language_model.*, lm_head.*
The export writes the first (every transformers version loads it; 5.x renames on load) or the
installed version's own. Canonical names: "vision." + the key inside `visual`, "text." + the key
inside the text model, "text.lm_head.weight".

Refused on import: whatever the Qwen2 decoder family refuses (sliding windows, scaled rope), a
merger width other than the text width; on export, a tower or language model without this form.
"""

from __future__ import annotations

from typing import Any

import torch

from megamm.config import LlavaConfig
from megamm.convert.adapters.base import ExportAdapter
from megamm.convert.hf_config import HfExtras, architecture_config, check_token_id, raise_problems
from megamm.convert.hf_keys import installed_key_map, rename
from megamm.models.decoders import decoder_family
from megamm.models.towers.qwen2_vl import QWEN2_VL, NativeTowerFamily

PREFIXES = (
    ("model.visual.", "vision."),
    ("visual.", "vision."),
    ("model.language_model.", "text."),
    ("lm_head.", "text.lm_head."),
    ("model.", "text."),
)
# transformers' default when a config names no mrope_section (Qwen2VLRotaryEmbedding).
HF_DEFAULT_MROPE_SECTION = (16, 24, 24)
LANGUAGE_FAMILY = "qwen2"


class Qwen2VLHfAdapter(ExportAdapter):
    """The adapter of one Qwen2-VL-family architecture (`tower`: its vision tower family)."""

    LEGACY_PREFIXES = (("vision.", "visual."), ("text.lm_head.", "lm_head."), ("text.", "model."))

    def __init__(self, name: str, tower: NativeTowerFamily, architecture: str, text_model_type: str) -> None:
        self.name = name
        self.tower = tower
        self.architecture = architecture
        self.model_type = tower.hf_full_model_type
        self.text_model_type = text_model_type

    def canonical_name(self, key: str) -> str | None:
        return rename(key, PREFIXES)

    def config_from_hf(self, tree: dict, where: str) -> tuple[LlavaConfig, HfExtras]:
        """config.json of this architecture -> (LlavaConfig, extras)."""
        cfg = architecture_config(tree, where, self.model_type, self.architecture)
        problems: list[str] = []
        text = cfg.text_config
        language = decoder_family(LANGUAGE_FAMILY).config_from_hf(text, f"{where} text_config", problems)
        raise_problems(problems)
        vision = self.tower.config_from_hf(cfg)
        rope = getattr(text, "rope_parameters", None) or {}
        language.mrope_section = tuple(int(n) for n in rope.get("mrope_section", HF_DEFAULT_MROPE_SECTION))
        language.image_token_id = int(cfg.image_token_id)
        language.video_token_id = int(cfg.video_token_id)
        language.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        for token in ("image_token_id", "video_token_id"):
            check_token_id(token, getattr(cfg, token), language.vocab_size, where)
        extras = HfExtras.from_hf(text, {})
        extras.vision_start_token_id = getattr(cfg, "vision_start_token_id", None)
        extras.vision_end_token_id = getattr(cfg, "vision_end_token_id", None)
        return LlavaConfig(vision=vision, language=language, projector=None), extras

    # ---- export ---------------------------------------------------------------------------------

    def export_problems(self, config: LlavaConfig) -> list[str]:
        found = []
        if config.vision.family != self.tower.name:
            found.append(f"vision.family {config.vision.family!r}: {self.architecture} has a {self.tower.name} tower")
            return found
        if config.language.family != LANGUAGE_FAMILY:
            found.append(f"language.family {config.language.family!r}: {self.architecture} has a Qwen2 decoder")
        if config.language.mrope_section is None or config.language.video_token_id is None:
            found.append(f"language.mrope_section and language.video_token_id: {self.architecture} needs both")
        found += self.tower.problems(config.vision)
        return found + decoder_family(config.language.family).problems(config.language)

    def config_to_hf(self, config: LlavaConfig, extras: HfExtras, kept_aside: list[str]) -> dict:
        raise_problems(self.export_problems(config), f"the model cannot be written as {self.architecture}")
        language = config.language
        text: dict[str, Any] = decoder_family(LANGUAGE_FAMILY).config_to_hf(language, extras.to_dict())
        text.pop("architectures")
        text.pop("rope_theta")  # the text config reads rope_parameters only
        base = language.transformer.rotary_base
        text.update(model_type=self.text_model_type,
                    rope_parameters={"rope_type": "default", "rope_theta": base,
                                     "mrope_section": list(language.mrope_section)})
        return {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "image_token_id": language.image_token_id,
            "video_token_id": language.video_token_id,
            "vision_start_token_id": extras.vision_start_token_id,
            "vision_end_token_id": extras.vision_end_token_id,
            "tie_word_embeddings": language.tie_word_embeddings,
            "vision_config": self.tower.config_to_hf(config.vision),
            "text_config": text,
        }

    def installed_keys(self, hf_config: dict) -> dict[str, str]:
        return installed_key_map(self.architecture, self.model_type, hf_config, self.canonical_name)

    def export_fill(self, config: LlavaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return self.tower.export_fill(config.vision, dtype)


ADAPTER = Qwen2VLHfAdapter("qwen2-vl-hf", QWEN2_VL, "Qwen2VLForConditionalGeneration", "qwen2_vl_text")
