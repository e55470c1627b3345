"""What a training run reads: this rank's microbatches of each iteration, and the validation batches.

Two kinds, one interface (`microbatches(iteration)`, `eval_batches()`, `counts()`, `plan()`):
- `SyntheticData` (--mock-data): the deterministic synthetic multimodal set, indexed by position.
- `FileData` (--data-path): dataset files through the sample builder and the worker loader
  (`megamm.data.loader`), padded or packed into microbatches.

Each pipeline stage keeps only what it uses: the first stage the tokens and images, the last stage the
labels; packed rows also give every stage their positions and attention mask. A stage that needs
nothing (a middle stage without packing) reads nothing. Tensor-parallel ranks read the same samples
independently; the loader is deterministic, so they agree without a broadcast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from megamm.config.resolved import ResolvedConfig
from megamm.data.balance import Balancer, BatchPlan
from megamm.data.batching import Batch, packed_microbatches, padded_microbatches
from megamm.data.datasets import build_source
from megamm.data.images import image_normalization
from megamm.data.loader import BAD_KINDS, PositionDataset, RankLoader, ResumePoint
from megamm.data.samples import ImageSettings, Sample, SampleBuilder
from megamm.data.synthetic import SyntheticMultimodalDataset, collate, microbatch_indices
from megamm.data.tokenizer import check_tokenizer, load_tokenizer
from megamm.parallel.state import ParallelState
from megamm.training.metrics import sample_flops

# Held-out synthetic samples come from another seed stream.
EVAL_SEED_OFFSET = 7919
FIRST_STAGE_KEYS = ("input_ids", "pixel_values", "images_per_sample")
LAST_STAGE_KEYS = ("labels", "images_per_sample")
EVERY_STAGE_KEYS = ("position_ids", "attention_mask")


def stage_keys(state: ParallelState, packed: bool) -> tuple[str, ...]:
    keys = (FIRST_STAGE_KEYS if state.is_first_stage else ()) + (LAST_STAGE_KEYS if state.is_last_stage else ())
    return keys + (EVERY_STAGE_KEYS if packed else ())


def _select(batches: list[Batch], keys: tuple[str, ...]) -> list[Batch]:
    return [{key: batch[key] for key in keys if key in batch} for batch in batches]


class SyntheticData:
    """--mock-data: sample i of the synthetic set is global position i; a run resumed at `resume`
    continues from its consumed samples."""

    def __init__(self, config: ResolvedConfig, state: ParallelState, resume: ResumePoint) -> None:
        t, model_config = config.training, config.model
        self.config, self.state, self.resume = config, state, resume
        self.train = SyntheticMultimodalDataset(model_config, t.seq_length, t.seed, t.images_per_sample)
        self.eval = SyntheticMultimodalDataset(model_config, t.seq_length, t.seed + EVAL_SEED_OFFSET, t.images_per_sample)
        self.keys = stage_keys(state, packed=False)

    def batches_at(self, dataset: SyntheticMultimodalDataset, first_position: int) -> list[Batch]:
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
    t, vision = config.training, config.model.vision
    normalization = image_normalization(vision, t.image_normalization)
    return ImageSettings(vision.image_size, t.image_aspect_ratio, normalization, t.max_image_tiles)


def vision_work_balancer(config: ResolvedConfig) -> Balancer | None:
    """--balance-vision-work: each sample weighed by its training FLOPs (tiles as tower sequences;
    the language model's row is the full --seq-length unless rows are packed)."""
    t = config.training
    if not t.balance_vision_work:
        return None
    padded_length = None if t.pack_sequences else t.seq_length
    return Balancer(t.micro_batch_size, config.model.vision.seq_length,
                    functools.partial(sample_flops, config.model, padded_length=padded_length))


def build_sample_builder(config: ResolvedConfig) -> SampleBuilder:
    """The tokenizer, template and image settings of a run, checked against the model."""
    t, model_config = config.training, config.model
    tokenizer = load_tokenizer(t.tokenizer_model)
    check_tokenizer(tokenizer, model_config.language, f"--tokenizer-model {t.tokenizer_model}")
    return SampleBuilder(
        tokenizer, t.chat_template, _image_settings(config),
        model_config.image_tokens_per_image, t.seq_length,
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
        vision = config.model.vision
        self.image_shape = (vision.num_channels, vision.image_size, vision.image_size)
        self.microbatch_multiple = microbatch_multiple
        self.keys = stage_keys(state, t.pack_sequences)
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


def rows_in(microbatches: list[Batch]) -> int:
    """Rows (sequences) in these microbatches, 0 on stages that hold no tokens or labels."""
    for key in ("input_ids", "labels"):
        if microbatches and key in microbatches[0]:
            return sum(int(mb[key].shape[0]) for mb in microbatches)
    return 0
