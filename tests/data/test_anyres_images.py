"""megamm.data.anyres_images and megamm.config.anyres against transformers' LLaVA-NeXT processing:
the same pixel values and tile counts as `LlavaNextImageProcessorPil` (Pillow's bicubic on the 8-bit
image, as megamm resizes; within float32 rounding of the rescale), the same tile count as the model's
`image_size_to_num_patches`, and the same image-token count as `LlavaNextProcessor` expands, on
images of several aspect ratios (wide, tall, square, thin, smaller and larger than every pinpoint).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from megamm.config.anyres import AnyResConfig, image_tokens, select_best_resolution, tiles_per_image
from megamm.data.anyres_images import preprocess_anyres
from megamm.models.towers.clip import CLIP

TILE, PATCH = 32, 8
PINPOINTS = [(32, 64), (64, 32), (64, 64), (96, 32), (32, 96)]
# (height, width)
SIZES = [(20, 50), (50, 20), (33, 33), (100, 30), (17, 90), (64, 64), (200, 120), (7, 61), (45, 31)]


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pil_processor() -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                      image_grid_pinpoints=[list(p) for p in PINPOINTS],
                                      image_mean=CLIP.image_mean, image_std=CLIP.image_std)


def test_pixels_and_tile_counts_match_transformers() -> None:
    processor = pil_processor()
    for seed, (height, width) in enumerate(SIZES):
        image = random_image(height, width, seed)
        tiles, size = preprocess_anyres(image, TILE, PINPOINTS, "clip")
        out = processor(images=[image], return_tensors="pt")
        assert size == (height, width) and out["image_sizes"].tolist() == [[height, width]]
        expected = out["pixel_values"][0]
        assert tiles.shape == expected.shape, (height, width)
        assert tiles.shape[0] == tiles_per_image(size, PINPOINTS, TILE)
        assert tiles.shape[0] == image_size_to_num_patches([height, width], [list(p) for p in PINPOINTS], TILE)
        torch.testing.assert_close(tiles, expected, rtol=0, atol=1e-6, msg=f"image {height}x{width}")


def test_best_resolution_matches_transformers() -> None:
    from transformers.image_processing_utils import select_best_resolution as reference

    pinpoints = AnyResConfig().pinpoints
    for size in [*SIZES, (336, 336), (480, 640), (1080, 1920), (1920, 1080), (300, 1000), (10, 2000)]:
        assert select_best_resolution(size, pinpoints) == tuple(reference(size, [list(p) for p in pinpoints]))


def test_image_token_counts_match_the_processor(tmp_path) -> None:
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast

    from tests.data_fixtures import write_qwen_tokenizer

    path = write_qwen_tokenizer(tmp_path / "tokenizer.json", ["a picture of it"], specials=("<image>",))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    processor = LlavaNextProcessor(image_processor=pil_processor(), tokenizer=tokenizer, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    for seed, (height, width) in enumerate(SIZES):
        out = processor(images=[random_image(height, width, seed)], text="<image> a picture", return_tensors="pt")
        expected = int((out["input_ids"] == image_id).sum())
        assert image_tokens((height, width), PINPOINTS, TILE, TILE // PATCH) == expected, (height, width)
