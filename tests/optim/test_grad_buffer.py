"""Gradient accumulation without dp sync: `GradBuffer.no_sync()` and the schedules that use it.

- The buffer (2 gloo ranks, dp=2, overlapped sync): backward passes inside `no_sync()` issue no
  collective; the backward outside it launches every bucket; the result is the sum over ranks
  and microbatches.
- The schedules (no pipelining; interleaved 1F1B on 2 stages): every backward of a chunk but the
  last runs inside that chunk's buffer's `no_sync()`, observed by a stand-in buffer that records,
  at each backward, whether it was inside.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megamm.config import ParallelConfig
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.data.loader import ResumePoint
from megamm.models.llava import LlavaModel
from megamm.optim.grad_buffer import GradBuffer
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.pipeline.chunks import build_model_chunks
from megamm.pipeline.schedules import forward_backward_no_pipelining
from megamm.training.data import SyntheticData
from megamm.training.step import build_trainer, count_loss_tokens
from tests.distributed import run_distributed
from tests.tiny import language_config, llava_config, make_batch

MICROBATCHES = 3


def _counting_all_reduce(calls: list[object]):
    """dist.all_reduce that records each call (the grad buffer's gloo path for both sync kinds)."""
    original = dist.all_reduce

    def all_reduce(*args, **kwargs):
        calls.append(kwargs.get("group"))
        return original(*args, **kwargs)

    return original, all_reduce


def _buffer_job() -> dict[bool, dict]:
    state = initialize_parallel_state()
    return {shard: _accumulate_and_sync(state, shard) for shard in (False, True)}


def _accumulate_and_sync(state: ParallelState, shard_for_optimizer: bool) -> dict:
    rank = dist.get_rank()
    # Bucket size 4 over sizes (5, 3, 4) in reverse order: buckets [4] and [3, 5], no padding.
    params = [nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))]
    buffer = GradBuffer(params, state.dp_group, bucket_size=4, overlap=True, shard_for_optimizer=shard_for_optimizer)
    calls: list[object] = []
    original, counting = _counting_all_reduce(calls)
    dist.all_reduce = counting
    try:
        buffer.start_step()
        per_backward = []
        for microbatch in range(MICROBATCHES):
            value = 10.0 * rank + microbatch + 1
            loss = sum((p * value).sum() for p in params)
            before = len(calls)
            with buffer.no_sync() if microbatch < MICROBATCHES - 1 else nullcontext():
                loss.backward()
            per_backward.append(len(calls) - before)
        before = len(calls)
        buffer.finish_grad_sync()
        in_finish = len(calls) - before
    finally:
        dist.all_reduce = original
    dp_groups = all(group is state.dp_group for group in calls)
    # This rank's shard of every bucket: what both sync kinds promise to have summed over dp.
    shards = torch.cat([buffer.grad_data[slice(*buffer.shard_range(bucket))] for bucket in buffer.buckets])
    return {"per_backward": per_backward, "in_finish": in_finish, "buckets": len(buffer.buckets),
            "dp_groups": dp_groups, "shards": shards.clone()}


@pytest.fixture(scope="module")
def buffer_results() -> list[dict[bool, dict]]:
    return run_distributed(_buffer_job, 2)


@pytest.mark.parametrize("shard_for_optimizer", [False, True], ids=["all_reduce", "reduce_scatter"])
def test_no_sync_defers_the_dp_sync_to_the_last_backward(buffer_results: list, shard_for_optimizer: bool) -> None:
    # Every element's grad: sum over ranks r and microbatches m of (10 r + m + 1) = 6 + 36.
    expected = 42.0
    for rank, results in enumerate(buffer_results):
        result = results[shard_for_optimizer]
        assert result["buckets"] == 2
        assert result["per_backward"] == [0] * (MICROBATCHES - 1) + [2], f"rank {rank}: {result['per_backward']}"
        assert result["in_finish"] == 0, f"rank {rank}: buckets left for finish_grad_sync"
        assert result["dp_groups"]
        shards = result["shards"]
        assert shards.numel() == 6 and torch.all(shards == expected), f"rank {rank}: {shards.tolist()}"


def test_finish_grad_sync_inside_no_sync_is_an_error() -> None:
    buffer = GradBuffer([nn.Parameter(torch.zeros(2))], dp_group=None)
    buffer.start_step()
    with buffer.no_sync(), pytest.raises(RuntimeError, match="inside no_sync"):
        buffer.finish_grad_sync()
    buffer.finish_grad_sync()


class RecordingBuffer:
    """Stands in for a chunk's GradBuffer: at every backward of the chunk it records whether the
    backward ran inside `no_sync()` (a hook on a parameter every backward reaches)."""

    def __init__(self, watched: nn.Parameter) -> None:
        self.inside = False
        self.backwards: list[bool] = []
        watched.register_post_accumulate_grad_hook(lambda _: self.backwards.append(self.inside))

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        self.inside = True
        try:
            yield
        finally:
            self.inside = False


def _decoder_parameter(chunk: LlavaModel) -> nn.Parameter:
    return next(p for name, p in chunk.named_parameters() if ".decoder." in name)


def test_no_pipelining_accumulates_all_but_the_last_microbatch_inside_no_sync() -> None:
    config = llava_config()
    model = LlavaModel(config, ParallelState.single())
    model.initialize(5)
    microbatches = [make_batch(config, [1, 0], seed=seed) for seed in range(MICROBATCHES)]
    recorder = RecordingBuffer(_decoder_parameter(model))
    forward_backward_no_pipelining([model], microbatches, float(count_loss_tokens(microbatches)), [recorder])
    assert recorder.backwards == [True] * (MICROBATCHES - 1) + [False]


def _pipeline_job() -> list[list[bool]]:
    initialize_parallel_state(pipeline_model_parallel_size=2)
    state = ParallelState.from_groups(tp=1, pp=2, device=torch.device("cpu"))
    training = TrainingConfig(micro_batch_size=1, global_batch_size=4, seq_length=48, train_iters=1, mock_data=True,
                              seed=3, images_per_sample=1)
    run = RunConfig(model=llava_config(language=language_config(num_layers=4)),
                    parallel=ParallelConfig(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1),
                    training=training)
    config = resolve(run, state.world_size)
    chunks = build_model_chunks(config, state)
    trainer = build_trainer(config, state, chunks)
    microbatches = SyntheticData(config, state, ResumePoint()).microbatches(0)
    recorders = [RecordingBuffer(_decoder_parameter(chunk)) for chunk in chunks]
    # Any positive token count: only which backward runs inside no_sync() matters here.
    trainer.forward_backward(chunks, microbatches, 1.0, recorders)
    return [recorder.backwards for recorder in recorders]


def test_interleaved_pipeline_syncs_each_chunk_on_its_last_backward() -> None:
    """2 stages x 2 virtual stages, 4 microbatches: each chunk's 4th backward is outside no_sync."""
    for rank, per_chunk in enumerate(run_distributed(_pipeline_job, 2)):
        assert len(per_chunk) == 2
        for chunk, backwards in enumerate(per_chunk):
            assert backwards == [True, True, True, False], f"rank {rank} chunk {chunk}: {backwards}"
