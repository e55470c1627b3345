"""LLaVA-OneVision video samples from dataset files (megamm.data.anyres_videos through SampleBuilder).

The references are transformers': the frames a video gives are those `default_sample_indices_fn`
picks with `num_frames` (the sampler of LlavaOnevisionVideoProcessor), preprocessed with that
processor's own settings (resize to the tile with its resample, its rescale factor, normalization)
applied by transformers' PIL backend, since the processor itself runs on torchvision, which this
environment lacks; the video's token count is LlavaOnevisionProcessor's `replace_video_token` on
those reference frames. Truncation keeps videos whole, a short video is a bad sample, and
--video-max-frames reaches a run's samples. A tiny OneVision model trains on padded and packed
microbatches of an image, a video and a text-only sample built from a JSON dataset.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor
from transformers.video_utils import VideoMetadata, default_sample_indices_fn

from megamm.config import LlavaConfig
from megamm.config.anyres import AnyResConfig
from megamm.config.constants import IGNORE_INDEX
from megamm.data.anyres_videos import VideoSettings
from megamm.data.batching import packed_microbatches, padded_microbatches
from megamm.data.samples import ImageSettings, Sample, SampleBuilder
from megamm.data.sources import BadSample, LlavaJsonSource
from megamm.data.tokenizer import Tokenizer, load_tokenizer
from megamm.models.llava import LlavaModel, average_loss
from megamm.parallel.state import ParallelState
from tests.data_fixtures import DatasetFiles, model_for, write_dataset, write_mp4

av = pytest.importorskip("av")

PINPOINTS = ((16, 32), (32, 16), (32, 32))
TILE, GRID = 16, 4
FRAMES = 4
SEQ = 512
# The statistics of LLaVA-OneVision's SigLIP checkpoints (their processors' image_mean / image_std).
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
TEMPLATE = "llava_v1"


def _noise(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _row(sample_id: str, placeholder: str, answer: str, **media: object) -> str:
    question = f"{placeholder}\nName the color." if placeholder else "Say a color."
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return json.dumps({"id": sample_id, **media, "conversations": turns})


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> DatasetFiles:
    """write_dataset's tokenizer and images, and videos.jsonl: an image, a 7-frame video file, a
    6-frame frame list, a text-only row, a 3-frame video (too short for FRAMES) and an image then a
    video in the second user turn."""
    files = write_dataset(tmp_path_factory.mktemp("ovvideo"), rows=2)
    write_mp4(files.images / "clip.mp4", [_noise(20, 24, seed) for seed in range(7)], rate=5)
    write_mp4(files.images / "short.mp4", [_noise(20, 24, seed) for seed in range(3)], rate=5)
    frames = []
    for number in range(6):
        _noise(30, 20, 10 + number).save(files.images / f"frame{number}.png")
        frames.append(f"frame{number}.png")
    rows = [_row("image", "<image>", "It is red.", image="img0.png"),
            _row("video", "<video>", "It is blue.", video="clip.mp4"),
            _row("frames", "<video>", "It is green.", video=frames),
            _row("text", "", "red"),
            _row("short", "<video>", "It is red.", video="short.mp4"),
            json.dumps({"id": "late", "image": "img0.png", "video": "clip.mp4", "conversations": [
                {"from": "human", "value": "<image>\nSay a color."}, {"from": "gpt", "value": "red"},
                {"from": "human", "value": "<video>\nName the color."}, {"from": "gpt", "value": "It is blue."}]})]
    (files.root / "videos.jsonl").write_text("\n".join(rows) + "\n")
    return files


def _video_token(tokenizer: Tokenizer) -> int:
    """An id past the tokenizer's vocabulary, so no text encodes to it (the model's vocab is one larger)."""
    return tokenizer.vocab_size


def _builder(files: DatasetFiles, videos: bool = True) -> SampleBuilder:
    tokenizer = load_tokenizer(files.tokenizer)
    settings = ImageSettings(TILE, normalization="siglip", anyres=AnyResConfig(PINPOINTS),
                             videos=VideoSettings(FRAMES, _video_token(tokenizer)) if videos else None)
    return SampleBuilder(tokenizer, TEMPLATE, settings, GRID * GRID, SEQ)


def _source(files: DatasetFiles) -> LlavaJsonSource:
    return LlavaJsonSource(files.root / "videos.jsonl", files.images)


def _reference_frames(frames: list[Image.Image]) -> torch.Tensor:
    """`[FRAMES, 3, TILE, TILE]`: transformers' sampler and LlavaOnevisionVideoProcessor's steps."""
    indices = default_sample_indices_fn(VideoMetadata(total_num_frames=len(frames), fps=5), num_frames=FRAMES)
    video = LlavaOnevisionVideoProcessor
    backend = PilBackend(do_resize=video.do_resize, size={"height": TILE, "width": TILE}, resample=video.resample,
                         do_rescale=video.do_rescale, rescale_factor=video.rescale_factor,
                         do_normalize=video.do_normalize, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
                         do_convert_rgb=video.do_convert_rgb)
    return backend([frames[int(i)] for i in indices], return_tensors="pt")["pixel_values"]


def _decoded(path: Path) -> list[Image.Image]:
    with av.open(str(path)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


def _reference_tokens(reference: torch.Tensor) -> int:
    """LlavaOnevisionProcessor's expansion of one video (run on a stand-in holding the fields it reads)."""
    processor = SimpleNamespace(num_image_tokens=GRID * GRID, video_token="v")
    return len(LlavaOnevisionProcessor.replace_video_token(processor, {"pixel_values_videos": [reference]}, 0))


