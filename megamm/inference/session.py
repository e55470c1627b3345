"""A checkpoint ready to answer: model, tokenizer, chat template and image preprocessing together.

Everything the training data pipeline decided must be decided the same way here, or the model sees
inputs it never saw: the chat template (the prompt is `render_prompt`, the prefix training put before
every answer), the tokenizer, the image preprocessing mode and normalization, and tiling. They come
from the checkpoint's run config (training section: tokenizer_model, chat_template,
image_aspect_ratio, image_normalization, max_image_tiles, tile_tags; without a normalization the vision tower
decides, as in training: SigLIP-style towers have no class token), and explicit overrides win (a
tokenizer file moved since training).

Data parallelism: with world = tp x dp processes, `answer` gives dp replica r the questions r, r + dp,
...; the answers are gathered back in order. Sampling seeds are the run seed plus the question's
index in the request, so the answers depend neither on dp nor on the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from megamm.checkpoint.model_weights import load_model_weights, read_run_config_tree
from megamm.config import LlavaConfig
from megamm.config.anyres import image_tokens
from megamm.config.parsing import run_config_from_dict
from megamm.config.precision import dtype_named, precision_name
from megamm.config.registry import TILE_TAG_TEMPLATES, VISION_TOWERS
from megamm.data.anyres_images import preprocess_anyres
from megamm.data.images import (
    ImageError,
    float_tile_ratios,
    image_normalization,
    load_image,
    mean_fill,
    preprocess,
    preprocess_tiles,
)
from megamm.data.native_resolution import NativeResolution, VisionInput, preprocess_image
from megamm.data.templates import IMAGE_PLACEHOLDER, ChatTemplate, get_template, render_prompt
from megamm.data.tokenizer import Tokenizer, check_tokenizer, load_tokenizer
from megamm.inference.generation import GenerationConfig, Prompt, generate
from megamm.models.llava import LlavaModel
from megamm.parallel.mappings import group_size
from megamm.parallel.state import ParallelState

# Answer-closing tokens of templates whose answers end with something other than EOS.


@dataclass(frozen=True)
class DataSettings:
    """How prompts and images are prepared (must match training)."""

    tokenizer_model: str
    chat_template: str
    image_aspect_ratio: str = "pad"
    max_image_tiles: int = 1
    normalization: str = "clip"
    # NVLM tile tags (--tile-tags, megamm.data.internvl_template): a tag before each tile's tokens.
    tile_tags: bool = False


@dataclass
class Answer:
    """A generated answer; with `skip_bad_images`, a question whose image failed to load has no text,
    finish_reason "error" and the image's error message in `error`."""

    text: str
    tokens: list[int]
    finish_reason: str
    error: str | None = None


ImageInput = Image.Image | str | Path | None


def data_settings(tree: dict, model_config: LlavaConfig, **overrides: object) -> DataSettings:
    """DataSettings from a run config tree's training section, `overrides` (not None) winning.

    ValueError listing every missing or invalid setting.
    """
    training = tree.get("training") or {}
    values = {
        "tokenizer_model": training.get("tokenizer_model"),
        "chat_template": training.get("chat_template"),
        "image_aspect_ratio": training.get("image_aspect_ratio") or "pad",
        "max_image_tiles": training.get("max_image_tiles") or 1,
        "normalization": image_normalization(model_config.vision, training.get("image_normalization")),
        "tile_tags": bool(training.get("tile_tags")),
    }
    values.update({key: value for key, value in overrides.items() if value is not None})
    problems = []
    if not values["tokenizer_model"]:
        problems.append("the checkpoint names no tokenizer: pass --tokenizer-model")
    if not values["chat_template"]:
        problems.append("the checkpoint names no chat template: pass --chat-template")
    else:
        try:
            get_template(str(values["chat_template"]))
        except KeyError as error:
            problems.append(str(error.args[0]))
    if values["image_aspect_ratio"] not in ("pad", "crop", "resize"):
        problems.append(f"image aspect ratio must be pad, crop or resize, got {values['image_aspect_ratio']!r}")
    if values["normalization"] not in VISION_TOWERS:
        problems.append(VISION_TOWERS.unknown(values["normalization"], "image normalization"))
    if not isinstance(values["max_image_tiles"], int) or values["max_image_tiles"] < 1:
        problems.append(f"max image tiles must be an integer >= 1, got {values['max_image_tiles']!r}")
    if values["tile_tags"] and values["chat_template"] not in TILE_TAG_TEMPLATES:
        problems.append(f"tile tags need the chat template {', '.join(TILE_TAG_TEMPLATES)}, got "
                        f"{values['chat_template']!r}")
    if problems:
        raise ValueError("cannot prepare inputs:\n  - " + "\n  - ".join(problems))
    return DataSettings(**values)  # type: ignore[arg-type]


