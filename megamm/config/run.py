"""The run configuration: model, parallel and training sections in one object, validated up front.

`RunConfig.problems(world_size)` returns every violation at once (megamm.config.parsing builds a
RunConfig from YAML and flags and raises a `ConfigError` with all of them before any process group
exists). Nothing here imports an implementation layer: chat-template names come from the registry.
What follows from the sections (data-parallel size, microbatches per step, ...) is computed by the
methods and functions here and collected once in `megamm.config.resolved.ResolvedConfig`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from megamm.config.constants import (
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    ONEVISION_VIDEO_FRAMES,
    VIDEO_FPS,
    VIDEO_MAX_FRAMES,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
)
from megamm.config.layout import layout_problems, schedule_problems, virtual_stages
from megamm.config.lora import (
    DEFAULT_TARGETS,
    TARGET_NAMES,
    LoraConfig,
    number_problems,
    split_targets,
    target_problems,
)
from megamm.config.model import LlavaConfig, ParallelConfig
from megamm.config.precision import DTYPES, precision_name
from megamm.config.registry import CHAT_TEMPLATES, TILE_TAG_TEMPLATES, VISION_TOWERS
from megamm.config.unparsed import gather


def _opt(default: Any, help: str, flag: str | None = None, default_help: str | None = None) -> Any:
    """A training field: its --help text, its flag when not --field-name, and how --help states the
    default when the value alone would not say it (`default_help`, e.g. "--lr" for "defaults to --lr")."""
    return field(default=default, metadata={"help": help, "flag": flag, "default_help": default_help})


@dataclass
class TrainingConfig:
    # Batch and length.
    micro_batch_size: int = _opt(1, "samples per microbatch on one data-parallel rank")
    global_batch_size: int = _opt(8, "samples per optimizer step over all data-parallel ranks")
    seq_length: int = _opt(256, "tokens per sample (image tokens included)")
    train_iters: int = _opt(100, "optimizer steps to run")
    # Optimizer.
    lr: float = _opt(1e-4, "peak learning rate")
    min_lr: float = _opt(0.0, "learning rate at the end of the decay")
    lr_decay_style: Literal["constant", "linear", "cosine"] = _opt("cosine", "decay after warmup")
    lr_warmup_iters: int = _opt(0, "linear warmup steps from 0 to --lr")
    lr_decay_iters: int | None = _opt(None, "steps from the start to the end of decay", default_help="--train-iters")
    projector_lr: float | None = _opt(None, "peak learning rate of the projector", default_help="--lr")
    vision_lr: float | None = _opt(None, "peak learning rate of the vision tower", default_help="--lr")
    weight_decay: float = _opt(0.0, "AdamW weight decay (never applied to biases and norms)")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    clip_grad: float = _opt(1.0, "clip the global gradient norm to this (0 disables)")
    # Precision.
    bf16: bool = _opt(False, "bf16 parameters and compute, fp32 master weights and grads")
    fp16: bool = _opt(False, "fp16 parameters and compute with a dynamic loss scaler")
    initial_loss_scale: float = _opt(2.0**16, "fp16: starting loss scale")
    loss_scale_window: int = _opt(1000, "fp16: good steps before the loss scale doubles")
    max_skipped_iters_in_a_row: int = _opt(10, "stop after this many consecutive non-finite steps")
    # Data parallelism.
    use_distributed_optimizer: bool = _opt(False, "shard fp32 master weights and Adam states over dp")
    overlap_grad_reduce: bool = _opt(False, "start the dp gradient sync of a bucket during backward")
    ddp_bucket_size: int = _opt(40_000_000, "elements per gradient bucket")
    # Model-level switches.
    # None: keep what the model section says; a flag (or its --no- form) overrides it.
    freeze_LM: bool | None = _opt(None, "do not train the language model", flag="--freeze-LM",
                                  default_help="model.freeze_language")
    freeze_ViT: bool | None = _opt(None, "do not train the vision tower", flag="--freeze-ViT",
                                   default_help="model.freeze_vision")
    freeze_projector: bool | None = _opt(None, "do not train the projector", default_help="model.freeze_projector")
    # Parameter-efficient fine-tuning (megamm.config.lora; docs/training.md, "LoRA").
    lora_rank: int | None = _opt(None, "LoRA: train rank-r adapters on the targeted layers; the parts holding "
                                 "targets freeze their base weights (default: no LoRA)")
    lora_alpha: float | None = _opt(None, "LoRA: the adapter update is scaled by alpha / rank",
                                    default_help="--lora-rank")
    lora_dropout: float = _opt(0.0, "LoRA: dropout on the adapters' input")
    lora_target_modules: list[str] | None = _opt(  # noqa: RUF009
        None, "LoRA: layers that get adapters: " + ", ".join(TARGET_NAMES) + " (comma- or space-separated)",
        default_help=",".join(DEFAULT_TARGETS),
    )
    lora_use_dora: bool = _opt(False, "LoRA: DoRA, a trained magnitude per output feature of the adapted weight")
    pretrained_checkpoint: str | None = _opt(
        None, "LoRA: the base model's checkpoint (model weights only, any layout); --load and --save then hold "
        "the adapters and their optimizer state only"
    )
    recompute_granularity: Literal["none", "full", "selective"] = _opt(
        "none", "activation recompute: whole layers (full) or the attention core (selective)"
    )
    recompute_num_layers: int | None = _opt(None, "with full recompute: layers per stage to recompute",
                                            default_help="all")
    torch_compile: bool = _opt(False, "compile each transformer layer with torch.compile (inductor; the first "
                                      "step compiles and is left out of the throughput)")
    seed: int = _opt(1234, "seed for init, data order and dropout")
    # Data.
    mock_data: bool = _opt(False, "train on the deterministic synthetic multimodal dataset")
    images_per_sample: int = _opt(1, "mock data: most images in one sample (0 gives text-only data)")
    # _opt returns a dataclasses.field, so the None default is not shared mutable state.
    data_path: list[str] | None = _opt(  # noqa: RUF009
        None, "training data: path(s) or 'weight path' pairs; LLaVA or caption JSON/JSONL, .tar shards, "
        "a directory or glob of shards"
    )
    valid_data_path: list[str] | None = _opt(None, "validation data, same forms as --data-path")  # noqa: RUF009
    image_folder: str | None = _opt(None, "directory the JSON rows' image paths are relative to (and confined to)")
    tokenizer_model: str | None = _opt(None, "sentencepiece .model, tokenizer.json, or a directory with one")
    chat_template: str = _opt("llava_v1", "conversation format: " + ", ".join(CHAT_TEMPLATES.names()))
    image_aspect_ratio: Literal["pad", "crop", "resize"] = _opt(
        "pad", "single-image preprocessing: pad to square with the mean color, center crop, or squash"
    )
    image_normalization: str | None = _opt(
        None, "pixel statistics of a vision tower family: " + ", ".join(VISION_TOWERS.names()),
        default_help="the model's vision.family"
    )
    max_image_tiles: int = _opt(1, "dynamic tiling: most tiles per image, plus a thumbnail (1: no tiling)")
    tile_tags: bool = _opt(False, "NVLM-style tile tags: a tag before each tile's image tokens (<tile_1> ... "
                                  "<tile_global_thumbnail>); with --chat-template " + ", ".join(TILE_TAG_TEMPLATES)
                                  + " and --max-image-tiles > 1")
    # Native-resolution towers (vision.native_resolution, the Qwen2-VL family) resize each image into a
    # pixel range instead of to image_size; None: Qwen2-VL's processors' value.
    min_pixels: int | None = _opt(None, "native-resolution tower: fewest pixels an image is resized to",
                                  default_help=str(IMAGE_MIN_PIXELS))
    max_pixels: int | None = _opt(None, "native-resolution tower: most pixels an image is resized to",
                                  default_help=str(IMAGE_MAX_PIXELS))
    video_min_pixels: int | None = _opt(None, "native-resolution tower: fewest pixels per video frame",
                                        default_help=str(VIDEO_MIN_PIXELS))
    video_max_pixels: int | None = _opt(None, "native-resolution tower: most pixels per video frame",
                                        default_help=str(VIDEO_MAX_PIXELS))
    video_fps: float | None = _opt(None, "native-resolution tower: video frames sampled per second",
                                   default_help=str(VIDEO_FPS))
    video_max_frames: int | None = _opt(None, "native-resolution tower: most frames sampled from a video; "
                                        "LLaVA-OneVision (model.anyres with language.video_token_id): the "
                                        "frames taken from every video",
                                        default_help=f"{VIDEO_MAX_FRAMES}; LLaVA-OneVision {ONEVISION_VIDEO_FRAMES}")
    pack_sequences: bool = _opt(False, "pack several samples per row with per-sample attention and positions")
    balance_vision_work: bool = _opt(
        False, "assign each global batch's samples to data-parallel ranks and microbatches by estimated "
        "vision + text FLOPs (longest first), instead of contiguous slices"
    )
    num_workers: int = _opt(2, "data loader worker processes per rank (0: read in the training process)")
    max_bad_sample_fraction: float = _opt(0.5, "stop when more than this fraction of the samples read are bad")
    # Checkpoints.
    save: str | None = _opt(None, "directory for checkpoints (iter_NNNNNNN/ and latest)")
    save_interval: int | None = _opt(None, "save every this many steps (and always at the end)")
    keep_last_checkpoints: int | None = _opt(None, "delete all but the newest N checkpoints")
    async_save: bool = _opt(False, "write checkpoints in the background while training continues")
    load: str | None = _opt(None, "checkpoint to resume from (a checkpoint or a --save directory)")
    load_optim: bool = _opt(True, "load the optimizer state (--no-load-optim: the model only)")
    load_rng: bool = _opt(True, "load the generator states (--no-load-rng: reseed from --seed)")
    finetune: bool = _opt(False, "load only the model weights and start at iteration 0")
    verify_checkpoint: bool = _opt(True, "check the files a load reads against the checkpoint's checksums "
                                         "(--no-verify-checkpoint: skip, e.g. for a checkpoint without them)")
    # Stopping early (a checkpoint is saved, the exit status is 4: rerun the same command to continue).
    exit_interval: int | None = _opt(None, "stop after an iteration that is a multiple of this")
    exit_duration_in_mins: float | None = _opt(
        None, "stop after the step during which the run's wall time passed this many minutes"
    )
    # Evaluation and logging.
    eval_interval: int = _opt(0, "evaluate every this many steps (0: only at the end if --eval-iters)")
    eval_iters: int = _opt(0, "global batches per evaluation (0 disables evaluation)")
    log_interval: int = _opt(10, "print a log line every this many steps")
    tensorboard_dir: str | None = _opt(None, "write TensorBoard scalars here")
    wandb_project: str | None = _opt(None, "log the scalars and the run config to this Weights & Biases project")
    wandb_exp_name: str | None = _opt(None, "the Weights & Biases run name (needed with --wandb-project)")
    wandb_save_dir: str | None = _opt(None, "where the Weights & Biases run directory goes",
                                      default_help="--save/wandb")
    peak_tflops: float | None = _opt(None, "device peak TFLOP/s for MFU", default_help="known GPUs, none on CPU")
    straggler_threshold: float = _opt(
        1.2, "show the spread of step times across ranks in the log line when slowest / fastest exceeds this"
    )
    # Reliability.
    stack_dump_dir: str | None = _opt(
        None, "write each rank's Python stacks to stacks-rank<R>.txt here when it stalls or is terminated "
        "(default: --save; without either, stderr only)"
    )

    @property
    def lr_decay_length(self) -> int:
        """Steps from the start to the end of the learning-rate decay."""
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.train_iters

    @property
    def lora(self) -> LoraConfig | None:
        """The LoRA settings (None without --lora-rank)."""
        if self.lora_rank is None:
            return None
        alpha = float(self.lora_rank) if self.lora_alpha is None else self.lora_alpha
        return LoraConfig(self.lora_rank, alpha, self.lora_dropout, split_targets(self.lora_target_modules),
                          self.lora_use_dora)

    @property
    def wandb_dir(self) -> str | None:
        """Where the Weights & Biases run directory goes: --wandb-save-dir, else <--save>/wandb (as
        Megatron); None without --wandb-project."""
        if not self.wandb_project:
            return None
        return self.wandb_save_dir or (str(Path(self.save) / "wandb") if self.save else None)

    @property
    def precision(self) -> str:
        """The precision name --bf16 / --fp16 select: "fp32", "bf16" or "fp16"."""
        return precision_name(self.bf16, self.fp16)

    @property
    def params_dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def image_pixel_range(self) -> tuple[int, int]:
        """(min, max) pixels a native-resolution tower's images are resized into."""
        return (IMAGE_MIN_PIXELS if self.min_pixels is None else self.min_pixels,
                IMAGE_MAX_PIXELS if self.max_pixels is None else self.max_pixels)

    @property
    def video_pixel_range(self) -> tuple[int, int]:
        """(min, max) pixels per frame a native-resolution tower's videos are resized into."""
        return (VIDEO_MIN_PIXELS if self.video_min_pixels is None else self.video_min_pixels,
                VIDEO_MAX_PIXELS if self.video_max_pixels is None else self.video_max_pixels)

    @property
    def video_sampling(self) -> tuple[float, int]:
        """(frames per second, most frames) a native-resolution tower's videos are sampled at."""
        return (VIDEO_FPS if self.video_fps is None else self.video_fps,
                VIDEO_MAX_FRAMES if self.video_max_frames is None else self.video_max_frames)

    @property
    def anyres_video_frames(self) -> int:
        """Frames taken from every video of a LLaVA-OneVision run: one count for all, since the model
        takes one frame count per microbatch (megamm.data.anyres_videos)."""
        return ONEVISION_VIDEO_FRAMES if self.video_max_frames is None else self.video_max_frames

    def microbatches_per_step(self, data_parallel_size: int) -> int:
        """Microbatches each data-parallel rank runs per optimizer step (gradient accumulation)."""
        return self.global_batch_size // (self.micro_batch_size * data_parallel_size)


