"""Checkpoint integrity: checksums recorded at publication, verified at load, and crash safety.

- Every file a writer leaves in a checkpoint directory has its size and xxh3_64 in `megamm.json`.
- A flipped byte, a truncated or missing file, a corrupt `.metadata` or `megamm.json`: an error
  naming the file at load (training resume, model-only load, the converter's reader) and from
  `tools/checkpoint_info.py --verify`; `verify=False` (`--no-verify-checkpoint`) skips the hashes.
- A load hashes only the files it reads.
- A crash at each point of a save (after the data write, before the rename, between the rename and
  `latest`, during an asynchronous save) leaves `latest` on the previous, sound checkpoint; a
  directory whose description lacks checksums is refused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
import xxhash

from megamm.checkpoint import dcp_io, faults, format
from megamm.checkpoint.audit import audit
from megamm.checkpoint.checkpointer import Checkpointer
from megamm.checkpoint.model_weights import load_model_weights
from megamm.config import ParallelConfig
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.convert.writer import CheckpointReader, LazyTensor, write_checkpoint
from megamm.data.loader import ResumePoint
from megamm.parallel.state import ParallelState
from megamm.pipeline.chunks import build_model_chunks
from megamm.training.data import SyntheticData
from megamm.training.step import Trainer, build_trainer, train_step
from tests.tiny import llava_config

ROOT = Path(__file__).resolve().parents[2]


def _trainer(init_seed: int | None = None) -> Trainer:
    run = RunConfig(model=llava_config(), parallel=ParallelConfig(),
                    training=TrainingConfig(micro_batch_size=1, global_batch_size=1, seq_length=48, train_iters=1,
                                            mock_data=True, seed=3, images_per_sample=1))
    state = ParallelState.single()
    config = resolve(run, state.world_size)
    state.seed(config.training.seed)
    chunks = build_model_chunks(config, state)
    if init_seed is not None:
        for chunk in chunks:
            chunk.initialize(init_seed)
    return build_trainer(config, state, chunks)


def _checkpointer(trainer: Trainer, save: Path | None = None) -> Checkpointer:
    return Checkpointer(trainer.state, trainer.config, trainer.chunks, trainer.optimizer, trainer.scaler,
                        save_dir=save, log=lambda _: None)


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for chunk in trainer.chunks for name, p in chunk.named_parameters()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A full training checkpoint (model, optimizer, progress, generators) and the weights it holds."""
    save = tmp_path_factory.mktemp("trained") / "ckpt"
    trainer = _trainer()
    train_step(trainer, SyntheticData(trainer.config, trainer.state, ResumePoint()).microbatches(0), 0)
    _checkpointer(trainer, save).save(1, 1)
    return format.iteration_dir(save, 1), _weights(trainer)


@pytest.fixture
def checkpoint(trained, tmp_path: Path) -> Path:
    """A copy of the trained checkpoint, for one test to damage."""
    copy = tmp_path / "ckpt" / trained[0].name
    shutil.copytree(trained[0], copy)
    return copy


def _largest_chunk(path: Path) -> tuple[str, int, int]:
    """(shard file, offset, length) of the largest chunk of a model weight."""
    storage = dcp_io.SafeFileSystemReader(path).read_metadata().storage_data
    info = max((info for index, info in storage.items() if index.fqn.startswith(format.MODEL)),
               key=lambda item: item.length)
    return str(info.relative_path), info.offset, info.length


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)[0]
        stream.seek(offset)
        stream.write(bytes([byte ^ 0x10]))


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as stream:
        stream.truncate(keep)


