"""A prepared Megatron-Energon dataset (webdataset shards + `.nv-meta`) as a random-access record source.

Energon's own loader iterates, shuffles and shards inside its workers; megamm's loader needs records by
global index instead, so that its dp sharding, deterministic order and exact resume (positions ->
records, megamm.data.loader) stay the same for every format. So this reads through Energon's index and
sample APIs: `get_dataset_from_config` reads `.nv-meta/dataset.yaml` and `split.yaml` (the sample type,
the field map or sample loader, the split's shards), Energon's `ShardInfosITarReader` finds sample i
from the shards' `.tar.idx` offsets, and the factory's `load_sample` applies the dataset's field map.
Images are kept encoded (json and text parts are decoded as usual) so that they go through megamm's
image checks (decompression bombs, truncation) in the sample builder like every other format.

Sample types, mapped to records:

* `CaptioningSample` (image, caption): the turns human "<image>", gpt caption.
* `VQASample` (image, context, answers, answer_weights): human context (the image placeholder is
  prepended when the context has none), gpt the answer of largest weight (the first one without
  weights).
* `VidQASample` (video, context, answers, answer_weights): as VQA with the video (kept encoded, decoded
  by megamm.data.video with PyAV, not by Energon's AVDecoder) in place of the image; a context
  without a "<video>" placeholder gets one prepended.
* `CrudeWebdataset` samples: the dataset's own parts, read as megamm's tar shards are: a `json` part with
  a LLaVA row (multi-turn `conversations`) or a caption row, image parts `<key>.jpg` or
  `<key>.0.jpg`, `<key>.1.jpg`, ..., and video parts (`<key>.mp4`, or frame images
  `<key>.frames.0.jpg`, ...; megamm.data.tar_shards.video_parts). Energon has no multi-turn
  conversation type of its own; this is the form Megatron's conversation datasets take before their
  task encoder's cooker.

Index i is Energon's order: the split's shards in `split.yaml` order, samples in tar order. Datasets
whose split excludes single samples (`exclude` entries naming keys, not shards) are refused, since the
index would then count samples that are not there.
"""

from __future__ import annotations

import bisect
import json
import os
import tarfile
import weakref
from pathlib import Path
from typing import Any

from megamm.data.sources import (
    BadSample,
    Record,
    SourceError,
    _caption_conversations,
    _check_conversations,
    _Invalid,
)
from megamm.data.tar_shards import image_parts, sample_record, video_parts

INSTALL_HINT = "pip install megamm[energon]"
SUPPORTED_TYPES = ("CaptioningSample", "VQASample", "VidQASample", "CrudeSample")


def _energon(path: str) -> Any:
    """The megatron.energon package, or an ImportError naming the dataset and the extra to install."""
    try:
        import megatron.energon
    except ImportError as error:
        raise ImportError(f"--data-path {path}: reading an Energon dataset needs megatron-energon ({INSTALL_HINT})") from error
    return megatron.energon


def is_energon_dataset(path: str) -> bool:
    """True for a directory Energon prepared (it holds `.nv-meta/.info.json` or `.info.yaml`)."""
    meta = Path(path) / ".nv-meta"
    return (meta / ".info.json").is_file() or (meta / ".info.yaml").is_file()


def _raw_image_decoder() -> Any:
    """An Energon sample decoder that decodes json/txt/cls parts but leaves images as bytes."""
    import webdataset
    from megatron.energon.flavors.webdataset.sample_decoder import SampleDecoder

    class RawImageDecoder(SampleDecoder):
        def __init__(self) -> None:  # SampleDecoder's own __init__ would add an image handler
            self._config = {"image_decode": "raw bytes (megamm decodes)"}
            self._decoder = webdataset.autodecode.Decoder([])

    return RawImageDecoder()


def _close(state: dict[str, Any]) -> None:
    """Close the open tar and .tar.idx files of a reader (its own close leaves the index files open)."""
    reader = state.get("reader")
    if reader is None:
        return
    reader.close()
    for entry in reader.cached_offset_reader.tar_index_reader_cache.values():
        entry.tar_index_reader.close()
    reader.cached_offset_reader.tar_index_reader_cache.clear()
    state["reader"] = None


