"""Tar shard readers side by side: megamm's TarShardSource, `wids` (webdataset's indexed reader) and
`webdataset` (streaming), on the same shards, in one run.

    python bench/bench_tar_readers.py [--samples 2000] [--shards 8] [--image-size 256] [--repeats 3]

Measures reading records (the JSON row parsed and the encoded image bytes in hand; megamm also
validates the row; image decoding is the same downstream for all) in random order, which is what megamm's loader does (a permutation per epoch), and in shard
order, plus the time to open/index the shards. Then two corruptions that web-scale data has: a bad
JSON member, and a shard cut in the middle of a member, and reports what each reader does with them.
Needs `pip install webdataset wids` (webdataset comes with megamm[energon]).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from megamm.data.sources import BadSample
from megamm.data.tar_shards import TarShardSource


def write_shards(root: Path, samples: int, shards: int, size: int, seed: int = 0) -> list[Path]:
    noise = np.random.default_rng(seed)
    paths = [root / f"part-{s:04d}.tar" for s in range(shards)]
    per_shard = -(-samples // shards)
    for s, path in enumerate(paths):
        with tarfile.open(path, "w") as tar:
            for k in range(s * per_shard, min(samples, (s + 1) * per_shard)):
                buffer = io.BytesIO()
                Image.fromarray(noise.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
                row = {"id": str(k), "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                       {"from": "gpt", "value": "noise " * 20}]}
                for suffix, data in (("json", json.dumps(row).encode()), ("jpg", buffer.getvalue())):
                    info = tarfile.TarInfo(f"{k:08d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return paths


def rate(read: Callable[[int], object], order: list[int], repeats: int) -> float:
    """Best records/s over `repeats` passes."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for index in order:
            read(index)
        best = max(best, len(order) / (time.perf_counter() - start))
    return best


def wids_dataset(paths: list[Path]):
    import wids

    counts = []
    for path in paths:
        with tarfile.open(path) as tar:
            counts.append(sum(1 for member in tar if member.name.endswith(".json")))
    shards = [{"url": str(p), "nsamples": n} for p, n in zip(paths, counts)]
    return wids.ShardListDataset(shards, transformations=[], lru_size=len(paths))


def webdataset_stream(paths: list[Path]):
    import webdataset

    return webdataset.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False)


def outcome(action: Callable[[], object]) -> str:
    """What an action did: 'ok (...)' or the exception it raised, shortened."""
    try:
        return f"ok ({action()})"
    except Exception as error:  # noqa: BLE001 - the benchmark reports any failure, whatever its type
        return f"{type(error).__name__}: {str(error)[:110]}"


def corrupt(paths: list[Path], root: Path) -> tuple[list[Path], list[Path]]:
    """(shards with one bad JSON member, shards whose first shard is cut inside a member)."""
    bad_json = root / "bad_json"
    bad_json.mkdir()
    with tarfile.open(paths[0]) as source, tarfile.open(bad_json / paths[0].name, "w") as target:
        for number, member in enumerate(source):
            data = source.extractfile(member).read()
            if number == 2:  # the second sample's JSON
                data = data[: len(data) // 2]
                member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    truncated = root / "truncated"
    truncated.mkdir()
    raw = paths[0].read_bytes()
    (truncated / paths[0].name).write_bytes(raw[: len(raw) // 2 + 100])
    return [bad_json / paths[0].name, *paths[1:]], [truncated / paths[0].name, *paths[1:]]


def megamm_scan(paths: list[Path]) -> str:
    source = TarShardSource(paths)
    bad = 0
    for index in range(len(source)):
        try:
            source[index]
        except BadSample:
            bad += 1
    return f"{len(source)} samples, {bad} bad counted"


def wids_scan(paths: list[Path]) -> str:
    dataset = wids_dataset(paths)
    bad = 0
    for index in range(len(dataset)):
        try:
            json.loads(dataset[index][".json"].getvalue())
        except ValueError:
            bad += 1
    return f"{len(dataset)} samples, {bad} bad JSON found by the caller"


def webdataset_scan(paths: list[Path]) -> str:
    read = bad = 0
    for sample in webdataset_stream(paths):
        read += 1
        try:
            json.loads(sample["json"])
        except ValueError:
            bad += 1
    return f"{read} samples streamed, {bad} bad JSON found by the caller"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_shards(root, args.samples, args.shards, args.image_size)
        size = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{args.samples} samples in {args.shards} shards, {size:.1f} MiB ({args.image_size}px JPEG + JSON)")
        order = list(range(args.samples))
        shuffled = random.Random(0).sample(order, len(order))

        start = time.perf_counter()
        ours = TarShardSource(paths)
        ours_open = time.perf_counter() - start
        start = time.perf_counter()
        theirs = wids_dataset(paths)
        theirs_open = time.perf_counter() - start
        theirs[0]  # wids builds a shard's index on first access
        stream = webdataset_stream(paths)

        def stream_all(_: int) -> None:
            for sample in stream:
                json.loads(sample["json"])

        def wids_read(index: int) -> None:
            sample = theirs[index]
            json.loads(sample[".json"].getvalue())
            sample[".jpg"].getvalue()

        rows = [
            ("megamm TarShardSource", ours_open, rate(ours.__getitem__, shuffled, args.repeats),
             rate(ours.__getitem__, order, args.repeats)),
            ("wids ShardListDataset", theirs_open, rate(wids_read, shuffled, args.repeats),
             rate(wids_read, order, args.repeats)),
            ("webdataset WebDataset", 0.0, float("nan"), rate(stream_all, [0], args.repeats) * args.samples),
        ]
        print(f"{'reader':24s} {'open s':>8s} {'random rec/s':>13s} {'sequential rec/s':>17s}")
        for name, opened, random_rate, sequential_rate in rows:
            print(f"{name:24s} {opened:8.3f} {random_rate:13.0f} {sequential_rate:17.0f}")
        print(f"random access, megamm / wids: {rows[0][2] / rows[1][2]:.2f}x; "
              f"sequential, megamm / wids: {rows[0][3] / rows[1][3]:.2f}x, megamm / webdataset: "
              f"{rows[0][3] / rows[2][3]:.2f}x")

        bad_json, truncated = corrupt(paths, root)
        for title, shards in (("a bad JSON member", bad_json), ("cut in the middle of a member", truncated)):
            print(f"corrupted shard: {title}")
            for name, scan in (("megamm", megamm_scan), ("wids", wids_scan), ("webdataset", webdataset_scan)):
                print(f"  {name:10s} {outcome(lambda scan=scan, shards=shards: scan(shards))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
