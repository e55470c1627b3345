"""llava-hf's LlavaOnevisionForConditionalGeneration (LLaVA-OneVision, images): LLaVA-NeXT's layout
(megamm.convert.adapters.llava_next_hf) with `vision_aspect_ratio` `anyres_max_N`, the limit past
which an image's unpadded tile features are downsampled bilinearly (`AnyResConfig.max_num_patches`).

Usually a SigLIP tower with the `full` feature strategy and a Qwen2 language model; any tower and
language family llava-hf takes is read. `video_token_index` is `language.video_token_id`: the model
runs this family's videos (frames pooled 2x, megamm.models.anyres). The processor's multi-image rule
(each image of a sample holding several is one padded-square tile, its features and one newline)
is `anyres.single_tile_multi_image`, set on import and required on export.
"""

from __future__ import annotations

import re

from megamm.config import LlavaConfig
from megamm.convert import ConversionError
from megamm.convert.adapters.llava_next_hf import LlavaNextHfAdapter
from megamm.convert.hf_config import HfExtras, hf_config

ANYRES_MAX = re.compile(r"anyres_max_(\d+)")


class LlavaOnevisionHfAdapter(LlavaNextHfAdapter):
    name = "llava-onevision-hf"
    model_type = "llava_onevision"
    architecture = "LlavaOnevisionForConditionalGeneration"
    single_tile_multi_image = True

    def config_from_hf(self, tree: dict, where: str) -> tuple[LlavaConfig, HfExtras]:
        """config.json of a LlavaOnevisionForConditionalGeneration -> (LlavaConfig with `anyres` and its
        `max_num_patches` and the video token, the extras)."""
        config, extras = super().config_from_hf(tree, where)
        cfg = hf_config(tree, where)
        match = ANYRES_MAX.fullmatch(str(cfg.vision_aspect_ratio))
        if match is None:
            raise ConversionError(f"{where}: vision_aspect_ratio {cfg.vision_aspect_ratio!r}: megamm reads "
                                  f"'anyres_max_<N>' only")
        config.anyres.max_num_patches = int(match.group(1))
        config.language.video_token_id = cfg.video_token_index
        return config, extras

    def layout_problems(self, config: LlavaConfig) -> list[str]:
        found = super().layout_problems(config)
        if config.anyres is not None and config.anyres.max_num_patches is None:
            found.append(f"anyres.max_num_patches: {self.architecture} limits every image to anyres_max_N "
                         f"features; set it (export an unlimited model as llava-next-hf)")
        return found

    def config_to_hf(self, config: LlavaConfig, extras: HfExtras, kept_aside: list[str]) -> dict:
        tree = super().config_to_hf(config, extras, kept_aside)
        tree["vision_aspect_ratio"] = f"anyres_max_{config.anyres.max_num_patches}"
        if config.language.video_token_id is not None:
            tree["video_token_index"] = config.language.video_token_id
        return tree


ADAPTER = LlavaOnevisionHfAdapter()
