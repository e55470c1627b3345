"""InternVL data: tiles, pixel values, tile counts and input ids equal to transformers'
InternVLProcessor (GotOcr2's PIL image processor, crop_to_patches) with the InternVL -hf chat template,
on images of several aspect ratios; and NVLM-style tile tags (layout, counts, refusals).

The reference tokenizer is a byte-level BPE trained here with InternVL's special tokens, wrapped in
PreTrainedTokenizerFast with the processor's token attributes. The processor is built without its
video processor (its torchvision backend is not installed; images never use it).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from megamm.config.constants import IGNORE_INDEX
from megamm.data.images import choose_grid
from megamm.data.internvl_template import INTERNVL, THUMBNAIL_TAG, tile_tags
from megamm.data.samples import ImageSettings, SampleBuilder
from megamm.data.sources import Record
from megamm.data.templates import render
from megamm.data.tokenizer import Tokenizer, load_tokenizer
from megamm.models.towers.internvit import INTERNVIT
from tests.data_fixtures import write_qwen_tokenizer

transformers = pytest.importorskip("transformers")
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
            "<tile_1>", "<tile_2>", "<tile_3>", "<tile_4>", "<tile_5>", "<tile_6>", THUMBNAIL_TAG)
# The InternVL -hf checkpoints' chat template: ChatML, an image content part as "<IMG_CONTEXT>\n".
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = ["Describe both pictures. A red square and a blue bar.", "What is tall? The green tower.", "Yes."]
TILE, TOKENS_PER_TILE, MAX_TILES = 28, 4, 6
# (width, height): wide, tall, square and small, and 70x60 at 12 tiles, where float and exact ratios
# disagree (7/6 ties 1/1 and 4/3 exactly; in floats 4/3 is nearer).
SIZES = [(90, 40), (40, 100), (30, 30), (70, 60)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("internvl")
    tokenizer = write_qwen_tokenizer(root / "tokenizer.json", CORPUS, SPECIALS)
    rng = np.random.default_rng(0)
    images = []
    for number, (width, height) in enumerate(SIZES):
        path = root / f"image{number}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    return {"tokenizer": tokenizer, "images": images}


@pytest.fixture(scope="module")
def ours(files: dict) -> Tokenizer:
    return load_tokenizer(files["tokenizer"], image_token="<IMG_CONTEXT>", pad_token="<|endoftext|>")


class ImageOnlyInternVLProcessor(transformers.InternVLProcessor):
    """InternVLProcessor without its video processor (not installed: it needs torchvision)."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


def hf_processor(files: dict, max_tiles: int) -> transformers.InternVLProcessor:
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(files["tokenizer"]),
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    images = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                                      max_patches=max_tiles, image_mean=INTERNVIT.image_mean,
                                      image_std=INTERNVIT.image_std)
    return ImageOnlyInternVLProcessor(image_processor=images, tokenizer=tokenizer, image_seq_length=TOKENS_PER_TILE,
                                      chat_template=INTERNVL_CHAT_TEMPLATE)


def hf_messages(conversation: list[dict[str, str]]) -> list[dict]:
    """LLaVA turns -> messages; "<image>\\n" is an image content part (which the template writes so)."""
    roles = {"human": "user", "gpt": "assistant"}
    messages = []
    for turn in conversation:
        parts = [{"type": "image"} if chunk == "<image>\n" else {"type": "text", "text": chunk}
                 for chunk in re.split(r"(<image>\n)", turn["value"]) if chunk]
        messages.append({"role": roles[turn["from"]], "content": parts})
    return messages


def builder(tokenizer: Tokenizer, max_tiles: int, template=INTERNVL) -> SampleBuilder:
    settings = ImageSettings(TILE, "resize", "internvit", max_tiles, float_ratios=INTERNVIT.float_tile_ratios)
    return SampleBuilder(tokenizer, template, settings, TOKENS_PER_TILE, 4096)