@dataclass
class RunConfig:
    model: LlavaConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def problems(self, world_size: int) -> list[str]:
        """Every violation, in groups; a group that uses a field whose value did not parse (see
        megamm.config.unparsed) is skipped, so that field's own problem stands alone."""
        t = self.training
        return gather(
            lambda: training_model_config(self).problems(self.parallel, seq_length=t.seq_length),
            lambda: _batch_problems(self, world_size),
            lambda: layout_problems(
                self.model.language.transformer.num_layers, self.parallel.pipeline_model_parallel_size,
                self.parallel.num_layers_per_virtual_pipeline_stage,
                self.parallel.decoder_first_pipeline_num_layers, self.parallel.decoder_last_pipeline_num_layers,
            ),
            lambda: _schedule_problems(self, world_size),
            *(lambda name=name: _at_least(t, name, 1) for name in (
                "train_iters", "seq_length", "log_interval", "ddp_bucket_size", "max_skipped_iters_in_a_row")),
            *(lambda name=name: _at_least(t, name, 0) for name in (
                "eval_interval", "eval_iters", "lr_warmup_iters", "images_per_sample")),
            lambda: ["--bf16 and --fp16 are mutually exclusive"] if t.bf16 and t.fp16 else [],
            lambda: [f"need 0 <= --min-lr ({t.min_lr}) <= --lr ({t.lr})"]
            if t.lr < 0 or t.min_lr < 0 or t.min_lr > t.lr else [],
            lambda: [f"--lr-warmup-iters {t.lr_warmup_iters} exceeds the decay length {t.lr_decay_length}"]
            if t.lr_warmup_iters > t.lr_decay_length else [],
            *(lambda flag=flag, value=value: [f"{flag} is a multiple of the --lr schedule and needs --lr > 0"]
              if value is not None and t.lr <= 0 else []
              for flag, value in (("--vision-lr", t.vision_lr), ("--projector-lr", t.projector_lr))),
            lambda: ["--clip-grad must be >= 0"] if t.clip_grad < 0 else [],
            lambda: ["--save-interval needs --save and a value >= 1"]
            if t.save_interval is not None and (t.save_interval < 1 or not t.save) else [],
            lambda: ["--async-save needs --save"] if t.async_save and not t.save else [],
            lambda: ["--keep-last-checkpoints must be >= 1"]
            if t.keep_last_checkpoints is not None and t.keep_last_checkpoints < 1 else [],
            lambda: ["--finetune needs --load"] if t.finetune and not t.load else [],
            lambda: ["--no-verify-checkpoint needs --load or --pretrained-checkpoint"]
            if not t.verify_checkpoint and not (t.load or t.pretrained_checkpoint) else [],
            lambda: ["--exit-interval needs --save (the checkpoint to continue from) and a value >= 1"]
            if t.exit_interval is not None and (t.exit_interval < 1 or not t.save) else [],
            lambda: ["--exit-duration-in-mins needs --save (the checkpoint to continue from) and a value > 0"]
            if t.exit_duration_in_mins is not None and (not t.exit_duration_in_mins > 0 or not t.save) else [],
            lambda: [f"--distributed-timeout-minutes must be > 0 (fractions allowed), got {timeout}"]
            if not (timeout := self.parallel.distributed_timeout_minutes) > 0 else [],
            lambda: [f"--straggler-threshold is a ratio of step times, must be >= 1, got {threshold}"]
            if not (threshold := t.straggler_threshold) >= 1 else [],
            lambda: data_problems(t),
            lambda: native_data_problems(self),
            lambda: anyres_data_problems(self),
            lambda: compile_problems(self),
            lambda: _trainable_problems(self),
            lambda: lora_problems(self),
            lambda: ["--tensorboard-dir needs the tensorboard package (pip install tensorboard)"]
            if t.tensorboard_dir and importlib.util.find_spec("tensorboard") is None else [],
            lambda: wandb_problems(t),
        )


