"""What a training run reads: this rank's microbatches of each iteration, and the validation batches.

Two kinds, one interface (`microbatches(iteration)`, `eval_batches()`, `counts()`, `plan()`):
- `SyntheticData` (--mock-data): the deterministic synthetic multimodal set, indexed by position.
- `FileData` (--data-path): dataset files through the sample builder and the worker loader
  (`megamm.data.loader`), padded or packed into microbatches.

Each pipeline stage keeps only what it uses: the first stage the tokens, images and videos (patches
and grids for a native-resolution tower), the last stage the labels (and what the step's FLOP count
reads: images per row, the grids); packed rows also give every stage their positions and attention
mask, and so do the native-resolution family's rows, padded too (their M-RoPE positions are not the
token index). A stage that needs nothing (a middle stage of a fixed-size family without packing)
reads nothing. Tensor-parallel ranks read the same samples
independently; the loader is deterministic, so they agree without a broadcast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from megamm.config.resolved import ResolvedConfig
from megamm.config.run import takes_anyres_videos
from megamm.data.anyres_videos import VideoSettings
from megamm.data.balance import Balancer, BatchPlan
from megamm.data.batching import Batch, packed_microbatches, padded_microbatches
from megamm.data.datasets import build_source
from megamm.data.images import float_tile_ratios, image_normalization
from megamm.data.loader import BAD_KINDS, PositionDataset, RankLoader, ResumePoint
from megamm.data.native_samples import NativeSampleBuilder, native_settings
from megamm.data.qwen_template import VIDEO_PAD
from megamm.data.samples import ImageSettings, Sample, SampleBuilder
from megamm.data.synthetic import (
    SyntheticAnyResDataset,
    SyntheticMultimodalDataset,
    SyntheticNativeDataset,
    collate,
    microbatch_indices,
)
from megamm.data.templates import get_template, template_tokenizer
from megamm.data.tokenizer import check_tokenizer
from megamm.parallel.state import ParallelState
from megamm.training.metrics import sample_flops

if TYPE_CHECKING:
    from megamm.config import LlavaConfig

SyntheticDataset = SyntheticMultimodalDataset | SyntheticNativeDataset | SyntheticAnyResDataset
# Held-out synthetic samples come from another seed stream.
EVAL_SEED_OFFSET = 7919
FIRST_STAGE_KEYS = (
    "input_ids", "pixel_values", "images_per_sample", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
    "videos_per_sample", "image_sizes", "batch_num_images",
)
LAST_STAGE_KEYS = ("labels", "images_per_sample", "image_grid_thw", "video_grid_thw", "videos_per_sample")
EVERY_STAGE_KEYS = ("position_ids", "segment_ids")


def stage_keys(state: ParallelState, packed: bool, native: bool = False) -> tuple[str, ...]:
    """The batch keys this rank's stage keeps (a key its batches lack is skipped): packed rows give
    every stage the positions and segment ids, native-resolution rows the positions."""
    keys = (FIRST_STAGE_KEYS if state.is_first_stage else ()) + (LAST_STAGE_KEYS if state.is_last_stage else ())
    every = EVERY_STAGE_KEYS if packed else ("position_ids",) if native else ()
    return tuple(dict.fromkeys(keys + every))


def _select(batches: list[Batch], keys: tuple[str, ...]) -> list[Batch]:
    return [{key: batch[key] for key in keys if key in batch} for batch in batches]


def _synthetic(config: ResolvedConfig, seed: int) -> SyntheticDataset:
    t, model = config.training, config.model
    if model.vision.native_resolution is not None:
        return SyntheticNativeDataset(model, t.seq_length, seed, t.images_per_sample, t.image_pixel_range)
    if model.anyres is not None:
        return SyntheticAnyResDataset(model, t.seq_length, seed, t.images_per_sample)
    return SyntheticMultimodalDataset(model, t.seq_length, seed, t.images_per_sample)


class SyntheticData:
    """--mock-data: sample i of the synthetic set is global position i; a run resumed at `resume`
    continues from its consumed samples. Native-resolution and any-resolution models get images of
    random sizes."""

    def __init__(self, config: ResolvedConfig, state: ParallelState, resume: ResumePoint) -> None:
        t = config.training
        self.config, self.state, self.resume = config, state, resume
        self.train = _synthetic(config, t.seed)
        self.eval = _synthetic(config, t.seed + EVAL_SEED_OFFSET)
        self.keys = stage_keys(state, packed=False, native=config.model.vision.native_resolution is not None)

    def batches_at(self, dataset: SyntheticDataset, first_position: int) -> list[Batch]:
        """This rank's microbatches of the global batch of `dataset` (the train or eval set) that
        starts at sample `first_position`."""
        t, state = self.config.training, self.state
        indices = microbatch_indices(first_position, t.global_batch_size, t.micro_batch_size,
                                     state.dp_rank, state.dp_size)
        if not self.keys:
            return [{} for _ in indices]
        return _select([collate([dataset[i] for i in chunk]) for chunk in indices], self.keys)

    def microbatches(self, iteration: int) -> list[Batch]:
        return self.batches_at(self.train, self.resume.first_position(iteration, self.config.training.global_batch_size))

    def eval_batches(self) -> list[list[Batch]]:
        t = self.config.training
        return [self.batches_at(self.eval, i * t.global_batch_size) for i in range(t.eval_iters)]

    def counts(self) -> dict[str, int]:
        return {}

    def plan(self) -> None:
        """Synthetic batches are never rebalanced (--balance-vision-work needs --data-path)."""

    def describe(self) -> str:
        return "synthetic multimodal data (--mock-data)"


def _image_settings(config: ResolvedConfig) -> ImageSettings:
    t, vision, language = config.training, config.model.vision, config.model.language
    normalization = image_normalization(vision, t.image_normalization)
    videos = (VideoSettings(t.anyres_video_frames, language.video_token_id)
              if takes_anyres_videos(config.model) else None)
    return ImageSettings(vision.image_size, t.image_aspect_ratio, normalization, t.max_image_tiles,
                         anyres=config.model.anyres, float_ratios=float_tile_ratios(vision), videos=videos)


def vision_input_shape(config: ResolvedConfig) -> tuple[int, ...]:
    """One vision-tower input (`megamm.data.batching`): an image `(C, H, W)`, or a native-resolution
    tower's patch `(C * T * P * P,)`."""
    vision = config.model.vision
    if vision.native_resolution is not None:
        return (native_settings(vision, config.training).patch_dim,)
    return (vision.num_channels, vision.image_size, vision.image_size)


