"""Webdataset-style tar shards as a record source (see megamm.data.sources for the other sources).

A sample is the members sharing a key (the member path up to the first "." of its file name):
`<key>.json` (a LLaVA row or a caption row) plus its images (`image_parts`) and videos
(`video_parts`: video files, or frame images of a video). Shards are indexed once by scanning the
tar headers; a sample is then read by seeking to its members' stored offsets, so only uncompressed
tars are supported.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from megamm.data.sources import (
    BadSample,
    Record,
    SourceError,
    _frame_rate,
    _Invalid,
    _row_conversations,
    _sample_id,
)

TAR_IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
TAR_VIDEO_EXTENSIONS = frozenset({"mp4", "webm", "mkv", "mov", "avi"})
# The suffix part marking a video's frame images: <key>.frames.<f>.<image ext>.
FRAMES_PART = "frames"
_TAR_BLOCK = 512


@dataclass(frozen=True)
class _Member:
    name: str
    offset: int
    size: int


@dataclass
class _TarSample:
    shard: int
    key: str
    members: dict[str, _Member] = field(default_factory=dict)  # suffix ("json", "0.jpg") -> member
    problem: str | None = None


def _split_member_name(name: str) -> tuple[str, str] | None:
    """(key, suffix) of a safe member name, None for an unsafe one (absolute, `..`, backslash).

    As in webdataset, the key is the path up to the first "." of the last path component, so keys
    cannot contain dots; "./" prefixes are dropped.
    """
    if name.startswith("/") or "\\" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    directory, base = posixpath.join("", *parts[:-1]), parts[-1]
    stem, dot, suffix = base.partition(".")
    if not stem or not dot:
        return None
    return posixpath.join(directory, stem) if directory else stem, suffix


def image_parts(parts: Mapping[str, str]) -> list[str]:
    """The image parts of a sample, in order: suffix ("jpg", "0.png") -> member name in, suffixes out.

    Convention: a single image is `<key>.<ext>`; several are `<key>.<n>.<ext>` with n = 0, 1, ..., in
    increasing n (numerically, so 10 comes after 9). Mixing both forms, a gap in n, or two members for
    one n is refused. `ext` is jpg, jpeg, png or webp (any case); other members (.txt, .cls) are ignored.
    Energon crude samples (megamm.data.energon) follow the same convention.
    """
    single: list[str] = []
    numbered: dict[int, str] = {}
    for suffix in parts:
        head, _, ext = suffix.rpartition(".")
        if ext.lower() not in TAR_IMAGE_EXTENSIONS:
            continue
        if not head:
            single.append(suffix)
        elif head.isdigit():
            n = int(head)
            if n in numbered:
                raise _Invalid("member", f"two members for image {n}: {parts[numbered[n]]}, {parts[suffix]}")
            numbered[n] = suffix
    if single and numbered:
        raise _Invalid("member", "mixes <key>.<ext> and <key>.<n>.<ext> image members")
    if len(single) > 1:
        raise _Invalid("member", f"several unnumbered images: {sorted(parts[s] for s in single)}")
    if numbered and sorted(numbered) != list(range(len(numbered))):
        raise _Invalid("member", f"image numbers must be 0..n-1, got {sorted(numbered)}")
    return single or [numbered[n] for n in sorted(numbered)]


def _video_part(suffix: str) -> tuple[int | None, int | None] | None:
    """(video number, frame number) of a video part's suffix: `mp4` (None, None), `2.mp4` (2, None),
    `frames.7.jpg` (None, 7), `2.frames.7.jpg` (2, 7); None for any other suffix."""
    pieces = suffix.split(".")
    ext = pieces[-1].lower()
    if ext in TAR_VIDEO_EXTENSIONS and len(pieces) <= 2:
        head = pieces[:-1]
        frame = None
    elif ext in TAR_IMAGE_EXTENSIONS and len(pieces) in (3, 4) and pieces[-3] == FRAMES_PART and pieces[-2].isdigit():
        head = pieces[:-3]
        frame = int(pieces[-2])
    else:
        return None
    if head and not head[0].isdigit():
        return None
    return (int(head[0]) if head else None), frame


def video_parts(parts: Mapping[str, str]) -> list[str | list[str]]:
    """The video parts of a sample, in order: suffix -> member name in; out, per video, the suffix of
    its video file or the suffixes of its frame images in frame order.

    Convention: a single video is `<key>.<ext>` (ext mp4, webm, mkv, mov or avi) or its frames
    `<key>.frames.<f>.<image ext>`; several are `<key>.<n>.<ext>` / `<key>.<n>.frames.<f>.<image ext>`
    with n = 0, 1, ... (numerically, as for images). Frames f count 0, 1, ... in order. Mixing the
    numbered and unnumbered forms, a gap in n or f, a video both a file and frames, or two members for
    one video file or frame is refused. Frame images never count as the sample's images
    (`image_parts` takes only `<key>.<ext>` and `<key>.<n>.<ext>`).
    """
    files: dict[int | None, str] = {}
    frames: dict[int | None, dict[int, str]] = {}
    for suffix in parts:
        found = _video_part(suffix)
        if found is None:
            continue
        video, frame = found
        label = "the video" if video is None else f"video {video}"
        if frame is None:
            if video in files:
                raise _Invalid("member", f"two members for {label}: {parts[files[video]]}, {parts[suffix]}")
            files[video] = suffix
            continue
        taken = frames.setdefault(video, {})
        if frame in taken:
            raise _Invalid("member", f"two members for frame {frame} of {label}: {parts[taken[frame]]}, {parts[suffix]}")
        taken[frame] = suffix
    both = files.keys() & frames.keys()
    if both:
        video = next(iter(both))
        raise _Invalid("member", f"{'the video' if video is None else f'video {video}'} is both a file "
                                 f"({parts[files[video]]}) and frames")
    numbers = set(files) | set(frames)
    if None in numbers and len(numbers) > 1:
        raise _Invalid("member", "mixes <key>.<ext> and <key>.<n>.<ext> video members")
    numbered = sorted(n for n in numbers if n is not None)
    if numbered != list(range(len(numbered))):
        raise _Invalid("member", f"video numbers must be 0..n-1, got {numbered}")
    videos: list[str | list[str]] = []
    for video in [None] if None in numbers else numbered:
        if video in files:
            videos.append(files[video])
            continue
        order = sorted(frames[video])
        if order != list(range(len(order))):
            raise _Invalid("member", f"frame numbers of {'the video' if video is None else f'video {video}'} "
                                     f"must be 0..f-1, got {order}")
        videos.append([frames[video][f] for f in order])
    return videos


def sample_record(
    row: Any, meta_name: str, images: list[str], image_bytes: list[bytes], source: str, index: int, key: str,
    videos: list[str | list[str]] | None = None, video_bytes: list[bytes | list[bytes]] | None = None,
) -> Record:
    """The record of a `<key>.json` row and its image and video members (names, bytes, in the nesting
    of `video_parts`); _Invalid if unusable.

    A row with "conversations" is a LLaVA row, any other a caption row (one image, no video); "image" /
    "video" fields in the row are ignored, since the images and videos are the members. The row's
    "frame_rate" is the rate the frame-image videos were extracted at (default 2 per second).
    """
    if not isinstance(row, dict):
        raise _Invalid("schema", f"{meta_name} holds a {type(row).__name__}, not an object")
    videos = videos or []
    conversations, kind = _row_conversations(
        row, row.get("conversations"), len(images), "conversations" in row, len(videos)
    )
    return Record(
        source=source,
        index=index,
        sample_id=_sample_id(row, key),
        conversations=conversations,
        images=images,
        image_bytes=image_bytes,
        kind=kind,
        videos=videos,
        frame_rate=_frame_rate(row),
        video_bytes=video_bytes if videos else None,
    )


class TarShardSource:
    """Samples from webdataset-style uncompressed tar shards.

    Members are grouped by key (see `_split_member_name`); a sample is `<key>.json`, holding a LLaVA row
    (with "conversations") or a caption row (with "caption" / "text"), plus its image members in the
    order given by `image_parts` and its video members in the order given by `video_parts`. Any
    "image" / "video" field inside the JSON is ignored: the images and videos are the members. Records
    carry the member names in `images` / `videos` and their bytes in `image_bytes` / `video_bytes`
    (`sample_record`).

    The index is built once, at construction, from the tar headers (tarfile); samples are in order of
    first appearance, shard by shard. Reading seeks to the recorded data offsets, so access is random and
    costs one open and a few reads. Compressed tars cannot be seeked into and are not supported.

    Raises at construction:
        SourceError: naming the shard, if it is not a tar, or is truncated or corrupt (a member's data
            running past the end of the file, or a damaged header where the end-of-archive block should
            be; tarfile itself silently stops at such a header).
    Reading a sample raises BadSample for an unsafe member name (absolute or with `..`), a non-regular
    member, a missing or malformed JSON, bad image member names, or a row failing validation.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        self.paths = [os.fspath(p) for p in paths]
        self._samples: list[_TarSample] = []
        self._by_key: dict[tuple[int, str], int] = {}
        for shard, path in enumerate(self.paths):
            self._index_shard(shard, path)

    def _index_shard(self, shard: int, path: str) -> None:
        try:
            file_size = os.path.getsize(path)
            with tarfile.open(path, "r:") as tar:
                infos = list(tar)
                end = tar.offset
            with open(path, "rb") as f:
                f.seek(end)
                trailer = f.read(_TAR_BLOCK)
        except (tarfile.TarError, OSError) as e:
            raise SourceError(f"tar shard {path}: cannot read: {e}") from e
        if len(trailer) < _TAR_BLOCK or trailer.count(0) != _TAR_BLOCK:
            raise SourceError(
                f"tar shard {path} is truncated or corrupt: no valid header or end-of-archive block at "
                f"byte {end} (file size {file_size})"
            )
        for info in infos:
            if info.isdir():
                continue
            if info.isfile() and info.offset_data + info.size > file_size:
                raise SourceError(
                    f"tar shard {path} is truncated: member {info.name!r} needs bytes up to "
                    f"{info.offset_data + info.size}, file has {file_size}"
                )
            split = _split_member_name(info.name)
            if split is None:
                # Its own entry, so the bad member is counted as one bad sample instead of failing the shard.
                sample = self._sample(shard, info.name)
                sample.problem = f"unsafe member name {info.name!r} (absolute, '..' or no extension)"
                continue
            key, suffix = split
            sample = self._sample(shard, key)
            if not info.isfile() or info.issparse():
                sample.problem = f"member {info.name!r} is not a regular file"
            elif suffix in sample.members:
                sample.problem = f"duplicate member {info.name!r}"
            else:
                sample.members[suffix] = _Member(info.name, info.offset_data, info.size)

    def _sample(self, shard: int, key: str) -> _TarSample:
        position = self._by_key.get((shard, key))
        if position is None:
            position = self._by_key[(shard, key)] = len(self._samples)
            self._samples.append(_TarSample(shard, key))
        return self._samples[position]

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def keys(self) -> list[tuple[str, str]]:
        """(shard path, key) of every sample, in index order."""
        return [(self.paths[s.shard], s.key) for s in self._samples]

    def index_of(self, shard: int, key: str) -> int:
        """The global index of sample `key` in shard number `shard` (KeyError if absent)."""
        return self._by_key[(shard, key)]

    def read(self, shard: int, key: str) -> Record:
        """The sample `key` of shard number `shard`."""
        return self[self.index_of(shard, key)]

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(f"tar sample {index} out of range (0..{len(self) - 1})")
        sample = self._samples[index]
        path = self.paths[sample.shard]
        try:
            return self._parse(sample, path, index)
        except _Invalid as e:
            raise BadSample(path, f"key {sample.key!r}", e.kind, e.reason) from None

    def _parse(self, sample: _TarSample, path: str, index: int) -> Record:
        if sample.problem is not None:
            raise _Invalid("member", sample.problem)
        meta = sample.members.get("json")
        if meta is None:
            raise _Invalid("member", f"no {sample.key}.json member")
        names = {suffix: member.name for suffix, member in sample.members.items()}
        images = [sample.members[suffix] for suffix in image_parts(names)]
        videos = video_parts(names)
        try:
            with open(path, "rb") as f:
                raw = [self._read_member(f, m) for m in [meta, *images]]
                video_bytes = [self._read_member(f, sample.members[video]) if isinstance(video, str)
                               else [self._read_member(f, sample.members[frame]) for frame in video]
                               for video in videos]
        except OSError as e:
            raise _Invalid("member", f"cannot read members: {e}") from e
        try:
            row = json.loads(raw[0])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _Invalid("json", f"malformed {meta.name}: {e}") from e
        video_names = [names[video] if isinstance(video, str) else [names[frame] for frame in video] for video in videos]
        return sample_record(row, meta.name, [m.name for m in images], raw[1:], path, index, sample.key,
                             video_names, video_bytes)

    @staticmethod
    def _read_member(f: Any, member: _Member) -> bytes:
        f.seek(member.offset)
        data = f.read(member.size)
        if len(data) != member.size:
            raise _Invalid("member", f"{member.name} truncated: {len(data)} of {member.size} bytes")
        return data