def _batch_problems(run: RunConfig, world_size: int) -> list[str]:
    """The world must split into model replicas, and the global batch into their microbatches."""
    t, p = run.training, run.parallel
    ranks = p.ranks_per_replica
    if ranks < 1 or world_size % ranks:
        return [(f"world size {world_size} not divisible by tensor ({p.tensor_model_parallel_size}) x "
                f"context ({p.context_parallel_size}) x pipeline ({p.pipeline_model_parallel_size}) "
                "parallel sizes")]
    if t.micro_batch_size < 1:
        return ["--micro-batch-size must be >= 1"]
    dp = p.data_parallel_size(world_size)
    unit = t.micro_batch_size * dp
    if t.global_batch_size < unit or t.global_batch_size % unit:
        return [(f"--global-batch-size {t.global_batch_size} must be a positive multiple of "
                f"--micro-batch-size {t.micro_batch_size} x data-parallel size {dp} = {unit}")]
    return []


def _schedule_problems(run: RunConfig, world_size: int) -> list[str]:
    """The pipeline schedule's microbatch rule, once the batch arithmetic holds."""
    t, p = run.training, run.parallel
    if _batch_problems(run, world_size):
        return []
    chunks = virtual_stages(
        run.model.language.transformer.num_layers, p.pipeline_model_parallel_size,
        p.num_layers_per_virtual_pipeline_stage,
    )
    return schedule_problems(p.pipeline_model_parallel_size, chunks, t.microbatches_per_step(p.data_parallel_size(world_size)))


