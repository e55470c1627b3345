"""The InternVL chat template, and NVLM-style tile tags.

Text: ChatML as the InternVL -hf checkpoints' chat template writes it (no default system turn, no
BOS), each "<image>" placeholder expanded as InternVLProcessor expands its image token:

    <|im_start|>user\\n<img><IMG_CONTEXT> x (tiles x tokens per tile)</img>\\nquestion<|im_end|>\\n
    <|im_start|>assistant\\nanswer<|im_end|>\\n

(the chat template writes an image content part as `<IMG_CONTEXT>\\n`; in LLaVA-format data that
is the "<image>\\n" the conversation already holds). The answer and its `<|im_end|>` are trained.
The image positions hold the tokenizer's image token, `<IMG_CONTEXT>` (`image_token`); `<img>`,
`</img>` and the ChatML markers must be single vocabulary entries (`required_tokens`).

Tile tags (`with_tile_tags`, the run's --tile-tags): NVLM's recipe (Megatron-LM's NVLM example,
NVLM-D) puts a text tag before each tile's embeddings so the model knows where a tile sits:

    <img><tile_1><IMG_CONTEXT> x n<tile_2><IMG_CONTEXT> x n ... <tile_global_thumbnail><IMG_CONTEXT> x n</img>

the grid's tiles are `<tile_1>` ... `<tile_k>` in row-major order, the thumbnail (always last,
megamm.data.images) is `<tile_global_thumbnail>`, and an image of one tile, its own global view, has
that tag alone (NVLM-D's `[<tile_i> for i in 1..tiles-1] + [<tile_global_thumbnail>]`). A tag is one
id when the tokenizer has it, else its text's ids, untrained. An image's span covers its tags and
tokens (not `<img>` / `</img>`), so truncation never separates a tag from its tile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from megamm.data.templates import IMAGE_PLACEHOLDER, ChatMLTemplate, _Builder
from megamm.data.tokenizer import Tokenizer

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
THUMBNAIL_TAG = "<tile_global_thumbnail>"


def tile_tags(tiles: int) -> list[str]:
    """The tags of an image's `tiles` tower inputs, in order (the thumbnail last when tiles > 1)."""
    if tiles < 1:
        raise ValueError(f"an image has at least one tile, got {tiles}")
    return [f"<tile_{i}>" for i in range(1, tiles)] + [THUMBNAIL_TAG]


class _InternVLBuilder(_Builder):
    """Images as `<img>` [tags and] image tokens `</img>`; `tokens_per_tile` set: tile tags on."""

    def __init__(self, tokenizer: Tokenizer, tokens_per_image: Sequence[int], tokens_per_tile: int | None) -> None:
        super().__init__(tokenizer, tokens_per_image)
        self.tokens_per_tile = tokens_per_tile

    def image(self) -> None:
        count = self.next_image_tokens()
        self.special(IMG_START, trained=False)
        if self.tokens_per_tile is None:
            super().image()
        else:
            tiles, rest = divmod(count, self.tokens_per_tile)
            if rest or not tiles:
                raise ValueError(f"image {len(self.spans)} has {count} tokens, not a whole number of tiles of "
                                 f"{self.tokens_per_tile} (tile tags need whole tiles)")
            start = len(self.ids)
            image_id = self.tokenizer.image_token_id
            for number, tag in enumerate(tile_tags(tiles)):
                self.special(tag, trained=False)
                self._append([image_id] * self.tokens_per_tile, False, IMAGE_PLACEHOLDER if number == 0 else "")
            self.spans.append((start, len(self.ids)))
        self.special(IMG_END, trained=False)


@dataclass(frozen=True)
class InternVLTemplate(ChatMLTemplate):
    """InternVL's ChatML (see the module docstring); `tokens_per_tile` set: tile tags on."""

    name: str = "internvl"
    image_token: str = IMG_CONTEXT
    required_tokens: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", IMG_START, IMG_END)
    tokens_per_tile: int | None = None

    def with_tile_tags(self, tokens_per_tile: int) -> InternVLTemplate:
        """This template with a tag before each tile of `tokens_per_tile` image tokens."""
        if tokens_per_tile < 1:
            raise ValueError(f"tokens_per_tile must be >= 1, got {tokens_per_tile}")
        return dataclasses.replace(self, tokens_per_tile=tokens_per_tile)

    def builder(self, tokenizer: Tokenizer, tokens_per_image: Sequence[int]) -> _Builder:
        return _InternVLBuilder(tokenizer, tokens_per_image, self.tokens_per_tile)


INTERNVL = InternVLTemplate()
