"""A checkpoint ready to answer: model, tokenizer, chat template and image preprocessing together.

Everything the training data pipeline decided must be decided the same way here, or the model sees
inputs it never saw: the chat template (the prompt is `render_prompt`, the prefix training put before
every answer), the tokenizer, the image preprocessing mode and normalization, and tiling. They come
from the checkpoint's run config (training section: tokenizer_model, chat_template,
image_aspect_ratio, image_normalization, max_image_tiles, tile_tags; without a normalization the vision tower
decides, as in training: SigLIP-style towers have no class token), and explicit overrides win (a
tokenizer file moved since training).

A native-resolution checkpoint (the Qwen2-VL family) is prepared as `megamm.data.native_samples`
prepares its training samples: the `qwen2_vl` template (the only one such a tower trains with, so
the default), the tokenizer loaded with its `<|image_pad|>` image token (`template_tokenizer`) and
checked for the template's markers and the model's video token id, each image resized within the
run's pixel range (`--min-pixels` / `--max-pixels`, saved in its training section) and a `Video`
(a file or frame files) read by the same reader at the run's fps, frame limit and video pixel range.

Data parallelism: with world = tp x dp processes, `answer` gives dp replica r the questions r, r + dp,
...; the answers are gathered back in order. Sampling seeds are the run seed plus the question's
index in the request, so the answers depend neither on dp nor on the batch size.
"""

from __future__ import annotations

import os
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
from megamm.config.run import NATIVE_FLAGS, NATIVE_TEMPLATE, TrainingConfig
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
from megamm.data.native_resolution import VisionInput, preprocess_image
from megamm.data.native_samples import NativeSettings, load_video, native_settings
from megamm.data.qwen_template import VIDEO_PAD, VIDEO_PLACEHOLDER, render_qwen2_vl_prompt
from megamm.data.sources import DEFAULT_FRAME_RATE
from megamm.data.templates import (
    IMAGE_PLACEHOLDER,
    ChatTemplate,
    get_template,
    render_prompt,
    template_tokenizer,
)
from megamm.data.tokenizer import Tokenizer, check_tokenizer
from megamm.data.video import VideoInput
from megamm.inference.generation import GenerationConfig, Prompt, generate
from megamm.models.llava import LlavaModel
from megamm.parallel.mappings import group_size
from megamm.parallel.state import ParallelState


@dataclass(frozen=True)
class DataSettings:
    """How prompts and images are prepared (must match training). native: a native-resolution
    tower's patch sizes, pixel ranges and video sampling (`megamm.data.native_samples.native_settings`
    of the run's flags); None for the fixed-size towers."""

    tokenizer_model: str
    chat_template: str
    image_aspect_ratio: str = "pad"
    max_image_tiles: int = 1
    normalization: str = "clip"
    # NVLM tile tags (--tile-tags, megamm.data.internvl_template): a tag before each tile's tokens.
    tile_tags: bool = False
    native: NativeSettings | None = None


@dataclass(frozen=True)
class Video:
    """A question's video for a native-resolution model: a video file (decoded with PyAV) or its frame
    image files in order, extracted at `frame_rate` frames per second (a file's own rate is read from
    it); paths are relative to the image root, as image paths are."""

    source: str | Path | Sequence[str | Path]
    frame_rate: float = DEFAULT_FRAME_RATE

    def describe(self) -> str:
        if isinstance(self.source, (str, Path)):
            return f"video {os.fspath(self.source)!r}"
        frames = list(self.source)
        return f"video of {len(frames)} frames from {os.fspath(frames[0])!r}" if frames else "video of no frames"


@dataclass
class Answer:
    """A generated answer; with `skip_bad_images`, a question whose image failed to load has no text,
    finish_reason "error" and the image's error message in `error`."""

    text: str
    tokens: list[int]
    finish_reason: str
    error: str | None = None


ImageInput = Image.Image | str | Path | Video | None


def _native_settings(model_config: LlavaConfig, training: dict, problems: list[str]) -> NativeSettings | None:
    """The run's native-resolution settings from its training section (None for a fixed-size tower);
    a saved value that does not make settings is added to `problems`."""
    if model_config.vision.native_resolution is None:
        return None
    flags = TrainingConfig(**{name: training.get(name) for name in NATIVE_FLAGS})
    try:
        return native_settings(model_config.vision, flags)
    except ValueError as error:
        problems.append(f"the checkpoint's native-resolution settings ({', '.join(NATIVE_FLAGS)}): {error}")
        return None