def _at_least(t: TrainingConfig, name: str, least: int) -> list[str]:
    value = getattr(t, name)
    return [f"--{name.replace('_', '-')} must be >= {least}, got {value}"] if value < least else []


def _trainable_problems(run: RunConfig) -> list[str]:
    model = training_model_config(run)
    if run.training.lora_rank is None and model.freeze_language and model.freeze_vision and model.freeze_projector:
        return ["the language model, vision tower and projector are all frozen: nothing to train"]
    return []


# The part a LoRA target can sit in -> (its freeze flag, the TrainingConfig field of that flag).
_FREEZE_FLAGS = {"language model": ("--freeze-LM", "freeze_LM"), "vision tower": ("--freeze-ViT", "freeze_ViT"),
                 "projector": ("--freeze-projector", "freeze_projector")}


def lora_problems(run: RunConfig) -> list[str]:
    """LoRA flags: they need --lora-rank; numbers in range; known targets; a part holding targets
    trains only its adapters, so --no-freeze-* of that part contradicts them; --pretrained-checkpoint
    is the base of a LoRA run only."""
    t = run.training
    if t.lora_rank is None:
        given = [flag for flag, value in (
            ("--lora-alpha", t.lora_alpha), ("--lora-target-modules", t.lora_target_modules),
            ("--pretrained-checkpoint", t.pretrained_checkpoint)) if value is not None]
        given += [flag for flag, on in (("--lora-dropout", t.lora_dropout != 0.0), ("--lora-use-dora", t.lora_use_dora))
                  if on]
        return [f"{flag} needs --lora-rank" for flag in given]
    lora = t.lora
    gated = run.model.language.transformer.activation == "swiglu"
    return gather(
        lambda: number_problems(lora.rank, lora.alpha, lora.dropout),
        lambda: target_problems(lora.targets, gated),
        lambda: [f"{flag[0]} is off, but --lora-target-modules puts adapters in the {part}, whose base weights "
                 "LoRA freezes" for part, flag in _FREEZE_FLAGS.items()
                 if part.split()[0] in lora.parts and getattr(t, flag[1]) is False],
        lambda: [("--pretrained-checkpoint and --finetune: the base comes from --pretrained-checkpoint, "
                 "--load resumes the adapters")] if t.pretrained_checkpoint and t.finetune else [],
    )