def vision_work_balancer(config: ResolvedConfig) -> Balancer | None:
    """--balance-vision-work: each sample weighed by its training FLOPs (tiles as tower sequences of
    the tower's length; a native-resolution tower's images and videos by their grids; the language
    model's row is the full --seq-length unless rows are packed)."""
    t, vision = config.training, config.model.vision
    if not t.balance_vision_work:
        return None
    padded_length = None if t.pack_sequences else t.seq_length
    tower_tokens = None if vision.native_resolution is not None else vision.seq_length
    return Balancer(t.micro_batch_size, tower_tokens,
                    functools.partial(sample_flops, config.model, padded_length=padded_length))


def build_sample_builder(config: ResolvedConfig) -> SampleBuilder | NativeSampleBuilder:
    """The tokenizer, template and image settings of a run, checked against the model."""
    t, model_config = config.training, config.model
    template = get_template(t.chat_template)
    if t.tile_tags:
        template = template.with_tile_tags(model_config.image_tokens_per_image)
    tokenizer = template_tokenizer(t.tokenizer_model, template)
    check_tokenizer(tokenizer, model_config.language, f"--tokenizer-model {t.tokenizer_model}",
                    template.required_tokens, VIDEO_PAD)
    if model_config.vision.native_resolution is not None:
        return NativeSampleBuilder(tokenizer, template, native_settings(model_config.vision, t), t.seq_length)
    return SampleBuilder(
        tokenizer, template, _image_settings(config),
        model_config.tile_tokens, t.seq_length,
    )