def data_settings(tree: dict, model_config: LlavaConfig, **overrides: object) -> DataSettings:
    """DataSettings from a run config tree's training section, `overrides` (not None) winning.

    A native-resolution model's template is qwen2_vl (what its training samples are rendered with;
    a run on synthetic data saves another, unused one) and its images are never tiled.
    ValueError listing every missing or invalid setting.
    """
    training = tree.get("training") or {}
    native = model_config.vision.native_resolution is not None
    values = {
        "tokenizer_model": training.get("tokenizer_model"),
        "chat_template": NATIVE_TEMPLATE if native else training.get("chat_template"),
        "image_aspect_ratio": training.get("image_aspect_ratio") or "pad",
        "max_image_tiles": training.get("max_image_tiles") or 1,
        "normalization": image_normalization(model_config.vision, training.get("image_normalization")),
        "tile_tags": bool(training.get("tile_tags")),
    }
    values.update({key: value for key, value in overrides.items() if value is not None})
    problems = []
    if native and values["chat_template"] != NATIVE_TEMPLATE:
        problems.append(f"chat template {values['chat_template']!r}: a native-resolution vision tower "
                        f"({model_config.vision.family}) needs {NATIVE_TEMPLATE} (its vision markers delimit each "
                        "image and video)")
    if native and values["max_image_tiles"] != 1:
        problems.append(f"max image tiles {values['max_image_tiles']!r}: a native-resolution vision tower takes "
                        "each image whole at its own resolution")
    values["native"] = _native_settings(model_config, training, problems)
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