def compile_problems(run: RunConfig) -> list[str]:
    """What --torch-compile cannot do (megamm.transformer.compile): dropout in a compiled layer, the
    layers' own or LoRA's on the adapters' input (it draws from the tensor-parallel RNG tracker's
    forked streams, which do not trace, and inductor's random numbers would differ from eager's),
    and, without CUDA, inductor's C++ backend needs a C++ compiler."""
    if not run.training.torch_compile:
        return []
    problems = [
        f"--torch-compile needs model.{tower}.transformer.{name} = 0 (dropout in a compiled layer does not "
        f"trace through the tensor-parallel RNG streams), got {value}"
        for tower, transformer in (("vision", run.model.vision.transformer),
                                   ("language", run.model.language.transformer))
        for name in ("attention_dropout", "hidden_dropout")
        if (value := getattr(transformer, name)) != 0
    ]
    cp = run.parallel.context_parallel_size
    if cp > 1:
        problems.append(f"--torch-compile with --context-parallel-size {cp}: ring attention's point-to-point "
                        "exchanges do not trace into a compiled layer")
    if run.training.lora_rank is not None and run.training.lora_dropout != 0:
        problems.append(f"--torch-compile needs --lora-dropout 0 (dropout in a compiled layer does not trace "
                        f"through the tensor-parallel RNG streams), got {run.training.lora_dropout}")
    if not torch.cuda.is_available():
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            get_cpp_compiler()
        except InvalidCxxCompiler as error:
            problems.append(f"--torch-compile on the CPU needs a C++ compiler for inductor (set CXX or install "
                            f"g++): {error}")
    return problems


