"""Native-resolution (Qwen2-VL family) microbatches, padded and packed: patches, grids and videos in token
order, and M-RoPE positions equal to transformers' `get_rope_index` (Qwen2.5-VL, so video positions
are time-scaled).

Padded rows: `get_rope_index` on the whole `[b, s]` batch, which takes the batch's grids in order, must
give the batch's `[3, b, s]` positions. Packed rows: every sample of a row, run alone through
`get_rope_index` with the next grids of the microbatch, must give its slice of the row, so the
positions restart per sample and the grids are in the order the tokens use them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megamm.data.batching import packed_microbatches, padded_microbatches
from megamm.data.native_samples import NativeSampleBuilder, NativeSettings
from megamm.data.samples import Sample
from megamm.data.tokenizer import Tokenizer
from tests.data.test_mrope import QWEN25, TOKENS_PER_SECOND
from tests.data.test_native_samples import (
    CONVERSATION,
    FRAMES,
    IMAGE_RES,
    VIDEO_RES,
    full_row,
    json_rows,
    qwen_tokenizer,
    write_native_files,
)

SETTINGS = NativeSettings(IMAGE_RES, VIDEO_RES, fps=2.0, tokens_per_second=TOKENS_PER_SECOND)
PATCH_DIM = (SETTINGS.patch_dim,)
PAD = 0


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, list[Sample]]:
    """Four samples: two images and a video; one image; a video alone (at another frame rate, so
    another time step); text only."""
    root = write_native_files(tmp_path_factory.mktemp("batching"))
    tokenizer = qwen_tokenizer(root)
    source = json_rows(root, [
        full_row(),
        {"image": "image1.png", "conversations": [{"from": "human", "value": "What is it?<image>"},
                                                  {"from": "gpt", "value": "The first one."}]},
        {"video": FRAMES[:8], "frame_rate": 8, "conversations": CONVERSATION[2:]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes."}]},
    ])
    builder = NativeSampleBuilder(tokenizer, "qwen2_vl", SETTINGS, 256)
    return tokenizer, [builder.build(source[i]) for i in range(len(source))]


def _reference(tokenizer: Tokenizer, ids: torch.Tensor, images, videos, seconds: list[float]) -> torch.Tensor:
    """transformers' positions `[3, b, s]` of `ids` `[b, s]` (no attention mask: padding is text)."""
    video_id = tokenizer.token_id("<|video_pad|>")
    types = (ids == tokenizer.image_token_id).int() + 2 * (ids == video_id).int()
    positions, _ = QWEN25.get_rope_index(
        ids, mm_token_type_ids=types, image_grid_thw=images, video_grid_thw=videos,
        second_per_grid_ts=torch.tensor(seconds) if seconds else None,
    )
    return positions


def _seconds(samples: list[Sample]) -> list[float]:
    return [second for sample in samples for second in sample.native.second_per_grid]


def test_padded_rows(data: tuple[Tokenizer, list[Sample]]) -> None:
    tokenizer, samples = data
    seq_length = max(len(s) for s in samples) + 5
    batches = padded_microbatches(samples, 3, seq_length, PAD, PATCH_DIM)
    assert len(batches) == 2
    for batch, group in zip(batches, (samples[:3], samples[3:]), strict=True):
        expected = _reference(tokenizer, batch["input_ids"], batch["image_grid_thw"], batch["video_grid_thw"],
                              _seconds(group))
        assert batch["position_ids"].shape == (3, len(group), seq_length)
        assert torch.equal(batch["position_ids"], expected)
    first = batches[0]
    assert first["images_per_sample"].tolist() == [2, 1, 0] and first["videos_per_sample"].tolist() == [1, 0, 1]
    assert torch.equal(first["pixel_values"], torch.cat([samples[0].pixel_values, samples[1].pixel_values]))
    assert torch.equal(first["image_grid_thw"],
                       torch.cat([samples[0].native.image_grid_thw, samples[1].native.image_grid_thw]))
    assert torch.equal(first["pixel_values_videos"], torch.cat(
        [samples[0].native.pixel_values_videos, samples[2].native.pixel_values_videos]))
    text_only = batches[1]
    assert text_only["pixel_values"] is None and text_only["image_grid_thw"] is None
    assert text_only["pixel_values_videos"] is None and text_only["video_grid_thw"] is None


def _segments(row: torch.Tensor, samples: list[Sample]) -> list[tuple[int, Sample]]:
    """(start, sample) of each sample found in a packed row, in row order."""
    found, start, left = [], 0, list(samples)
    while left:
        match = next((s for s in left if row[start : start + len(s)].tolist() == s.input_ids), None)
        if match is None:
            break
        found.append((start, match))
        left.remove(match)
        start += len(match)
    return found


def test_packed_rows(data: tuple[Tokenizer, list[Sample]]) -> None:
    """Rows of two samples or more (padding after them), positions restarting per sample as if alone."""
    tokenizer, samples = data
    seq_length = len(samples[0]) + len(samples[3]) + 3
    batches = packed_microbatches(samples, 2, seq_length, PAD, PATCH_DIM)
    seen = 0
    for batch in batches:
        images = videos = 0
        patches, video_patches = [], []
        for number, row in enumerate(batch["input_ids"]):
            segments = _segments(row, samples)
            seen += len(segments)
            end = 0
            for start, sample in segments:
                n_images, n_videos = sample.num_images, sample.num_videos
                grids = batch["image_grid_thw"][images : images + n_images] if n_images else None
                vgrids = batch["video_grid_thw"][videos : videos + n_videos] if n_videos else None
                alone = _reference(tokenizer, torch.tensor([sample.input_ids]), grids, vgrids, _seconds([sample]))
                assert torch.equal(batch["position_ids"][:, number, start : start + len(sample)], alone[:, 0])
                images, videos, end = images + n_images, videos + n_videos, start + len(sample)
                patches.append(sample.pixel_values)
                video_patches.append(sample.native.pixel_values_videos)
            assert (batch["position_ids"][:, number, end:] == 0).all()
            assert batch["images_per_sample"][number] == sum(s.num_images for _, s in segments)
            assert batch["videos_per_sample"][number] == sum(s.num_videos for _, s in segments)
        assert images == (0 if batch["image_grid_thw"] is None else len(batch["image_grid_thw"]))
        assert videos == (0 if batch["video_grid_thw"] is None else len(batch["video_grid_thw"]))
        if images:
            assert torch.equal(batch["pixel_values"], torch.cat(patches))
        if videos:
            assert torch.equal(batch["pixel_values_videos"], torch.cat(video_patches))
        assert batch["segment_ids"].shape == (len(batch["input_ids"]), seq_length)
    assert seen == len(samples)
    assert any(len(_segments(row, samples)) > 1 for batch in batches for row in batch["input_ids"])


def test_fixed_size_samples_are_refused(data: tuple[Tokenizer, list[Sample]], tmp_path: Path) -> None:
    _, samples = data
    fixed = Sample("s", 0, "fixed", [1, 2], [1, 2], torch.zeros(0, 3, 8, 8), [], [], [], "")
    with pytest.raises(ValueError, match="sample 'fixed' has no native-resolution inputs"):
        padded_microbatches([samples[3], fixed], 2, 64, PAD, PATCH_DIM)