def stop_token_ids(tokenizer: Tokenizer, template: str) -> tuple[int, ...]:
    """EOS and the template's answer-closing tokens, where the tokenizer has them as single ids."""
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    for token in get_template(template).stop_tokens:
        try:
            ids.append(tokenizer.token_id(token))
        except KeyError:
            continue
    return tuple(dict.fromkeys(ids))


class InferenceSession:
    """A model with its tokenizer and data settings; `answer` turns questions into answers."""

    def __init__(self, model: LlavaModel, tokenizer: Tokenizer, settings: DataSettings) -> None:
        check_tokenizer(tokenizer, model.config.language, f"tokenizer {tokenizer.path}")
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.state = model.state

    @classmethod
    def from_checkpoint(
        cls,
        load: str | Path,
        state: ParallelState | None = None,
        dtype: str | None = None,
        **overrides: object,
    ) -> InferenceSession:
        """Build the model from checkpoint `load`'s run config at this process's layout and load its
        weights. dtype: "fp32" | "bf16" | "fp16" (default: what the run trained in); overrides:
        tokenizer_model, chat_template, image_aspect_ratio, normalization, max_image_tiles (None: the
        checkpoint's)."""
        state = state or ParallelState.single()
        path, tree = read_run_config_tree(load)
        model_config = run_config_from_dict({"model": tree.get("model")}).model
        settings = data_settings(tree, model_config, **overrides)
        training = tree.get("training") or {}
        params_dtype = dtype_named(dtype or precision_name(bool(training.get("bf16")), bool(training.get("fp16"))))
        # The tokenizer first: a wrong one fails in a second, not after the weights are read.
        try:
            tokenizer = load_tokenizer(settings.tokenizer_model)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{error} (the checkpoint's tokenizer; pass --tokenizer-model to use another path)") from error
        check_tokenizer(tokenizer, model_config.language, f"tokenizer {settings.tokenizer_model}")
        model = LlavaModel(model_config.for_runtime(params_dtype), state)
        model.requires_grad_(False)
        load_model_weights(model, path, state)
        model.eval()
        return cls(model, tokenizer, settings)

    # ---- inputs ----------------------------------------------------------------------------------

    def image_inputs(self, image: Image.Image) -> torch.Tensor:
        """One image -> its vision-tower inputs `[n, C, H, W]` (n = 1, or tiles + thumbnail)."""
        vision, s = self.model.config.vision, self.settings
        if s.max_image_tiles > 1:
            tiles, _ = preprocess_tiles(image, vision.image_size, s.max_image_tiles, s.normalization,
                                        float_ratios=float_tile_ratios(vision))
            return tiles
        return preprocess(image, vision.image_size, s.image_aspect_ratio, s.normalization).unsqueeze(0)

    def native_image_inputs(self, image: Image.Image) -> VisionInput:
        """One image -> its patches and grid for a native-resolution tower (the Qwen2-VL family),
        resized within the image processor's default pixel bounds (megamm.data.native_resolution)."""
        vision = self.model.config.vision
        native = vision.native_resolution
        return preprocess_image(image, NativeResolution(patch_size=vision.patch_size,
                                                        merge_size=native.spatial_merge_size,
                                                        temporal_patch_size=native.temporal_patch_size))

    def blank_like(self, image: Image.Image) -> Image.Image:
        """A uniform image of the normalization's mean colour, the size of `image` (so it is tiled
        the same way and takes as many tokens): the "model cannot see" baseline."""
        return Image.new("RGB", image.size, mean_fill(self.settings.normalization))

    def prompt(self, question: str, image: Image.Image | None, blank_image: bool = False) -> Prompt:
        """A user turn (the image placeholder first unless the question places it) rendered as a prompt."""
        if image is None:
            return Prompt(render_prompt([{"from": "human", "value": question}], self.settings.chat_template,
                                        self.tokenizer).input_ids)
        if IMAGE_PLACEHOLDER not in question:
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        if question.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(f"a question with one image must hold one {IMAGE_PLACEHOLDER}: {question[:80]!r}")
        image = self.blank_like(image) if blank_image else image
        turns = [{"from": "human", "value": question}]
        if self.model.native:
            patches = self.native_image_inputs(image)
            rendered = render_prompt(turns, self.settings.chat_template, self.tokenizer, [patches.num_tokens])
            return Prompt(rendered.input_ids, patches.pixel_values, torch.tensor([patches.grid_thw]))
        anyres = self.model.config.anyres
        if anyres is not None:
            vision = self.model.config.vision
            tiles, size = preprocess_anyres(image, vision.image_size, anyres.pinpoints, self.settings.normalization)
            tokens = image_tokens(size, anyres.pinpoints, vision.image_size, vision.grid_size, anyres.max_num_patches)
            rendered = render_prompt(turns, self.settings.chat_template, self.tokenizer, [tokens])
            return Prompt(rendered.input_ids, tiles, image_sizes=torch.tensor([size]))
        pixel_values = self.image_inputs(image)
        tokens = pixel_values.shape[0] * self.model.image_tokens_per_image
        rendered = render_prompt(turns, self.template(), self.tokenizer, [tokens])
        return Prompt(rendered.input_ids, pixel_values)

    def template(self) -> ChatTemplate:
        """The chat template as training rendered images with it (tile tags when it tagged tiles)."""
        template = get_template(self.settings.chat_template)
        if self.settings.tile_tags:
            return template.with_tile_tags(self.model.image_tokens_per_image)
        return template

    # ---- answers ---------------------------------------------------------------------------------

    def generation_config(self, **fields: object) -> GenerationConfig:
        """A GenerationConfig whose stop tokens default to this template's answer-closing tokens."""
        fields.setdefault("stop_token_ids", stop_token_ids(self.tokenizer, self.settings.chat_template))
        return GenerationConfig(**fields)  # type: ignore[arg-type]

    def answer(
        self,
        questions: Sequence[tuple[ImageInput, str]],
        config: GenerationConfig | None = None,
        batch_size: int = 8,
        image_root: str | Path | None = None,
        blank_image: bool = False,
        skip_bad_images: bool = False,
    ) -> list[Answer]:
        """Answers to (image, question) pairs, in order, on every rank.

        An image is a PIL image, a path (relative to `image_root`, or absolute or relative to the
        working directory when no root is given) or None (a text-only question). blank_image
        replaces every image by `blank_like(image)`. An image that cannot be loaded (missing, outside
        the root, unreadable) raises ImageError naming it, unless skip_bad_images: then that question
        is not generated and its Answer carries the message in `error`; the other answers are the same
        either way (each question samples with its own seed).
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        config = config or self.generation_config()
        dp, dp_rank = self.state.dp_size, self.state.dp_rank
        mine = list(range(dp_rank, len(questions), dp))
        local: list[tuple[int, Answer]] = []
        for first in range(0, len(mine), batch_size):
            indices: list[int] = []
            prompts: list[Prompt] = []
            for i in mine[first : first + batch_size]:
                try:
                    image = self._image(questions[i][0], image_root)
                except ImageError as error:
                    if not skip_bad_images:
                        raise
                    local.append((i, Answer("", [], "error", error=str(error))))
                    continue
                indices.append(i)
                prompts.append(self.prompt(questions[i][1], image, blank_image))
            if not prompts:
                continue
            results = generate(self.model, prompts, config, pad_id=self.tokenizer.pad_id,
                               seeds=[config.seed + i for i in indices])
            local += [
                (i, Answer(self.tokenizer.decode(r.tokens).strip(), r.tokens, r.finish_reason))
                for i, r in zip(indices, results, strict=True)
            ]
        if dp > 1 and group_size(self.state.dp_group) > 1:
            gathered: list[list[tuple[int, Answer]]] = [[] for _ in range(dp)]
            dist.all_gather_object(gathered, local, group=self.state.dp_group)
            local = [item for part in gathered for item in part]
        by_index = dict(local)
        return [by_index[i] for i in range(len(questions))]

    @staticmethod
    def _image(image: ImageInput, image_root: str | Path | None) -> Image.Image | None:
        if image is None or isinstance(image, Image.Image):
            return image
        path = Path(image)
        if image_root is None:
            path = path.resolve()
            return load_image(path, path.parent)
        return load_image(path, image_root)