@pytest.mark.parametrize("sample_id", ["video", "frames"])
def test_video_frames_and_tokens_equal_transformers(files: DatasetFiles, sample_id: str) -> None:
    """A video file and a frame list: the frames taken, their pixels (fp32, 1e-6) and the video's
    tokens equal transformers'; the tokens are untrained; the probe gives the build's counts."""
    builder, source = _builder(files), _source(files)
    number = [source[i].sample_id for i in range(len(source))].index(sample_id)
    sample = builder.build(source[number])
    if sample_id == "video":
        frames = _decoded(files.images / "clip.mp4")
    else:
        frames = [Image.open(files.images / f"frame{i}.png").convert("RGB") for i in range(6)]
    reference = _reference_frames(frames)
    assert sample.pixel_values_videos is not None and sample.pixel_values_videos.shape == (1, *reference.shape)
    error = (sample.pixel_values_videos[0] - reference).abs().max().item()
    assert error <= 1e-6, f"video pixels off by {error:.2e}"
    token = _video_token(builder.tokenizer)
    positions = [i for i, t in enumerate(sample.input_ids) if t == token]
    assert len(positions) == _reference_tokens(reference)
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # one run
    assert all(sample.labels[i] == IGNORE_INDEX for i in positions)
    assert builder.probe(source[number]).tokens == len(sample)


def test_bad_videos_are_bad_samples_naming_the_sample(files: DatasetFiles) -> None:
    """A video shorter than the frames taken is "video" (build and probe); a record with videos for a
    model that takes none stays "schema"."""
    source = _source(files)
    short = source[[source[i].sample_id for i in range(len(source))].index("short")]
    for read in (_builder(files).build, _builder(files).probe):
        with pytest.raises(BadSample, match=r"id 'short'.*3 frames, fewer than the 4") as error:
            read(short)
        assert error.value.kind == "video"
    with pytest.raises(BadSample, match=r"id 'short'.*holds 1 video") as error:
        _builder(files, videos=False).build(short)
    assert error.value.kind == "schema"


def test_truncation_keeps_videos_whole(files: DatasetFiles) -> None:
    """A cut inside a video's tokens moves before the video, which is dropped with its frames (the
    image before it kept); a cut inside the first video drops the sample (too_long)."""
    source = _source(files)
    ids = [source[i].sample_id for i in range(len(source))]
    tokenizer, settings = load_tokenizer(files.tokenizer), _builder(files).images
    token = _video_token(tokenizer)

    def built(name: str, seq_length: int) -> Sample:
        return SampleBuilder(tokenizer, TEMPLATE, settings, GRID * GRID, seq_length).build(source[ids.index(name)])

    full = built("late", SEQ)
    start = full.input_ids.index(token)
    cut = built("late", start + 3)
    assert cut.input_ids == full.input_ids[:start] and cut.truncated_from == len(full)
    assert cut.pixel_values_videos is None and cut.num_videos == 0 and len(cut.image_sizes) == 1
    early = built("video", SEQ).input_ids.index(token)
    with pytest.raises(BadSample, match=r"id 'video'.*first image or video ends") as error:
        built("video", early + 3)
    assert error.value.kind == "too_long"


def _onevision_model(files: DatasetFiles) -> LlavaConfig:
    config = model_for(files.tokenizer)
    token = _video_token(load_tokenizer(files.tokenizer))
    language = replace(config.language, vocab_size=token + 1, video_token_id=token)
    return replace(config, language=language, anyres=AnyResConfig(PINPOINTS))


def _kept_samples(files: DatasetFiles) -> list[Sample]:
    builder, source = _builder(files), _source(files)
    return [builder.build(source[i]) for i in range(len(source)) if source[i].sample_id in ("image", "video", "text")]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_tiny_onevision_model_trains_on_the_dataset(files: DatasetFiles, packed: bool) -> None:
    """An image, a video and a text-only sample, padded (3 rows) or packed: the microbatch carries the
    video `[1, FRAMES, 3, TILE, TILE]` with its row's count, and the model's count checks accept it;
    forward and backward give a finite loss and gradients into the tower."""
    samples = _kept_samples(files)
    shape = (3, TILE, TILE)
    batches = packed_microbatches(samples, 3, SEQ, 0, shape) if packed else padded_microbatches(samples, 3, SEQ, 0, shape)
    assert len(batches) == 1
    batch = batches[0]
    assert batch["pixel_values_videos"].shape == (1, FRAMES, 3, TILE, TILE)
    assert int(batch["videos_per_sample"].sum()) == 1 and int(batch["images_per_sample"].sum()) == 1
    if packed:  # two of the three samples share a row (the other rows: one sample, and empty)
        assert sorted(int((row != 0).any()) for row in batch["input_ids"]) == [0, 1, 1]
    model = LlavaModel(_onevision_model(files), ParallelState.single())
    model.initialize(3)
    loss = average_loss(model(**batch))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.vision.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_the_run_flag_sets_the_frames_of_every_video(files: DatasetFiles) -> None:
    """--video-max-frames reaches a OneVision run's samples: the built video holds that many frames."""
    from megamm.config.resolved import resolve
    from megamm.config.run import RunConfig, TrainingConfig
    from megamm.training.data import build_sample_builder

    flags = {"mock_data": False, "data_path": [str(files.root / "videos.jsonl")], "image_folder": str(files.images),
             "tokenizer_model": str(files.tokenizer), "chat_template": TEMPLATE, "seq_length": SEQ,
             "video_max_frames": 3, "global_batch_size": 1, "micro_batch_size": 1, "train_iters": 1}
    config = resolve(RunConfig(model=_onevision_model(files), training=TrainingConfig(**flags)), 1)
    builder = build_sample_builder(config)
    sample = builder.build(_source(files)[1])
    assert sample.sample_id == "video" and sample.pixel_values_videos.shape[:2] == (1, 3)