def check_session_tokenizer(tokenizer: Tokenizer, model_config: LlavaConfig, template: ChatTemplate,
                            source: str) -> None:
    """The tokenizer fits the model and the template as training checks it (`check_tokenizer` with
    the template's markers and the video token); ValueError naming `source` and every mismatch."""
    check_tokenizer(tokenizer, model_config.language, source, template.required_tokens, VIDEO_PAD)


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
        # The chat template as training rendered images with it (tile tags when it tagged tiles).
        template = get_template(settings.chat_template)
        self.template = template.with_tile_tags(model.image_tokens_per_image) if settings.tile_tags else template
        check_session_tokenizer(tokenizer, model.config, self.template, f"tokenizer {tokenizer.path}")
        if model.native != (settings.native is not None):
            raise ValueError(
                "DataSettings.native must be given exactly for a native-resolution vision tower "
                f"(the {model.config.vision.family} tower is {'' if model.native else 'not '}one): "
                "megamm.data.native_samples.native_settings makes it from the run's training flags"
            )
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
        # The tokenizer first: a wrong one fails in a second, not after the weights are read. It is
        # loaded as training loads it, with the template's image token (Qwen's <|image_pad|>).
        template = get_template(settings.chat_template)
        try:
            tokenizer = template_tokenizer(settings.tokenizer_model, template)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{error} (the checkpoint's tokenizer; pass --tokenizer-model to use another path)") from error
        check_session_tokenizer(tokenizer, model_config, template, f"tokenizer {settings.tokenizer_model}")
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
        resized within the run's pixel range as its training images were (megamm.data.native_resolution)."""
        assert self.settings.native is not None, "a native-resolution session has native settings (__init__)"
        return preprocess_image(image, self.settings.native.image)

    def video_inputs(self, video: Video, image_root: str | Path | None = None) -> VideoInput:
        """A video's patches and grid, read as the run's training videos were
        (`megamm.data.native_samples.load_video`: its fps, frame limit and video pixel range). Paths are
        relative to `image_root` and must stay inside it; without a root, to the working directory.
        ValueError for a model without a native-resolution tower; ImageError naming the video when it
        cannot be read."""
        native = self.settings.native
        if native is None:
            raise ValueError(f"{video.describe()}: videos are inputs of a native-resolution vision tower (the "
                             f"Qwen2-VL family); the {self.model.config.vision.family} tower takes images")
        source = video.source if isinstance(video.source, (str, Path)) else [os.fspath(f) for f in video.source]
        if not source:
            raise ImageError(f"{video.describe()}: a video needs a file or at least one frame")
        if image_root is None:
            source = Path(source).resolve() if isinstance(source, (str, Path)) else [
                str(Path(frame).resolve()) for frame in source]
        try:
            return load_video(source, video.frame_rate, native, image_root)
        except (ValueError, OSError) as error:  # ImageError (a frame file) is a ValueError
            raise ImageError(f"{video.describe()}: {error}") from None

    def blank_like(self, image: Image.Image) -> Image.Image:
        """A uniform image of the normalization's mean colour, the size of `image` (so it is tiled
        the same way and takes as many tokens): the "model cannot see" baseline."""
        return Image.new("RGB", image.size, mean_fill(self.settings.normalization))

    def prompt(self, question: str, image: Image.Image | VideoInput | None, blank_image: bool = False) -> Prompt:
        """A user turn (the image or video placeholder first unless the question places it) rendered
        as a prompt. `image`: a loaded image, a video's inputs (`video_inputs`) or None (text only)."""
        turns = [{"from": "human", "value": question}]
        if image is None:
            return Prompt(render_prompt(turns, self.template, self.tokenizer).input_ids)
        if isinstance(image, VideoInput):
            if blank_image:
                raise ValueError("the blank-image baseline replaces images; a question with a video has none")
            turns[0]["value"] = _placed(question, VIDEO_PLACEHOLDER, "video")
            rendered = render_qwen2_vl_prompt(turns, self.tokenizer, (), [image.num_tokens], self.template)
            return Prompt(rendered.input_ids, pixel_values_videos=image.pixel_values,
                          video_grid_thw=torch.tensor([image.grid_thw]),
                          video_seconds_per_grid=(image.second_per_grid,))
        turns[0]["value"] = _placed(question, IMAGE_PLACEHOLDER, "image")
        image = self.blank_like(image) if blank_image else image
        if self.model.native:
            patches = self.native_image_inputs(image)
            rendered = render_prompt(turns, self.template, self.tokenizer, [patches.num_tokens])
            return Prompt(rendered.input_ids, patches.pixel_values, torch.tensor([patches.grid_thw]))
        anyres = self.model.config.anyres
        if anyres is not None:
            vision = self.model.config.vision
            tiles, size = preprocess_anyres(image, vision.image_size, anyres.pinpoints, self.settings.normalization)
            tokens = image_tokens(size, anyres.pinpoints, vision.image_size, vision.grid_size, anyres.max_num_patches)
            rendered = render_prompt(turns, self.template, self.tokenizer, [tokens])
            return Prompt(rendered.input_ids, tiles, image_sizes=torch.tensor([size]))
        pixel_values = self.image_inputs(image)
        tokens = pixel_values.shape[0] * self.model.image_tokens_per_image
        rendered = render_prompt(turns, self.template, self.tokenizer, [tokens])
        return Prompt(rendered.input_ids, pixel_values)

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
        working directory when no root is given), a `Video` (native-resolution models; its paths are
        taken likewise) or None (a text-only question). blank_image replaces every image by
        `blank_like(image)` (a video question then raises ValueError). An image or video that cannot
        be loaded (missing, outside the root, unreadable) raises ImageError naming it, unless
        skip_bad_images: then that question
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
                    image = self._media(questions[i][0], image_root)
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

    def _media(self, image: ImageInput, image_root: str | Path | None) -> Image.Image | VideoInput | None:
        if image is None or isinstance(image, Image.Image):
            return image
        if isinstance(image, Video):
            return self.video_inputs(image, image_root)
        path = Path(image)
        if image_root is None:
            path = path.resolve()
            return load_image(path, path.parent)
        return load_image(path, image_root)


def _placed(question: str, placeholder: str, what: str) -> str:
    """The question with its one `placeholder` (put first, on its own line, unless it holds one)."""
    if placeholder not in question:
        question = f"{placeholder}\n{question}"
    if question.count(placeholder) != 1:
        raise ValueError(f"a question with one {what} must hold one {placeholder}: {question[:80]!r}")
    return question
