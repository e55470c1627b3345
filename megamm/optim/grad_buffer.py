"""Contiguous fp32 gradient buffers ("main grads") synced across data parallelism in buckets.

Every trainable parameter has a main grad, an fp32 view into one flat buffer that the buffer owns
(`buffer.main_grad(param)`). For fp32 parameters `param.grad` is that view, so autograd accumulates
into the buffer in place; for bf16/fp16 parameters a post-accumulate-grad hook adds each fresh
`param.grad` into it and frees `param.grad`. Either way gradients accumulate over microbatches in
fp32. Frozen parameters get no buffer space.

The buffer is cut into buckets of about `bucket_size` elements, in reverse parameter order (roughly
the order backward produces them). Each bucket is padded to a multiple of dp so that it splits into
equal dp shards, which is what the distributed optimizer owns. "dp" here is the group the buffer is
given: the data-parallel group, or data x context parallel (`ParallelState.grad_group`), whose cp
ranks hold partial gradients over their shares of the sequence exactly like dp replicas. Sync is a SUM across dp: all-reduce
for the plain optimizer, reduce-scatter (each rank gets its shard) for the distributed one. The
loss is already divided by the global batch's token count, so the sum is the exact average.

Gradient accumulation works like DDP's `no_sync()`: backward passes run inside `buffer.no_sync()`
only accumulate; the one run outside it (the schedule runs the last microbatch there) completes
the step's grads. With `overlap`, a bucket's collective starts during that backward as soon as all
of its parameters have their grads; buckets are always launched in index order, so every rank
issues the same collectives in the same order even if its autograd order differs (a rank whose
microbatch has no image produces vision grads in another order). Without `overlap`, and for any
bucket that has not started, `finish_grad_sync` launches the collectives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megamm.parallel.mappings import Group, group_rank, group_size
from megamm.parallel.phase import enter_phase, waiting_on_peers


@dataclass
class Bucket:
    """A contiguous range `[start, end)` of the buffer; `end - start` is a multiple of dp."""

    index: int
    start: int
    end: int
    params: list[nn.Parameter]
    pending: set[int] = field(default_factory=set)
    handle: dist.Work | None = None

    @property
    def numel(self) -> int:
        return self.end - self.start


class GradBuffer:
    """Main-grad buffer, buckets and the data-parallel gradient sync of one model chunk."""

    def __init__(
        self,
        params: list[nn.Parameter],
        dp_group: Group,
        bucket_size: int = 40_000_000,
        overlap: bool = False,
        shard_for_optimizer: bool = False,
    ) -> None:
        """params: the trainable parameters, in model order. With `shard_for_optimizer`, sync by
        reduce-scatter, and also move the parameters into one flat buffer of their dtype with the
        same layout, so updated shards can be all-gathered back in place."""
        self.dp_group = dp_group
        self.dp_size = group_size(dp_group)
        self.dp_rank = group_rank(dp_group)
        self.overlap = overlap
        self.shard_for_optimizer = shard_for_optimizer
        self.params = [p for p in params if p.requires_grad]
        self.offsets: dict[nn.Parameter, tuple[int, int]] = {}
        self.buckets: list[Bucket] = []
        self._layout(bucket_size)
        device = self.params[0].device if self.params else torch.device("cpu")
        self.grad_data = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self.param_data: torch.Tensor | None = None
        if shard_for_optimizer:
            dtype = self.params[0].dtype if self.params else torch.float32
            self.param_data = torch.zeros(self.numel, dtype=dtype, device=device)
        self._main_grads: dict[nn.Parameter, torch.Tensor] = {}
        for param in self.params:
            start, end = self.offsets[param]
            self._main_grads[param] = self.grad_data[start:end].view_as(param)
            if self.param_data is not None:
                view = self.param_data[start:end].view_as(param)
                view.copy_(param.data)
                param.data = view
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._next_to_launch = 0
        self._syncing = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _layout(self, bucket_size: int) -> None:
        offset = 0
        current: list[nn.Parameter] = []
        start = 0
        for param in reversed(self.params):
            self.offsets[param] = (offset, offset + param.numel())
            offset += param.numel()
            current.append(param)
            if offset - start >= bucket_size:
                offset = self._close_bucket(start, offset, current)
                start, current = offset, []
        if current:
            offset = self._close_bucket(start, offset, current)
        self.numel = offset

    def _close_bucket(self, start: int, end: int, params: list[nn.Parameter]) -> int:
        padded_end = start + -(-(end - start) // self.dp_size) * self.dp_size
        self.buckets.append(Bucket(len(self.buckets), start, padded_end, params))
        return padded_end

    def main_grad(self, param: nn.Parameter) -> torch.Tensor:
        """The fp32 gradient of `param` (its shape), a view into this buffer."""
        grad = self._main_grads.get(param)
        if grad is None:
            raise KeyError(f"a parameter of shape {tuple(param.shape)} has no main grad in this buffer "
                           "(frozen, or held by another buffer)")
        return grad

    # ---- backward-time accumulation and sync ---------------------------------------------------

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate into the main grads: no dp collective starts.

        The schedule runs every microbatch but the last inside it; the backward outside it is the
        last of the step, during which overlapped buckets launch as their grads complete.
        """
        previous, self._syncing = self._syncing, False
        try:
            yield
        finally:
            self._syncing = previous

    def _on_grad(self, param: nn.Parameter) -> None:
        main_grad = self._main_grads[param]
        if param.grad is not main_grad:
            main_grad.add_(param.grad)
            param.grad = None
        if self.overlap and self._syncing:
            bucket = self._bucket_of[id(param)]
            bucket.pending.discard(id(param))
            self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        while self._next_to_launch < len(self.buckets) and not self.buckets[self._next_to_launch].pending:
            self._launch(self.buckets[self._next_to_launch])
            self._next_to_launch += 1

    def _launch(self, bucket: Bucket) -> None:
        if self.dp_size == 1:
            return
        data = self.grad_data[bucket.start : bucket.end]
        if self.shard_for_optimizer:
            shard = data.chunk(self.dp_size)[self.dp_rank]
            bucket.handle = _reduce_scatter_async(shard, data, self.dp_group)
        else:
            bucket.handle = dist.all_reduce(data, group=self.dp_group, async_op=True)

    def start_step(self) -> None:
        """Zero the main grads and arm the overlap bookkeeping for a new iteration."""
        self.grad_data.zero_()
        # fp32 parameters accumulate straight into their main grad: with `.grad` already set to the
        # buffer view, autograd adds each new gradient into it in place (no extra copy or add).
        for param in self.params:
            if param.dtype == torch.float32:
                param.grad = self._main_grads[param]
        self._next_to_launch = 0
        for bucket in self.buckets:
            bucket.pending = {id(p) for p in bucket.params}
            bucket.handle = None

    def finish_grad_sync(self) -> None:
        """Launch whatever has not been launched yet, then wait for every bucket."""
        if not self._syncing:
            raise RuntimeError("finish_grad_sync inside no_sync(): the step's gradients are not complete yet")
        for bucket in self.buckets[self._next_to_launch :]:
            self._launch(bucket)
        self._next_to_launch = len(self.buckets)
        for bucket in self.buckets:
            if bucket.handle is not None:
                enter_phase(f"data-parallel gradient all-reduce (bucket {bucket.index})", waiting=True)
                bucket.handle.wait()
                bucket.handle = None

    # ---- distributed-optimizer support ----------------------------------------------------------

    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        """This dp rank's `[start, end)` of a bucket, in buffer coordinates."""
        size = bucket.numel // self.dp_size
        start = bucket.start + self.dp_rank * size
        return start, start + size

    def all_gather_params(self) -> None:
        """After each rank updated its shard of `param_data`, give every rank the whole buffer."""
        if self.param_data is None or self.dp_size == 1:
            return
        handles = []
        for bucket in self.buckets:
            data = self.param_data[bucket.start : bucket.end]
            shard = data.chunk(self.dp_size)[self.dp_rank]
            handles.append(_all_gather_async(data, shard, self.dp_group))
        with waiting_on_peers("distributed-optimizer parameter all-gather over data parallel"):
            for handle in handles:
                handle.wait()


class _Done:
    """A finished collective (for the paths that complete synchronously)."""

    def wait(self) -> None:
        return None


def _reduce_scatter_async(shard: torch.Tensor, data: torch.Tensor, group: Group):
    if dist.get_backend(group) == "nccl":
        return dist.reduce_scatter_tensor(shard, data, group=group, async_op=True)
    # gloo: all-reduce the bucket; this rank then reads only its shard (same result, more traffic).
    return dist.all_reduce(data, group=group, async_op=True)


def _all_gather_async(data: torch.Tensor, shard: torch.Tensor, group: Group):
    if dist.get_backend(group) == "nccl":
        return dist.all_gather_into_tensor(data, shard.clone(), group=group, async_op=True)
    parts = list(data.chunk(group_size(group)))
    dist.all_gather(parts, shard.clone(), group=group)
    return _Done()