def data_problems(t: TrainingConfig) -> list[str]:
    """Violations among the data flags (files are checked to exist, not opened: the training layer
    probes what they hold), each check on its own so that a field that did not parse skips only its
    checks."""
    return gather(
        lambda: ["no training data: pass --data-path (dataset files) or --mock-data (synthetic data)"]
        if not t.mock_data and not t.data_path else [],
        lambda: ["--mock-data and --data-path are mutually exclusive"] if t.mock_data and t.data_path else [],
        lambda: ["--data-path needs --tokenizer-model"] if t.data_path and not t.tokenizer_model else [],
        lambda: [f"--tokenizer-model {t.tokenizer_model}: no such file or directory"]
        if t.tokenizer_model and not Path(t.tokenizer_model).exists() else [],
        lambda: [f"--image-folder {t.image_folder}: no such directory"]
        if t.image_folder and not Path(t.image_folder).is_dir() else [],
        lambda: [CHAT_TEMPLATES.unknown(t.chat_template, "--chat-template")]
        if t.chat_template not in CHAT_TEMPLATES else [],
        lambda: [VISION_TOWERS.unknown(t.image_normalization, "--image-normalization")]
        if t.image_normalization is not None and t.image_normalization not in VISION_TOWERS else [],
        lambda: ["--eval-iters with --data-path needs --valid-data-path"]
        if t.data_path and t.eval_iters and not t.valid_data_path else [],
        lambda: ["--pack-sequences needs --data-path"] if t.pack_sequences and not t.data_path else [],
        lambda: ["--balance-vision-work needs --data-path (it weighs the samples of dataset files)"]
        if t.balance_vision_work and not t.data_path else [],
        lambda: _at_least(t, "max_image_tiles", 1),
        lambda: _tile_tag_problems(t),
        lambda: _at_least(t, "num_workers", 0),
        lambda: [f"--max-bad-sample-fraction must be in [0, 1], got {t.max_bad_sample_fraction}"]
        if not 0.0 <= t.max_bad_sample_fraction <= 1.0 else [],
    )