def _checkpoint_info():
    spec = importlib.util.spec_from_file_location("checkpoint_info", ROOT / "tools" / "checkpoint_info.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _verify_tool(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = _checkpoint_info().main([str(path), "--verify"])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def _load_everywhere(path: Path, verify: bool = True) -> list[BaseException | None]:
    """Try each reader on `path`: the training resume, the model-only load, the converter's reader."""
    outcomes: list[BaseException | None] = []
    trainer = _trainer(init_seed=11)
    for load in (lambda: _checkpointer(trainer).load(path, verify=verify),
                 lambda: load_model_weights(trainer.chunks, path, trainer.state, verify=verify),
                 lambda: CheckpointReader(path, verify=verify).read(["model/language.output_layer.weight"])):
        try:
            load()
            outcomes.append(None)
        except format.CheckpointFormatError as error:
            outcomes.append(error)
    return outcomes


# ---- what publication records ---------------------------------------------------------------------


def test_the_description_lists_the_size_and_hash_of_every_other_file(checkpoint: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    files = format.read_description(checkpoint)[format.FILES]
    on_disk = {p.name for p in checkpoint.iterdir()} - {format.DESCRIPTION}
    assert set(files) == on_disk and {".metadata", "__0_0.distcp"} <= on_disk
    for name, entry in files.items():
        data = (checkpoint / name).read_bytes()
        assert entry == {"bytes": len(data), "xxh3_64": xxhash.xxh3_64(data).hexdigest()}
    assert audit(checkpoint) == []
    status, out = _verify_tool(checkpoint, capsys)
    assert status == 0 and "ok" in out


def test_the_converters_writer_records_every_tensor_file(tmp_path: Path) -> None:
    tensors = {name: LazyTensor((4, 3), torch.float32, lambda seed=seed: torch.full((4, 3), float(seed)))
               for seed, name in enumerate(("a.weight", "b.weight"))}
    path = write_checkpoint(tmp_path / "converted", tensors, format.layout_signature(1, 1, 1, 1, False), {})
    files = format.read_description(path)[format.FILES]
    assert set(files) == {p.name for p in path.iterdir()} - {format.DESCRIPTION}
    assert len(files) == 1 + 4  # .metadata, one file per tensor (two weights, two progress scalars)
    assert audit(path) == []


# ---- damage found at load and by checkpoint_info --verify -----------------------------------------


def test_a_flipped_byte_in_a_shard_is_an_error_naming_the_file(checkpoint: Path, trained,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    name, offset, length = _largest_chunk(checkpoint)
    expected = format.read_description(checkpoint)[format.FILES][name]["xxh3_64"]
    _flip_byte(checkpoint / name, offset + length // 2)
    found = xxhash.xxh3_64((checkpoint / name).read_bytes()).hexdigest()
    for error in _load_everywhere(checkpoint):
        assert error is not None
        assert f"{checkpoint / name} is corrupt: xxh3_64 {found}, the description says {expected}" in str(error)
    status, out = _verify_tool(checkpoint, capsys)
    assert status == 1 and f"{checkpoint / name} is corrupt" in out


def test_no_verify_skips_the_hashes_and_loads_the_damage(checkpoint: Path, trained) -> None:
    """What verification prevents: the flipped byte loads silently and changes a weight."""
    name, offset, length = _largest_chunk(checkpoint)
    _flip_byte(checkpoint / name, offset + length // 2)
    trainer = _trainer(init_seed=11)
    load_model_weights(trainer.chunks, checkpoint, trainer.state, verify=False)
    saved = trained[1]
    changed = [n for n, p in _weights(trainer).items() if not torch.equal(p, saved[n])]
    assert len(changed) == 1


def test_a_corrupt_metadata_file_is_an_error_naming_it(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metadata = checkpoint / ".metadata"
    _flip_byte(metadata, metadata.stat().st_size // 2)
    for error in _load_everywhere(checkpoint):
        assert error is not None and f"{metadata} is corrupt: xxh3_64" in str(error)
    status, out = _verify_tool(checkpoint, capsys)
    assert status == 1 and f"{metadata} is corrupt" in out


HUGE_BYTES = b"\x80\x04\x8e" + (1 << 60).to_bytes(8, "little") + b"abc"  # BINBYTES8 of 2**60 bytes
BAD_METADATA = {
    "a length far past the end": HUGE_BYTES,  # the C unpickler would try to allocate it: MemoryError
    "truncated": None,  # the first half of the real file: EOFError / UnpicklingError
    "not a pickle": b"\x00garbage",
    "another object": b"\x80\x04K\x07.",  # the integer 7
}


@pytest.mark.parametrize("content", list(BAD_METADATA.values()), ids=list(BAD_METADATA))
def test_the_metadata_reader_turns_every_failure_into_an_error_naming_the_file(checkpoint: Path,
                                                                               content: bytes | None) -> None:
    metadata = checkpoint / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[: metadata.stat().st_size // 2] if content is None else content)
    with pytest.raises(format.CheckpointFormatError, match=str(metadata)):
        dcp_io.saved_tensors(checkpoint, verify=False)
    with pytest.raises(format.CheckpointFormatError, match=str(metadata)):
        _checkpointer(_trainer()).load(checkpoint, verify=False)


def test_the_metadata_reader_allocates_no_more_than_the_file_holds(checkpoint: Path) -> None:
    """A corrupt length field of 256 MiB in a 20-byte file: the opcodes are checked against the bytes
    there before unpickling, so nothing near that size is allocated (the unpickler alone would)."""
    metadata = checkpoint / ".metadata"
    metadata.write_bytes(b"\x80\x04\x8e" + (256 << 20).to_bytes(8, "little") + b"abc")
    tracemalloc.start()
    try:
        with pytest.raises(format.CheckpointFormatError, match=f"{metadata} is corrupt"):
            dcp_io.saved_tensors(checkpoint, verify=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_a_truncated_shard_is_an_error_naming_the_file(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name, offset, length = _largest_chunk(checkpoint)
    shard = checkpoint / name
    size = shard.stat().st_size
    _truncate(shard, offset + length // 2)
    for error in _load_everywhere(checkpoint):
        assert error is not None
        assert f"{shard} has {offset + length // 2} bytes, the description says {size}" in str(error)
    # Without verification the size is still checked against the chunks the metadata places there.
    for error in _load_everywhere(checkpoint, verify=False):
        assert error is not None and f"{shard} has {offset + length // 2} bytes: .metadata places chunks" in str(error)
    status, out = _verify_tool(checkpoint, capsys)
    assert status == 1 and f"{shard} has {offset + length // 2} bytes, the description says {size}" in out
    assert f"{shard} has {offset + length // 2} bytes: .metadata places chunks in it up to byte" in out


def test_a_missing_shard_is_an_error_naming_the_file(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = checkpoint / "__0_0.distcp"
    shard.unlink()
    for verify in (True, False):
        for error in _load_everywhere(checkpoint, verify=verify):
            assert error is not None and f"{shard} is missing" in str(error)
    status, out = _verify_tool(checkpoint, capsys)
    assert status == 1 and f"{shard} is missing" in out


def test_a_corrupt_description_fails_verification_naming_it(checkpoint: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    description = checkpoint / format.DESCRIPTION
    description.write_text(description.read_text()[:100])
    status, out = _verify_tool(checkpoint, capsys)
    assert status == 1 and f"{description} is corrupt: not valid JSON" in out


def test_a_file_not_covered_by_the_description_fails_verification(checkpoint: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (checkpoint / "__1_0.distcp").write_bytes(b"stray")
    status, out = _verify_tool(checkpoint, capsys)
    assert status == 1 and f"{checkpoint / '__1_0.distcp'} has no checksum" in out


def test_a_load_hashes_only_the_files_it_reads(tmp_path: Path) -> None:
    """The converter's writer puts each tensor in a file of its own: a corrupt file of one tensor
    does not stop a read of another (a rank reads and verifies only its files), and stops its own."""
    tensors = {name: LazyTensor((64,), torch.float32, lambda: torch.arange(64.0)) for name in ("a", "b")}
    path = write_checkpoint(tmp_path / "converted", tensors, format.layout_signature(1, 1, 1, 1, False), {})
    storage = dcp_io.SafeFileSystemReader(path).read_metadata().storage_data
    b_file = next(str(info.relative_path) for index, info in storage.items() if index.fqn == "model/b")
    _flip_byte(path / b_file, storage[next(i for i in storage if i.fqn == "model/b")].offset + 8)
    reader = CheckpointReader(path)
    assert torch.equal(reader.read(["model/a"])["model/a"], torch.arange(64.0))
    with pytest.raises(format.CheckpointFormatError, match=f"{path / b_file} is corrupt"):
        reader.read(["model/b"])


# ---- crashes during a save ----------------------------------------------------------------------


CRASHES = {
    "write": ("write", False),
    "write, async": ("write", True),
    "rename": ("rename", False),
    "latest": ("latest", False),
}


@pytest.mark.parametrize("point, async_save", list(CRASHES.values()), ids=list(CRASHES))
def test_a_crash_during_a_save_leaves_latest_on_the_previous_checkpoint(tmp_path: Path, point: str,
                                                                        async_save: bool) -> None:
    save = tmp_path / "ckpt"
    command = [sys.executable, "-m", "tests.crash_during_save", str(save)]  # -m: the repository root on sys.path
    command += ["--async-save"] if async_save else []
    env = {**os.environ, faults.VARIABLE: f"{point}:iteration:2"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert (save / format.LATEST).read_text().strip() == "iter_0000001"
    assert format.resolve(save) == format.iteration_dir(save, 1) and audit(format.iteration_dir(save, 1)) == []
    second, partial = format.iteration_dir(save, 2), format.partial_dir(save, 2)
    if point == "latest":  # renamed, complete, but not yet named by latest
        assert not partial.exists() and audit(second) == []
    else:
        assert not second.exists() and partial.is_dir()
        assert (partial / format.DESCRIPTION).exists() == (point == "rename")
    trainer = _trainer(init_seed=11)
    assert _checkpointer(trainer).load(save).iteration == 1


def test_a_half_written_save_renamed_by_hand_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    """A directory whose description has no checksums (or checksums of other files) is not loaded."""
    description = checkpoint / format.DESCRIPTION
    tree = json.loads(description.read_text())
    del tree[format.FILES]
    description.write_text(json.dumps(tree))
    for error in _load_everywhere(checkpoint):
        assert error is not None and f"{description} lists no file checksums" in str(error)
    assert all(error is None for error in _load_everywhere(checkpoint, verify=False))
    tree[format.FILES] = {".metadata": format.integrity.file_checksum(checkpoint / ".metadata")}
    description.write_text(json.dumps(tree))
    for error in _load_everywhere(checkpoint):
        assert error is not None and f"{description} has no checksum of __0_0.distcp" in str(error)


def test_a_malformed_fault_specification_is_an_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.VARIABLE, "rename:step:2")
    with pytest.raises(ValueError, match=f"{faults.VARIABLE}='rename:step:2': expected POINT or POINT:iteration:N"):
        faults.crash_point("rename", 2)
    monkeypatch.setenv(faults.VARIABLE, "during:iteration:2")
    with pytest.raises(ValueError, match="unknown point 'during'"):
        faults.crash_point("rename", 2)


def test_no_verify_checkpoint_needs_load() -> None:
    training = TrainingConfig(mock_data=True, micro_batch_size=1, global_batch_size=1, verify_checkpoint=False)
    run = RunConfig(model=llava_config(), parallel=ParallelConfig(), training=training)
    assert "--no-verify-checkpoint needs --load or --pretrained-checkpoint" in run.problems(world_size=1)
    run.training.load = "/runs/a"
    assert "--no-verify-checkpoint needs --load or --pretrained-checkpoint" not in run.problems(world_size=1)