class FileData:
    """--data-path: dataset files, read by worker processes from the resume point on."""

    def __init__(
        self,
        config: ResolvedConfig,
        state: ParallelState,
        resume: ResumePoint,
        microbatch_multiple: int = 1,
        log: Callable[[str], None] = print,
    ) -> None:
        t = config.training
        self.config, self.state, self.log = config, state, log
        self.builder = build_sample_builder(config)
        self.image_shape = vision_input_shape(config)
        self.microbatch_multiple = microbatch_multiple
        self.keys = stage_keys(state, t.pack_sequences, config.model.vision.native_resolution is not None)
        total = t.train_iters * t.global_batch_size
        source, self.parts = build_source(t.data_path, t.image_folder, t.seed, total)
        self.train = PositionDataset(source, self.builder, t.seed)
        self.loader = self._loader(self.train, resume, t.train_iters, vision_work_balancer(config)) if self.keys else None
        self.valid = None
        if t.valid_data_path:
            valid_source, _ = build_source(t.valid_data_path, t.image_folder, t.seed, t.eval_iters * t.global_batch_size)
            self.valid = PositionDataset(valid_source, self.builder, t.seed)

    def _loader(self, dataset: PositionDataset, start: ResumePoint, stop: int,
                balancer: Balancer | None = None) -> RankLoader:
        t, state = self.config.training, self.state
        return RankLoader(
            dataset, t.global_batch_size, state.dp_rank, state.dp_size, start, stop, t.num_workers,
            t.max_bad_sample_fraction, log=self.log, balancer=balancer,
        )

    def _to_microbatches(self, samples: list[Sample]) -> list[Batch]:
        t = self.config.training
        pad_id = self.builder.tokenizer.pad_id
        if t.pack_sequences:
            batches = packed_microbatches(
                samples, t.micro_batch_size, t.seq_length, pad_id, self.image_shape, self.microbatch_multiple
            )
        else:
            batches = padded_microbatches(samples, t.micro_batch_size, t.seq_length, pad_id, self.image_shape)
        return _select(batches, self.keys)

    def _empty(self) -> list[Batch]:
        return [{} for _ in range(self.config.microbatches_per_step)]

    def microbatches(self, iteration: int) -> list[Batch]:
        if self.loader is None:
            return self._empty()
        if iteration != self.loader.iteration:
            raise RuntimeError(f"the loader is at iteration {self.loader.iteration}, not {iteration}")
        return self._to_microbatches(next(self.loader))

    def plan(self) -> BatchPlan | None:
        """The --balance-vision-work assignment of the iteration `microbatches` returned last."""
        return self.loader.plan if self.loader is not None else None

    def eval_batches(self) -> list[list[Batch]]:
        iters = self.config.training.eval_iters
        if self.valid is None or not self.keys:
            return [self._empty() for _ in range(iters)]
        loader = self._loader(self.valid, ResumePoint(), iters)
        return [self._to_microbatches(samples) for samples in loader]

    def counts(self) -> dict[str, int]:
        """Records read and skipped on this rank, with skips by reason (`bad/<kind>`)."""
        if self.loader is None:
            return {"records": 0, "bad": 0, **{f"bad/{k}": 0 for k in BAD_KINDS}}
        stats = self.loader.stats
        return {"records": stats.records, "bad": stats.bad, **{f"bad/{k}": v for k, v in stats.reasons.items()}}

    def describe(self) -> str:
        t = self.config.training
        packing = "packed" if t.pack_sequences else "padded"
        return f"{'; '.join(self.parts)} | template {t.chat_template} | {packing} rows of {t.seq_length} tokens"


def build_training_data(
    config: ResolvedConfig, state: ParallelState, resume: ResumePoint,
    microbatch_multiple: int = 1, log: Callable[[str], None] = print,
) -> SyntheticData | FileData:
    """The training data of a run that starts at `resume` (its iteration and consumed samples)."""
    if config.training.mock_data:
        return SyntheticData(config, state, resume)
    return FileData(config, state, resume, microbatch_multiple, log)


def vision_inputs(microbatches: list[Batch], model: LlavaConfig) -> int | list[list[int]]:
    """What the step's vision FLOPs follow (`megamm.training.metrics.step_flops`): the tower inputs
    (tiles) of a fixed-size tower, the (t, h, w) grids of the images and videos of a native one; none
    on a stage that holds neither (a middle stage)."""
    if model.anyres is not None:  # images_per_sample counts images; the tiles are counted where they are (first stage)
        return sum(int(mb["pixel_values"].shape[0]) for mb in microbatches if mb.get("pixel_values") is not None)
    if model.vision.native_resolution is None:
        return sum(int(mb["images_per_sample"].sum()) for mb in microbatches if "images_per_sample" in mb)
    return [grid for mb in microbatches for key in ("image_grid_thw", "video_grid_thw")
            if mb.get(key) is not None for grid in mb[key].tolist()]


def rows_in(microbatches: list[Batch]) -> int:
    """Rows (sequences) in these microbatches, 0 on stages that hold no tokens or labels."""
    for key in ("input_ids", "labels"):
        if microbatches and key in microbatches[0]:
            return sum(int(mb[key].shape[0]) for mb in microbatches)
    return 0