def test_samples_equal_transformers_processor(files: dict, ours: Tokenizer) -> None:
    conversation = [
        {"from": "human", "value": "<image>\nDescribe both pictures.\n<image>\nWhat is tall?"},
        {"from": "gpt", "value": "A red square and a blue bar."},
        {"from": "human", "value": "<image>\nYes?"},
        {"from": "gpt", "value": "The green tower."},
    ]
    for images, max_tiles in ((files["images"][:3], MAX_TILES), (files["images"][1:], 12)):
        sample = builder(ours, max_tiles).build(Record("test", 0, "a", conversation, images))
        processor = hf_processor(files, max_tiles)
        text = processor.apply_chat_template(hf_messages(conversation), tokenize=False)
        expected = processor(text=[text], images=[Image.open(path).convert("RGB") for path in images],
                             return_tensors="pt")
        hf_tiles = [processor.image_processor.get_number_of_image_patches(
            *Image.open(path).size[::-1], {"max_patches": max_tiles}) for path in images]
        assert sample.tiles_per_image == hf_tiles and len(set(hf_tiles)) == len(hf_tiles)
        assert sample.input_ids == expected["input_ids"][0].tolist()
        assert sample.pixel_values.shape == expected["pixel_values"].shape
        torch.testing.assert_close(sample.pixel_values, expected["pixel_values"].float(), atol=1e-6, rtol=0)
        trained = [token for token, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE_INDEX]
        assert ours.decode(trained) == "A red square and a blue bar.<|im_end|>The green tower.<|im_end|>"
    # The tie the float rule breaks: transformers' 4x3 grid, not the exact rule's 2x2.
    assert choose_grid(70, 60, 12, tile_size=TILE, float_ratios=True) != choose_grid(70, 60, 12, tile_size=TILE)


def test_tile_tags_precede_each_tile(ours: Tokenizer) -> None:
    """Three tiles (2 + thumbnail) then one tile: each run of tile tokens follows its tag; the span
    covers tags and tokens, between <img> and </img>."""
    conversation = [{"from": "human", "value": "<image>\n<image>\nDescribe both pictures."},
                    {"from": "gpt", "value": "Yes."}]
    tagged = render(conversation, INTERNVL.with_tile_tags(TOKENS_PER_TILE), ours, [3 * TOKENS_PER_TILE, TOKENS_PER_TILE])
    plain = render(conversation, INTERNVL, ours, [3 * TOKENS_PER_TILE, TOKENS_PER_TILE])
    image, tile = ours.image_token_id, [ours.image_token_id] * TOKENS_PER_TILE
    tag = ours.token_id
    first = [tag("<img>"), tag("<tile_1>"), *tile, tag("<tile_2>"), *tile, tag(THUMBNAIL_TAG), *tile, tag("</img>")]
    second = [tag("<img>"), tag(THUMBNAIL_TAG), *tile, tag("</img>")]
    start = tagged.input_ids.index(tag("<img>"))
    assert tagged.input_ids[start:start + len(first)] == first
    assert tagged.input_ids[start + len(first) + 1:start + len(first) + 1 + len(second)] == second
    assert [tagged.input_ids[a:b].count(image) for a, b in tagged.image_spans] == [12, 4]
    assert [b - a for a, b in tagged.image_spans] == [15, 5]
    assert len(tagged.input_ids) == len(plain.input_ids) + 4 and tagged.labels.count(IGNORE_INDEX) == len(
        tagged.labels) - plain.num_trained
    assert tile_tags(1) == [THUMBNAIL_TAG] and tile_tags(3) == ["<tile_1>", "<tile_2>", THUMBNAIL_TAG]
    with pytest.raises(ValueError, match="not a whole number of tiles"):
        render(conversation, INTERNVL.with_tile_tags(TOKENS_PER_TILE), ours, [6, 4])


def test_tile_tags_in_samples_follow_the_tiles(files: dict, ours: Tokenizer) -> None:
    """The sample builder with tile tags: one tag per tower input, the thumbnail tag last."""
    conversation = [{"from": "human", "value": "<image>\nWhat is tall?"}, {"from": "gpt", "value": "Yes."}]
    template = INTERNVL.with_tile_tags(TOKENS_PER_TILE)
    sample = builder(ours, MAX_TILES, template).build(Record("test", 0, "a", conversation, files["images"][1:2]))
    tiles = sample.tiles_per_image[0]
    assert tiles > 2 and sample.pixel_values.shape[0] == tiles
    ids = sample.input_ids
    tags = [ours.token_id(name) for name in tile_tags(tiles)]
    assert [i for i in ids if i in set(tags)] == tags
    assert ids.count(ours.image_token_id) == tiles * TOKENS_PER_TILE