def _tile_tag_problems(t: TrainingConfig) -> list[str]:
    """--tile-tags tags the tiles of dynamic tiling, in a template that writes them."""
    if not t.tile_tags:
        return []
    found = []
    if t.chat_template not in TILE_TAG_TEMPLATES:
        found.append(f"--tile-tags: --chat-template {t.chat_template} has no tile tags; use "
                     f"{', '.join(TILE_TAG_TEMPLATES)}")
    if t.max_image_tiles < 2:
        found.append(f"--tile-tags tags the tiles of dynamic tiling; --max-image-tiles is {t.max_image_tiles} "
                     f"(set it > 1)")
    return found


NATIVE_FLAGS = ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels", "video_fps", "video_max_frames")
NATIVE_TEMPLATE = "qwen2_vl"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def native_data_problems(run: RunConfig) -> list[str]:
    """The data flags and the vision tower must agree: the native-resolution flags need a native tower,
    which in turn needs the qwen2_vl chat template (its vision markers delimit every image and video for
    the M-RoPE positions) and takes neither tiles nor another family's statistics."""
    t, vision = run.training, run.model.vision
    native = vision.native_resolution
    given = [_flag(name) for name in NATIVE_FLAGS if getattr(t, name) is not None
             and not (name == "video_max_frames" and takes_anyres_videos(run.model))]
    if native is None:
        return [(f"{', '.join(given)}: for a native-resolution vision tower (vision.native_resolution); the "
                 f"{vision.family} tower takes images of vision.image_size {vision.image_size}")] if given else []
    found = []
    for name in NATIVE_FLAGS:
        value = getattr(t, name)
        if value is not None and not value > 0:
            found.append(f"{_flag(name)} must be positive, got {value}")
    if found:
        return found
    for what, (low, high) in (("", t.image_pixel_range), ("video-", t.video_pixel_range)):
        if low > high:
            found.append(f"--{what}min-pixels {low} is larger than --{what}max-pixels {high}")
    if t.video_sampling[1] < native.temporal_patch_size:
        found.append(f"--video-max-frames {t.video_sampling[1]} is below one temporal patch "
                     f"(vision.native_resolution.temporal_patch_size {native.temporal_patch_size})")
    if t.data_path and t.chat_template != NATIVE_TEMPLATE:
        found.append(f"--chat-template {t.chat_template}: a native-resolution vision tower ({vision.family}) needs "
                     f"{NATIVE_TEMPLATE} (its vision start / end markers delimit each image and video)")
    if t.max_image_tiles != 1:
        found.append(f"--max-image-tiles {t.max_image_tiles}: a native-resolution vision tower takes each image "
                     "whole at its own resolution, not tiled")
    if t.image_normalization is not None:
        found.append(f"--image-normalization {t.image_normalization}: a native-resolution vision tower "
                     "normalizes with its own (CLIP) statistics")
    return found