class EnergonSource:
    """Records of one split of a prepared Energon dataset, by index (see the module docstring).

    Args:
        path: the dataset directory (holding `.nv-meta`).
        split: the split part of `split.yaml` to read ("train", "val", "test").

    Raises at construction: ImportError (naming the path and the extra) without megatron-energon;
    SourceError for an unsupported sample type, sample-level excludes, or an empty split. Reading raises
    BadSample naming the shard and the key for a sample that cannot be read, decoded or validated.
    """

    def __init__(self, path: str | os.PathLike[str], split: str = "train") -> None:
        self.path = os.fspath(path)
        energon = _energon(self.path)
        from megatron.energon.dataset_config import get_dataset_from_config

        try:
            self._factory = get_dataset_from_config(
                self.path, split_part=split, training=False, decoder=_raw_image_decoder(),
                worker_config=energon.WorkerConfig(rank=0, world_size=1, num_workers=0),
            )
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as error:
            raise SourceError(f"{self.path}: cannot open as an Energon dataset (split {split!r}): {error}") from error
        self.sample_type = self._factory.__sample_type__.__name__
        if self.sample_type not in SUPPORTED_TYPES:
            raise SourceError(
                f"{self.path}: Energon sample type {self.sample_type} is not read by megamm; "
                f"supported: {', '.join(SUPPORTED_TYPES)}"
            )
        if self._factory.sample_excludes:
            raise SourceError(f"{self.path}: split.yaml excludes single samples; exclude whole shards instead")
        self.shards = list(self._factory.shards)
        self.shard_paths = [str(shard.path) for shard in self.shards]
        self._starts = [0]
        for shard in self.shards:
            self._starts.append(self._starts[-1] + shard.count)
        import webdataset

        self._decoding_error = webdataset.autodecode.DecodingError  # a part the decoder cannot read
        self._state: dict[str, Any] = {"pid": None, "reader": None}
        weakref.finalize(self, _close, self._state)

    def __len__(self) -> int:
        return self._starts[-1]

    def _reader(self) -> Any:
        """This process's reader (opened files are not shared with forked data loader workers)."""
        state = self._state
        if state["pid"] != os.getpid():
            from megatron.energon.flavors.webdataset.itar_reader import ShardInfosITarReader

            state["reader"] = ShardInfosITarReader(
                self._factory.path, self.shards, part_filter=self._factory.part_filter,
                sample_filter=self._factory.sample_filter,
            )
            state["pid"] = os.getpid()
        return state["reader"]

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(f"energon sample {index} out of range (0..{len(self) - 1})")
        number = bisect.bisect_right(self._starts, index) - 1
        shard = self.shard_paths[number]
        where = f"sample {index - self._starts[number]}"
        try:
            raw = self._reader()[index]
            where = f"key {raw['__key__']!r}"
            sample = self._factory.load_sample(raw)
            return self._record(sample, shard, index, raw["__key__"])
        except _Invalid as error:
            raise BadSample(shard, where, error.kind, error.reason) from None
        except self._decoding_error as error:
            cause = error.__cause__
            if isinstance(cause, json.JSONDecodeError):
                raise BadSample(shard, where, "json", f"malformed json part: {cause}") from None
            raise BadSample(shard, where, "member", f"cannot decode a part: {cause!r}") from None
        except (tarfile.TarError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise BadSample(shard, where, "member", f"cannot read the sample: {type(error).__name__}: {error}") from None

    def _record(self, sample: Any, shard: str, index: int, key: str) -> Record:
        if self.sample_type == "CrudeSample":
            return _crude_record(sample, shard, index, key)
        if self.sample_type == "VidQASample":
            video = _bytes(sample.video, f"{key} video")
            turns = [{"from": "human", "value": sample.context}, {"from": "gpt", "value": _answer(sample)}]
            return Record(shard, index, key, _check_conversations(turns, 0, 1), [], None, "conversation",
                          videos=[f"{key} video"], video_bytes=[video])
        image = _bytes(sample.image, f"{key} image")
        if self.sample_type == "CaptioningSample":
            conversations = _caption_conversations({"caption": sample.caption})
            kind = "caption"
        else:
            conversations = _check_conversations(
                [{"from": "human", "value": sample.context}, {"from": "gpt", "value": _answer(sample)}], 1
            )
            kind = "conversation"
        return Record(shard, index, key, conversations, [f"{key} image"], [image], kind)


def _crude_record(sample: dict[str, Any], shard: str, index: int, key: str) -> Record:
    """A crude sample's parts read as a tar shard's members: its json row, images and videos."""
    parts = {name: f"{key}.{name}" for name in sample if not name.startswith("__")}
    if "json" not in parts:
        raise _Invalid("member", f"no {key}.json part")
    images, videos = image_parts(parts), video_parts(parts)
    return sample_record(
        sample["json"], parts["json"], [parts[s] for s in images], [_bytes(sample[s], parts[s]) for s in images],
        shard, index, key,
        [parts[v] if isinstance(v, str) else [parts[f] for f in v] for v in videos],
        [_bytes(sample[v], parts[v]) if isinstance(v, str) else [_bytes(sample[f], parts[f]) for f in v]
         for v in videos],
    )


def _bytes(value: Any, name: str) -> bytes:
    if not isinstance(value, bytes):
        raise _Invalid("member", f"{name} is a {type(value).__name__}, not an encoded image or video")
    return value


def _answer(sample: Any) -> Any:
    """The answer a VQA sample trains on: the one of largest weight, or the first."""
    answers = sample.answers
    if isinstance(answers, str):
        return answers
    if not isinstance(answers, list) or not answers:
        raise _Invalid("schema", f"a VQA sample needs a non-empty list of answers, got {answers!r}")
    weights = sample.answer_weights
    if weights is None:
        return answers[0]
    weights = list(weights)
    if len(weights) != len(answers):
        raise _Invalid("schema", f"{len(answers)} answers but {len(weights)} answer weights")
    return answers[max(range(len(answers)), key=lambda i: float(weights[i]))]
