"""llava-hf's LlavaNextForConditionalGeneration (LLaVA-1.6 / LLaVA-NeXT): llava-hf's layout plus the
any-resolution tiling (`image_grid_pinpoints`, megamm.config.anyres) and the learned
`image_newline` vector (megamm.models.anyres).

Key spellings: those of llava-hf (megamm.convert.adapters.llava_hf), and `image_newline` at the top
level (transformers < 4.52) or `model.image_newline`; canonical name `image_newline`.

Refused: what llava-hf refuses, a feature strategy that keeps CLIP's class token ("full"), which
transformers cannot lay out as a patch grid either (SigLIP, without one, takes "full"), and a model
whose `anyres.single_tile_multi_image` differs from the architecture's processor (LlavaNextProcessor
tiles every image; LLaVA-OneVision's gives each image of a multi-image sample one tile).
"""

from __future__ import annotations

from megamm.config import LlavaConfig
from megamm.config.anyres import AnyResConfig
from megamm.convert.adapters.llava_hf import PREFIXES, LlavaHfAdapter
from megamm.convert.hf_config import HfExtras, hf_config
from megamm.convert.hf_keys import rename

NEWLINE = "image_newline"
NEXT_PREFIXES = (("model.image_newline", NEWLINE), ("image_newline", NEWLINE), *PREFIXES)


class LlavaNextHfAdapter(LlavaHfAdapter):
    name = "llava-next-hf"
    model_type = "llava_next"
    architecture = "LlavaNextForConditionalGeneration"
    LEGACY_PREFIXES = ((NEWLINE, NEWLINE), *LlavaHfAdapter.LEGACY_PREFIXES)
    # The architecture's multi-image rule (`AnyResConfig.single_tile_multi_image`), set on import.
    single_tile_multi_image = False

    def canonical_name(self, key: str) -> str | None:
        return rename(key, NEXT_PREFIXES)

    def config_from_hf(self, tree: dict, where: str) -> tuple[LlavaConfig, HfExtras]:
        """config.json of a LlavaNextForConditionalGeneration -> (LlavaConfig with `anyres`, extras)."""
        config, extras = super().config_from_hf(tree, where)
        pinpoints = hf_config(tree, where).image_grid_pinpoints
        config.anyres = AnyResConfig(tuple(tuple(int(v) for v in point) for point in pinpoints),
                                     single_tile_multi_image=self.single_tile_multi_image)
        return config, extras

    def layout_problems(self, config: LlavaConfig) -> list[str]:
        if config.anyres is None:
            return [(f"anyres: {self.architecture} tiles every image; the model has no anyres section "
                     f"(export it as llava-hf)")]
        if config.anyres.single_tile_multi_image != self.single_tile_multi_image:
            rule = ("gives each image of a multi-image sample one tile" if self.single_tile_multi_image
                    else "tiles every image")
            return [(f"anyres.single_tile_multi_image is {config.anyres.single_tile_multi_image}, but "
                     f"{self.architecture}'s processor {rule} (set it to {self.single_tile_multi_image})")]
        return []

    def config_to_hf(self, config: LlavaConfig, extras: HfExtras, kept_aside: list[str]) -> dict:
        tree = super().config_to_hf(config, extras, kept_aside)
        tree["image_grid_pinpoints"] = [list(point) for point in config.anyres.pinpoints]
        return tree


ADAPTER = LlavaNextHfAdapter()