def takes_anyres_videos(model: LlavaConfig) -> bool:
    """Whether the model takes LLaVA-OneVision videos: an any-resolution layout and a video token."""
    return model.anyres is not None and model.language.video_token_id is not None


def anyres_data_problems(run: RunConfig) -> list[str]:
    """What an any-resolution model (model.anyres, LLaVA-NeXT) takes: images tiled at its own
    pinpoints (not --max-image-tiles), no probe-based balancing yet, and (LLaVA-OneVision) at least
    one frame per video."""
    t = run.training
    if run.model.anyres is None:
        return []
    found = []
    if takes_anyres_videos(run.model) and t.video_max_frames is not None and t.video_max_frames < 1:
        found.append(f"--video-max-frames {t.video_max_frames}: LLaVA-OneVision takes that many frames from "
                     "every video; give at least 1")
    if t.max_image_tiles != 1:
        found.append(f"--max-image-tiles {t.max_image_tiles}: an any-resolution model tiles each image at its "
                     f"model.anyres.image_grid_pinpoints, not by --max-image-tiles")
    if t.balance_vision_work:
        found.append("--balance-vision-work: not yet for an any-resolution model (model.anyres)")
    return found


def wandb_problems(t: TrainingConfig) -> list[str]:
    """The Weights & Biases flags, decided as Megatron does: a project needs a run name (Megatron
    raises without one) and the run directory defaults to <--save>/wandb; the name and directory
    flags mean nothing without a project, so they are refused rather than ignored."""
    if not t.wandb_project:
        return [f"{flag} needs --wandb-project" for flag, value in (
            ("--wandb-exp-name", t.wandb_exp_name), ("--wandb-save-dir", t.wandb_save_dir)) if value]
    return gather(
        lambda: ["--wandb-project needs --wandb-exp-name (the run's name)"] if not t.wandb_exp_name else [],
        lambda: ["--wandb-project needs --wandb-save-dir or --save (the run directory defaults to <--save>/wandb)"]
        if not t.wandb_save_dir and not t.save else [],
        lambda: ["--wandb-project needs the wandb package (pip install wandb, or megamm[wandb])"]
        if importlib.util.find_spec("wandb") is None else [],
    )


def training_model_config(config: RunConfig) -> LlavaConfig:
    """The model a training run builds: the model section with the training flags applied (parameter
    dtype, recompute, and the freeze flags where given; None keeps the model section's). With LoRA,
    a part that holds a target is frozen (its adapters, added by the model builder, train)."""
    t, model = config.training, config.model
    built = model.for_runtime(t.params_dtype, t.recompute_granularity, t.recompute_num_layers)
    lora_parts = t.lora.parts if t.lora_rank is not None else frozenset()
    return dataclasses.replace(
        built,
        freeze_vision="vision" in lora_parts or (model.freeze_vision if t.freeze_ViT is None else t.freeze_ViT),
        freeze_language="language" in lora_parts or (model.freeze_language if t.freeze_LM is None else t.freeze_LM),
        freeze_projector="projector" in lora_parts
        or (model.freeze_projector if t.freeze_projector is None else t.freeze_projector),
    )
