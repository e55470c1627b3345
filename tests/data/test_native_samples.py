"""Native-resolution (Qwen2-VL family) samples from JSON rows: images, frame-list videos, placeholders,
truncation and M-RoPE positions, against transformers.

The references are independent of megamm: transformers' `Qwen2VLImageProcessorPil` gives the image
patches and grids, the official chat template applied by transformers (`reference_ids` of
test_qwen_template) the ids once every pad is expanded to the processor's `grid.prod() // merge**2`,
and `get_rope_index` the positions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megamm.config.constants import IGNORE_INDEX
from megamm.data.native_resolution import NativeResolution
from megamm.data.native_samples import NativeSampleBuilder, NativeSettings
from megamm.data.samples import ImageSettings, SampleBuilder
from megamm.data.sources import BadSample, LlavaJsonSource
from megamm.data.tokenizer import Tokenizer, load_tokenizer
from megamm.data.video import load_frame_list
from tests.data.test_mrope import QWEN2, QWEN25, Host
from tests.data.test_qwen_template import CORPUS, reference_ids
from tests.data_fixtures import write_mp4, write_qwen_tokenizer

qwen2_vl_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

IMAGE_RES = NativeResolution(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 12)
VIDEO_RES = NativeResolution(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 4)
SETTINGS = NativeSettings(IMAGE_RES, VIDEO_RES, fps=2.0)
MERGE = 2
CONVERSATION = [
    {"from": "human", "value": "<image>Describe both pictures.\n<image>Which one is larger?"},
    {"from": "gpt", "value": "The first one, clearly."},
    {"from": "human", "value": "What happens in the video?<video>"},
    {"from": "gpt", "value": "A cat jumps onto the table."},
]
IMAGE_SIZES = [(40, 90), (100, 31)]  # (height, width): a wide and a tall image of different sizes


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_native_files(root: Path) -> Path:
    """Two images, twelve frame files (a 3-second video at 4 frames per second), a Qwen tokenizer."""
    for seed, (height, width) in enumerate(IMAGE_SIZES):
        _image(height, width, seed).save(root / f"image{seed}.png")
    (root / "clip").mkdir()
    for index in range(12):
        _image(48, 64, 10 + index).save(root / "clip" / f"{index:02d}.png")
    write_qwen_tokenizer(root / "tokenizer.json", CORPUS)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_native_files(tmp_path_factory.mktemp("native"))


def qwen_tokenizer(root: Path) -> Tokenizer:
    return load_tokenizer(root / "tokenizer.json", image_token="<|image_pad|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer(root: Path) -> Tokenizer:
    return qwen_tokenizer(root)


FRAMES = [f"clip/{index:02d}.png" for index in range(12)]


def json_rows(root: Path, rows: list[dict]) -> LlavaJsonSource:
    path = root / f"rows{abs(hash(json.dumps(rows)))}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return LlavaJsonSource(path, root)


def full_row(**fields) -> dict:
    return {"id": "s", "images": ["image0.png", "image1.png"], "videos": [FRAMES], "frame_rate": 4,
            "conversations": CONVERSATION, **fields}


def hf_positions(host: Host, ids: list[int], tokenizer: Tokenizer, images, videos, **kwargs) -> torch.Tensor:
    input_ids = torch.tensor([ids])
    video_id = tokenizer.token_id("<|video_pad|>")
    types = (input_ids == tokenizer.image_token_id).int() + 2 * (input_ids == video_id).int()
    positions, _ = host.get_rope_index(
        input_ids, mm_token_type_ids=types, image_grid_thw=images if len(images) else None,
        video_grid_thw=videos if len(videos) else None, **kwargs,
    )
    return positions[:, 0]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_sample_equals_transformers(root: Path, tokenizer: Tokenizer, family: str) -> None:
    """Two images of different sizes and a video interleaved with text: patches, grids, ids, labels and
    M-RoPE positions as transformers gives them (Qwen2.5-VL: video positions scaled by time)."""
    tokens_per_second = 2.0 if family == "qwen2_5_vl" else None
    settings = NativeSettings(IMAGE_RES, VIDEO_RES, fps=2.0, tokens_per_second=tokens_per_second)
    sample = NativeSampleBuilder(tokenizer, "qwen2_vl", settings, 512).build(json_rows(root, [full_row()])[0])
    images = [Image.open(root / f"image{seed}.png").convert("RGB") for seed in range(2)]
    processor = qwen2_vl_pil.Qwen2VLImageProcessorPil(
        min_pixels=IMAGE_RES.min_pixels, max_pixels=IMAGE_RES.max_pixels, patch_size=14, merge_size=MERGE,
        temporal_patch_size=2,
    )
    expected = processor(images, return_tensors="pt")
    native = sample.native
    assert torch.equal(sample.pixel_values, expected["pixel_values"])
    assert torch.equal(native.image_grid_thw, expected["image_grid_thw"])
    assert native.image_grid_thw.tolist() != [native.image_grid_thw[0].tolist()] * 2  # the sizes differ
    video = load_frame_list(FRAMES, root, frame_rate=4.0, fps=2.0, resolution=VIDEO_RES)
    assert torch.equal(native.pixel_values_videos, video.pixel_values)
    assert native.video_grid_thw.tolist() == [list(video.grid_thw)] and native.second_per_grid == [1.0]
    image_counts = [int(grid.prod()) // MERGE**2 for grid in expected["image_grid_thw"]]
    video_counts = [video.grid_thw[0] * video.grid_thw[1] * video.grid_thw[2] // MERGE**2]
    assert sample.input_ids == reference_ids(root / "tokenizer.json", CONVERSATION, image_counts, video_counts)
    spans = sample.image_spans + native.video_spans
    assert [end - start for start, end in spans] == image_counts + video_counts
    assert all(sample.labels[i] == IGNORE_INDEX for start, end in spans for i in range(start, end))
    host, kwargs = (QWEN2, {}) if family == "qwen2_vl" else (QWEN25, {"second_per_grid_ts": torch.tensor([1.0])})
    reference = hf_positions(host, sample.input_ids, tokenizer, expected["image_grid_thw"],
                              native.video_grid_thw, **kwargs)
    assert torch.equal(native.position_ids, reference)
    assert sample.num_images == 2 and sample.num_videos == 1


def test_truncation_never_cuts_a_vision_span(root: Path, tokenizer: Tokenizer) -> None:
    """A cut inside an image (markers included) drops the sample as too_long; a cut in the text after
    the images keeps them and drops the video that lies wholly after the cut."""
    record = json_rows(root, [full_row()])[0]
    full = NativeSampleBuilder(tokenizer, "qwen2_vl", SETTINGS, 512).build(record)
    (first_start, first_end), (second_start, second_end) = full.image_spans
    video_start = full.native.video_spans[0][0]
    for cut in (first_start, first_end, second_start, second_end):  # past a vision start, not its end
        with pytest.raises(BadSample) as raised:
            NativeSampleBuilder(tokenizer, "qwen2_vl", SETTINGS, cut).build(record)
        assert raised.value.kind == "too_long" and "cuts through the vision span" in str(raised.value)
    kept = NativeSampleBuilder(tokenizer, "qwen2_vl", SETTINGS, video_start - 2).build(record)
    assert len(kept) == video_start - 2 and kept.truncated_from == len(full)
    assert kept.num_images == 2 and kept.num_videos == 0
    assert kept.native.pixel_values_videos.shape == (0, full.native.pixel_values_videos.shape[1])
    assert torch.equal(kept.pixel_values, full.pixel_values)
    assert torch.equal(kept.native.position_ids, full.native.position_ids[:, : len(kept)])
    # Cut right before the second image's <|vision_start|>: nothing trained is left.
    with pytest.raises(BadSample) as raised:
        NativeSampleBuilder(tokenizer, "qwen2_vl", SETTINGS, second_start - 1).build(record)
    assert raised.value.kind == "all_masked"


def test_video_records(root: Path) -> None:
    """The record forms of a video: a frame list, a video file path, LLaVA-Video's "<image>" for its
    one video, the implicit placeholder; and the errors, naming the row."""
    (root / "movie.mp4").write_bytes(b"not a video")
    source = json_rows(root, [
        {"video": "movie.mp4", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                 {"from": "gpt", "value": "A cat."}]},
        {"video": FRAMES, "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A."}]},
        {"videos": [FRAMES], "images": ["image0.png", "image1.png"], "conversations": CONVERSATION[2:]},
        {"video": "movie.mp4", "videos": [], "conversations": CONVERSATION},
        {"video": [], "conversations": CONVERSATION},
        {"video": FRAMES, "frame_rate": 0, "conversations": CONVERSATION},
        {"videos": [FRAMES, FRAMES], "conversations": CONVERSATION[2:]},
        {"video": "../outside.mp4", "conversations": CONVERSATION[2:]},
    ])
    assert source[0].videos == [str((root / "movie.mp4").resolve())]
    assert source[0].conversations[0]["value"] == "<video>\nWhat?" and source[0].images == []
    assert source[1].videos == [[str((root / f).resolve()) for f in FRAMES]] and source[1].frame_rate == 2.0
    assert source[1].conversations[0]["value"] == "<video>\nWhat?" and source[1].kind == "conversation"
    errors = {
        2: ("placeholders", "0 '<image>' placeholder(s) in the turns but 2 image(s)"),
        3: ("schema", "row has both 'video' and 'videos'"),
        4: ("schema", "video 0 must be a video file path or a non-empty list of frame paths"),
        5: ("schema", "'frame_rate' must be a positive number"),
        6: ("placeholders", "1 '<video>' placeholder(s) in the turns but 2 video(s)"),
        7: ("image", "outside image root"),
    }
    for row, (kind, message) in errors.items():
        with pytest.raises(BadSample) as raised:
            source[row]
        assert raised.value.kind == kind and f"row {row}" in str(raised.value) and message in str(raised.value)


def test_bad_videos_and_templates(root: Path, tokenizer: Tokenizer) -> None:
    """An undecodable video file is a 'video' bad sample naming it; the fixed-size builder refuses
    videos; the native builder needs the qwen2_vl template."""
    pytest.importorskip("av")
    (root / "broken.mp4").write_bytes(b"not a video")
    source = json_rows(root, [{"video": "broken.mp4", "conversations": CONVERSATION[2:]}])
    with pytest.raises(BadSample) as raised:
        NativeSampleBuilder(tokenizer, "qwen2_vl", SETTINGS, 512).build(source[0])
    assert raised.value.kind == "video" and "broken.mp4 cannot be decoded" in str(raised.value)
    with pytest.raises(TypeError, match="needs the qwen2_vl chat template .* got 'chatml'"):
        NativeSampleBuilder(tokenizer, "chatml", SETTINGS, 512)
    fixed = SampleBuilder(tokenizer, "qwen2_vl", ImageSettings(28), 4, 512)
    with pytest.raises(BadSample) as raised:
        fixed.build(source[0])
    assert raised.value.kind == "schema" and "only for a native-resolution vision tower" in str(raised.value)


def test_tokenizer_video_token_must_match_the_model(tokenizer: Tokenizer) -> None:
    from dataclasses import replace

    from megamm.data.qwen_template import VIDEO_PAD
    from megamm.data.tokenizer import check_tokenizer
    from tests.tiny import qwen2_vl_config

    language = replace(qwen2_vl_config().language, vocab_size=max(1024, tokenizer.vocab_size),
                       image_token_id=tokenizer.image_token_id)
    video_id = tokenizer.token_id(VIDEO_PAD)
    check_tokenizer(tokenizer, replace(language, video_token_id=video_id), "tok", (), VIDEO_PAD)
    with pytest.raises(ValueError, match=rf"video token '<\|video_pad\|>' id {video_id} but "
                                         rf"model.language.video_token_id is {video_id + 1}"):
        check_tokenizer(tokenizer, replace(language, video_token_id=video_id + 1), "tok", (), VIDEO_PAD)


# (height, width) beside the full row's wide and tall images: one scaled down to max_pixels, one scaled
# up to min_pixels, a square within the range.
PROBE_SIZES = [(300, 400), (10, 12), (84, 84)]


def test_probe_gives_the_built_counts(root: Path, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe that weighs a sample for --balance-vision-work: for images of several sizes, a
    frame-list video and a video file, the grids and token count of the built sample (truncation
    included), the same bad-sample kinds, and no pixel decoded."""
    av = pytest.importorskip("av")
    for seed, (height, width) in enumerate(PROBE_SIZES):
        _image(height, width, 20 + seed).save(root / f"probe{seed}.png")
    _image(3, 700, 30).save(root / "thin.png")
    write_mp4(root / "probe.mp4", [_image(40, 72, 40 + seed) for seed in range(16)], rate=8)
    turns = [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A cat."}]
    rows = [full_row(), {"images": ["image0.png", "image1.png"], "video": "probe.mp4", "conversations": CONVERSATION},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes."}]}]
    rows += [{"image": f"probe{seed}.png", "conversations": turns} for seed in range(len(PROBE_SIZES))]
    source = json_rows(root, [*rows, {"image": "thin.png", "conversations": turns}])
    builder = NativeSampleBuilder(tokenizer, "qwen2_vl", SETTINGS, 512)
    built = [builder.build(source[index]) for index in range(len(rows))]
    truncated = NativeSampleBuilder(tokenizer, "qwen2_vl", SETTINGS, built[1].native.video_spans[0][0] - 2)
    cases = [(builder, record, sample) for record, sample in zip((source[i] for i in range(len(rows))), built)]
    cases.append((truncated, source[1], truncated.build(source[1])))  # the video cut off, the images kept
    with monkeypatch.context() as patched:  # the probe decodes nothing: no image pixels, no video frame
        patched.setattr(Image.Image, "load", lambda self: pytest.fail("the probe decoded an image"))
        patched.setattr(av.container.InputContainer, "decode", lambda *a, **k: pytest.fail("the probe decoded"))
        layouts = [probe.probe(record) for probe, record, _ in cases]
        with pytest.raises(BadSample) as thin:
            builder.probe(source[len(rows)])
        with pytest.raises(BadSample) as too_long:
            NativeSampleBuilder(tokenizer, "qwen2_vl", SETTINGS, built[0].image_spans[0][0]).probe(source[0])
    for layout, (_, _, sample) in zip(layouts, cases):
        native = sample.native
        grids = native.image_grid_thw.tolist() + native.video_grid_thw.tolist()
        assert layout.grids == tuple(tuple(grid) for grid in grids), sample.sample_id
        assert layout.tokens == len(sample) and layout.tiles_per_image == tuple(sample.tiles_per_image)
    assert layouts[-1].grids == layouts[1].grids[:2] and cases[-1][2].num_videos == 0
    assert layouts[1].grids[2][0] == 2 and layouts[2].grids == ()  # the mp4: 4 of 16 frames at 2 fps
    assert len({grid for layout in layouts[3:6] for grid in layout.grids}) == 3  # the sizes differ
    with pytest.raises(BadSample) as built_thin:
        builder.build(source[len(rows)])
    assert thin.value.kind == built_thin.value.kind == "image" and "aspect ratio" in str(thin.value)
    assert too_long.value.kind == "too_long"


def assert_same_sample(ours, theirs) -> None:
    """Two native samples are the same to the model: ids, labels, patches, grids, videos, positions."""
    assert ours.input_ids == theirs.input_ids and ours.labels == theirs.labels
    assert torch.equal(ours.pixel_values, theirs.pixel_values)
    a, b = ours.native, theirs.native
    assert torch.equal(a.image_grid_thw, b.image_grid_thw) and torch.equal(a.video_grid_thw, b.video_grid_thw)
    assert torch.equal(a.pixel_values_videos, b.pixel_values_videos) and a.second_per_grid == b.second_per_grid
    assert torch.equal(a.position_ids, b.position_ids)


def write_video_files(root: Path) -> Path:
    """The native files plus `clip.mp4`: a 2-second 8 fps video of 40x72 frames (PyAV)."""
    write_native_files(root)
    write_mp4(root / "clip.mp4", [_image(40, 72, 40 + seed) for seed in range(16)], rate=8)
    return root


# Rows whose videos the other formats carry inside: two images and a frame-list video; a video file;
# a video file and a frame-list video (each JSON row here has its tar / table / Energon twin).
VIDEO_ROWS = [
    full_row(),
    {"id": "file", "video": "clip.mp4", "conversations": CONVERSATION[2:]},
    {"id": "both", "videos": ["clip.mp4", FRAMES], "frame_rate": 4,
     "conversations": [{"from": "human", "value": "<video> or <video>?"}, {"from": "gpt", "value": "The first."}]},
]
