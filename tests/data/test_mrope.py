"""megamm.data.mrope against transformers' own `get_rope_index` (Qwen2-VL and Qwen2.5-VL).

`get_rope_index` is a method of Qwen2VLModel / Qwen2_5_VLModel that reads only `self.config` and
`self.get_vision_position_ids`, so it is called on a small host object holding a real config instead
of building a model. transformers 5 finds the vision tokens through `mm_token_type_ids` (0 text,
1 image, 2 video), which the test derives from the ids.
"""

from __future__ import annotations

import pytest
import torch

from megamm.data.mrope import mrope_position_delta, mrope_position_ids, packed_mrope_position_ids
from megamm.data.packing import packed_sequence

qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
qwen2_5_vl = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
transformers = pytest.importorskip("transformers")

IMAGE, VIDEO, START, END = 7, 8, 5, 6  # token ids of <|image_pad|>, <|video_pad|>, vision start / end
MERGE = 2


class Host:
    """Just what get_rope_index reads of the model."""

    def __init__(self, model_class: type, config: object) -> None:
        self.config = config
        self._model_class = model_class

    def get_vision_position_ids(self, *args, **kwargs) -> torch.Tensor:
        return self._model_class.get_vision_position_ids(self, *args, **kwargs)

    def get_rope_index(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self._model_class.get_rope_index(self, *args, **kwargs)


QWEN2 = Host(qwen2_vl.Qwen2VLModel, transformers.Qwen2VLConfig(vision_config={"spatial_merge_size": MERGE}))
TOKENS_PER_SECOND = 2
QWEN25 = Host(
    qwen2_5_vl.Qwen2_5_VLModel,
    transformers.Qwen2_5_VLConfig(
        vision_config={"spatial_merge_size": MERGE, "tokens_per_second": TOKENS_PER_SECOND}
    ),
)


def tokens(grid: tuple[int, int, int]) -> int:
    return grid[0] * grid[1] * grid[2] // MERGE**2


def vision(token: int, grid: tuple[int, int, int]) -> list[int]:
    return [START] + [token] * tokens(grid) + [END]


def text(n: int) -> list[int]:
    return [100 + i for i in range(n)]


# Two images of different sizes (a wide one, a tall one) and a video whose temporal extent (5 patches)
# is longer than its spatial one (2 x 2 merged), then more text.
IMAGE_GRIDS = [(1, 4, 6), (1, 8, 2)]
VIDEO_GRIDS = [(5, 4, 4)]
SEQUENCE = (
    text(3) + vision(IMAGE, IMAGE_GRIDS[0]) + text(2) + vision(IMAGE, IMAGE_GRIDS[1]) + text(4)
    + vision(VIDEO, VIDEO_GRIDS[0]) + text(5)
)  # fmt: skip


def reference(host: Host, ids: list[int], images: list, videos: list, **kwargs) -> tuple[torch.Tensor, int]:
    input_ids = torch.tensor([ids])
    types = (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()
    position_ids, deltas = host.get_rope_index(
        input_ids,
        mm_token_type_ids=types,
        image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor(videos) if videos else None,
        **kwargs,
    )
    return position_ids[:, 0], int(deltas[0, 0])


def ours(ids: list[int], images: list, videos: list, **kwargs) -> torch.Tensor:
    return mrope_position_ids(
        ids,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        spatial_merge_size=MERGE,
        image_grid_thw=images,
        video_grid_thw=videos,
        **kwargs,
    )


def test_qwen2_vl_images_and_video() -> None:
    expected, delta = reference(QWEN2, SEQUENCE, IMAGE_GRIDS, VIDEO_GRIDS)
    got = ours(SEQUENCE, IMAGE_GRIDS, VIDEO_GRIDS)
    assert got.dtype == torch.long and got.shape == (3, len(SEQUENCE))
    assert torch.equal(got, expected)
    assert mrope_position_delta(got) == delta


@pytest.mark.parametrize("seconds", [[1.0], [0.5], [0.75], [2.0]])
def test_qwen2_5_vl_time_scaled_video(seconds: list[float]) -> None:
    """Temporal positions step tokens_per_second * second_per_grid per temporal patch, truncated after
    the multiplication (0.5 s * 2 = 1 per patch; 0.75 s * 2 = 1.5: 0, 1, 3, 4, 6)."""
    second_per_grid = torch.tensor(seconds)
    expected, delta = reference(
        QWEN25, SEQUENCE, IMAGE_GRIDS, VIDEO_GRIDS, second_per_grid_ts=second_per_grid
    )
    got = ours(
        SEQUENCE, IMAGE_GRIDS, VIDEO_GRIDS, second_per_grid_ts=seconds, tokens_per_second=TOKENS_PER_SECOND
    )
    assert torch.equal(got, expected)
    assert mrope_position_delta(got) == delta


def test_video_positions_by_hand() -> None:
    """A video of 2 temporal patches of 2 x 2 merged tokens right after 2 text tokens (start 3, after
    <|vision_start|>), Qwen2.5-VL with 1.5 s per patch: temporal 3 + floor(k * 3)."""
    ids = text(2) + vision(VIDEO, (2, 4, 4)) + text(1)
    got = ours(ids, [], [(2, 4, 4)], second_per_grid_ts=[1.5], tokens_per_second=TOKENS_PER_SECOND)
    video = got[:, 3:11]
    assert video[0].tolist() == [3, 3, 3, 3, 6, 6, 6, 6]
    assert video[1].tolist() == [3, 3, 4, 4, 3, 3, 4, 4]
    assert video[2].tolist() == [3, 4, 3, 4, 3, 4, 3, 4]
    assert got[:, 11].tolist() == [5, 5, 5]  # <|vision_end|>: 3 + max(2, 2)
    assert got[:, :3].tolist() == [[0, 1, 2]] * 3


def test_text_only() -> None:
    got = ours(text(6), [], [])
    assert torch.equal(got, torch.arange(6).expand(3, -1))
    assert mrope_position_delta(got) == 0


def test_packed_row_restarts_per_sample() -> None:
    """A packed row of two samples (and padding): each sample's positions equal transformers' on that
    sample alone; the grids of the row are taken in order."""
    first_images, first_videos = IMAGE_GRIDS, VIDEO_GRIDS
    second_images, second_videos = [(1, 2, 4)], [(2, 2, 2)]
    second = text(2) + vision(VIDEO, second_videos[0]) + text(1) + vision(IMAGE, second_images[0]) + text(3)
    row = packed_sequence(
        [{"input_ids": SEQUENCE, "labels": SEQUENCE}, {"input_ids": second, "labels": second}],
        capacity=len(SEQUENCE) + len(second) + 4,
        pad_id=0,
    )
    seconds = [0.5, 1.0]
    got = packed_mrope_position_ids(
        row["input_ids"],
        row["cu_seqlens"],
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        spatial_merge_size=MERGE,
        image_grid_thw=first_images + second_images,
        video_grid_thw=first_videos + second_videos,
        second_per_grid_ts=seconds,
        tokens_per_second=TOKENS_PER_SECOND,
    )
    split = len(SEQUENCE)
    alone_first, _ = reference(
        QWEN25, SEQUENCE, first_images, first_videos, second_per_grid_ts=torch.tensor(seconds[:1])
    )
    alone_second, _ = reference(
        QWEN25, second, second_images, second_videos, second_per_grid_ts=torch.tensor(seconds[1:])
    )
    assert torch.equal(got[:, :split], alone_first)
    assert torch.equal(got[:, split : split + len(second)], alone_second)
    assert torch.equal(got[:, split + len(second) :], torch.zeros(3, 4, dtype=torch.long))


def test_count_errors() -> None:
    with pytest.raises(
        ValueError, match=r"image 0: 6 image tokens in the sequence, but its grid \(1, 4, 4\) gives 4"
    ):
        ours(vision(IMAGE, (1, 4, 6)), [(1, 4, 4)], [])
    with pytest.raises(ValueError, match="image 1 has tokens but only 1 image grids"):
        ours(vision(IMAGE, (1, 4, 4)) + vision(IMAGE, (1, 4, 4)), [(1, 4, 4)], [])
    with pytest.raises(ValueError, match="2 image grids given but the sequence has 1 images"):
        ours(vision(IMAGE, (1, 4, 4)), [(1, 4, 4), (1, 4, 4)], [])
    with pytest.raises(ValueError, match="one second_per_grid_ts entry per video: 1 videos, none given"):
        ours(vision(VIDEO, (2, 4, 4)), [], [(2, 4, 4)], tokens_per_second=2)
    with pytest.raises(ValueError, match="do not add up"):
        packed_mrope_position_ids(
            vision(IMAGE, (1, 4, 6)),
            [0, 8],
            image_token_id=IMAGE,
            video_token_id=VIDEO,
            spatial_merge_size=MERGE,
            image_grid_thw=[(1, 4, 4)],
        )
