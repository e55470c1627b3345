"""The one object that knows the process groups.

Ranks are laid out tensor-parallel fastest, then context-parallel, then data-parallel, then
pipeline-parallel (Megatron's order):

    global_rank = pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank

so the tp peers of a rank are consecutive global ranks and, with torchrun's contiguous placement,
share a node (tensor parallelism talks the most), and the cp ring (which passes K/V blocks every
layer) comes next. Every module that communicates takes its group
from a `ParallelState`; nothing reaches for the default (world) group on its own, so a state whose
groups span a subset of the processes (a one-process reference inside a parity test) only ever
talks to that subset.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from megamm.parallel.random import RNGStatesTracker, seed_parallel_rng


def rank_layout(world_size: int, tp: int, pp: int, cp: int = 1) -> dict[str, list[list[int]]]:
    """Global ranks of every tp, cp, dp, dp x cp, pp and model-parallel (tp x pp) group.

    A pure function of the sizes, so the layout can be tested without processes. Raises
    `ValueError` when the sizes do not tile the world.

    `dp_cp` is what gradients of parameters replicated over cp are reduced over (each cp rank saw
    its share of the tokens; the distributed optimizer shards over it); `mp` is tp x pp at one
    (dp, cp) position: after the reduction the grads are equal across dp x cp, so the plain
    optimizer's grad norm sums over `mp` only.
    """
    if tp < 1 or pp < 1 or cp < 1:
        raise ValueError(f"parallel sizes must be >= 1, got tp={tp} cp={cp} pp={pp}")
    if world_size % (tp * cp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor-parallel size {tp} x "
            f"context-parallel size {cp} x pipeline-parallel size {pp}"
        )
    dp = world_size // (tp * cp * pp)

    def rank(t: int, c: int, d: int, p: int) -> int:
        return ((p * dp + d) * cp + c) * tp + t

    every = [(t, c, d, p) for p in range(pp) for d in range(dp) for c in range(cp) for t in range(tp)]

    def groups(key) -> list[list[int]]:
        """Ranks grouped by `key(t, c, d, p)` (equal key: same group), each group in rank order,
        groups in the order of their first rank."""
        found: dict = {}
        for coords in every:
            found.setdefault(key(*coords), []).append(rank(*coords))
        return list(found.values())

    return {
        "tp": groups(lambda t, c, d, p: (c, d, p)),
        "cp": groups(lambda t, c, d, p: (t, d, p)),
        "dp": groups(lambda t, c, d, p: (t, c, p)),
        "dp_cp": groups(lambda t, c, d, p: (t, p)),
        "pp": groups(lambda t, c, d, p: (t, c, d)),
        "mp": groups(lambda t, c, d, p: (c, d)),
        # The word-embedding copies of the first and last stage (tied embeddings) are synced like
        # data-parallel replicas: one group per tp rank over both stages and every dp and cp rank.
        "embedding_dp": [
            sorted({rank(t, c, d, p) for c in range(cp) for d in range(dp) for p in (0, pp - 1)})
            for t in range(tp)
        ],
    }


@dataclass
class ParallelState:
    """Sizes, ranks and process groups of one process.

    A group is `None` only in a single-process run without `torch.distributed`; the collectives in
    `megamm.parallel.mappings` treat `None` and size-1 groups as identity, and the checkpoint layer
    reads and writes within this process.
    """

    tp_size: int = 1
    dp_size: int = 1
    pp_size: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    pp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    cp_size: int = 1
    cp_rank: int = 0
    # The context-parallel ring: the ranks that split one sequence (megamm.parallel.context); its
    # global ranks in cp order, for the ring's point-to-point sends.
    cp_group: dist.ProcessGroup | None = None
    cp_ranks: list[int] = field(default_factory=lambda: [0])
    # Data x context parallel: gradient reduction and the distributed optimizer's shards. None means
    # dp_group (cp = 1, or a hand-built state), see `grad_group`.
    dp_cp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    mp_group: dist.ProcessGroup | None = None
    # Pipeline gradients travel on their own group (see megamm.pipeline.p2p).
    pp_grad_group: dist.ProcessGroup | None = None
    embedding_dp_group: dist.ProcessGroup | None = None
    # Every rank of this layout, on the main backend: reductions over all ranks, such as the grad
    # norm of the distributed optimizer and the step-time gather of the log line.
    world_group: dist.ProcessGroup | None = None
    # Every rank of this layout again, always gloo: the checkpoint layer's coordination (DCP plans,
    # barriers, publication). DCP's object collectives want CPU tensors, and an asynchronous save
    # runs them from a background thread, which must not share a group with the training step's
    # collectives (one Checkpointer uses it at a time: it finishes its pending save first).
    checkpoint_group: dist.ProcessGroup | None = None
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rng: RNGStatesTracker = field(default_factory=RNGStatesTracker)

    def __post_init__(self) -> None:
        self.rng.device = self.device

    def seed(self, seed: int) -> None:
        """Seed the default generator and the tensor-parallel dropout state for this rank."""
        seed_parallel_rng(seed, self.rng, self.tp_rank, self.pp_rank)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.cp_size * self.dp_size * self.pp_size

    @property
    def rank(self) -> int:
        """This process's rank among the layout's ranks (`rank_layout`'s numbering; the global rank
        for a state built by `from_groups`)."""
        return ((self.pp_rank * self.dp_size + self.dp_rank) * self.cp_size + self.cp_rank) * self.tp_size + self.tp_rank

    @property
    def grad_group(self) -> dist.ProcessGroup | None:
        """The group replicated parameters' gradients are summed over: dp x cp (each cp rank holds
        a share of the sequence, so its gradients are partial sums like a dp replica's)."""
        return self.dp_cp_group if self.cp_size > 1 else self.dp_group

    def without_context_parallel(self) -> ParallelState:
        """This state with cp = 1: the same groups, ranks and RNG tracker, for modules that work on
        whole inputs on every cp rank (the vision tower encodes whole images). Itself at cp = 1."""
        if self.cp_size == 1:
            return self
        return dataclasses.replace(self, cp_size=1, cp_rank=0, cp_group=None, cp_ranks=[self.rank],
                                   dp_cp_group=None)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelState:
        """A state for one process with no process groups at all."""
        return cls(device=torch.device(device))

    @classmethod
    def from_groups(
        cls, tp: int, pp: int, device: torch.device, timeout: timedelta | None = None, cp: int = 1
    ) -> ParallelState:
        """Build the groups for the given sizes over the already initialized world.

        Must be called by every rank (creating a group is collective). Several states may coexist
        in one process, for example a tp=2 state and a tp=1 reference state in a parity test.
        `timeout` is each group's collective timeout; None leaves the backend's default (a new
        group does not inherit the default group's timeout).
        """
        world_size = dist.get_world_size()
        rank = dist.get_rank()
        layout = rank_layout(world_size, tp, pp, cp)
        layout["pp_grad"] = layout["pp"]
        layout["world"] = [list(range(world_size))]
        mine: dict[str, tuple[dist.ProcessGroup, list[int]]] = {}
        for kind, groups in layout.items():
            for ranks in groups:
                group = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    mine[kind] = (group, ranks)
        checkpoint_group = dist.new_group(list(range(world_size)), backend="gloo", timeout=timeout)
        dp = world_size // (tp * cp * pp)
        return cls(
            tp_size=tp,
            dp_size=dp,
            pp_size=pp,
            tp_rank=rank % tp,
            dp_rank=(rank // (tp * cp)) % dp,
            pp_rank=rank // (tp * cp * dp),
            tp_group=mine["tp"][0],
            dp_group=mine["dp"][0],
            cp_size=cp,
            cp_rank=(rank // tp) % cp,
            cp_group=mine["cp"][0],
            cp_ranks=mine["cp"][1],
            dp_cp_group=mine["dp_cp"][0],
            pp_group=mine["pp"][0],
            mp_group=mine["mp"][0],
            pp_grad_group=mine["pp_grad"][0],
            embedding_dp_group=mine["embedding_dp"][0] if "embedding_dp" in mine else None,
            world_group=mine["world"][0],
            checkpoint_group=checkpoint_group,
            pp_ranks=mine["pp"][1],
            device=device,
        )


def default_backend(device: torch.device) -> str:
    """nccl for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def collective_timeout(timeout_minutes: float) -> timedelta:
    """The process groups' timeout for `--distributed-timeout-minutes`: 10 % more, and at least 5 s
    more, so the stall watchdog (megamm.training.watchdog), armed with the configured timeout at
    the start of the phase and able to say what the rank was doing, reports first. The backend's
    timeout remains the backstop where Python cannot run."""
    seconds = 60.0 * timeout_minutes
    return timedelta(seconds=seconds + max(0.1 * seconds, 5.0))


def initialize_parallel_state(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    timeout_minutes: float = 10.0,
    use_cuda: bool | None = None,
    context_parallel_size: int = 1,
) -> ParallelState:
    """Initialize `torch.distributed` from torchrun's environment and build the groups.

    Reads RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT through the env://
    rendezvous). Uses NCCL and `cuda:LOCAL_RANK` when CUDA is available (or `use_cuda` says so),
    gloo and the CPU otherwise. The collective timeout (`collective_timeout`, on the default group
    and every group built here) bounds how long a rank waits on a peer that died, so a crashed job
    ends instead of hanging.

    With NCCL, collectives are asynchronous to the host: a timed-out one is detected by
    ProcessGroupNCCL's watchdog thread, which tears the process down only when
    TORCH_NCCL_ASYNC_ERROR_HANDLING is nonzero. It is set to 3 (tear down without aborting the
    communicator, torch's own default since 2.2, and safe when an abort would itself hang) unless
    the environment already sets it. TORCH_NCCL_BLOCKING_WAIT is left off: it would make `wait()`
    block the host and end the overlap of gradient sync with backward.
    """
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    timeout = collective_timeout(timeout_minutes)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                "RANK and WORLD_SIZE are not set: launch with torchrun (for one process: "
                "`torchrun --nproc-per-node 1 ...`)"
            )
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun --max-restarts gives a restarted group the store of the first attempt, whose keys
        # (each rank's gloo address) are stale: every attempt gets a namespace of its own.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend=default_backend(device),
            store=dist.PrefixStore(f"megamm-attempt-{attempt}/", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    return ParallelState.from_groups(
        tensor_model_parallel_size, pipeline_model_parallel_size, device, timeout, context_parallel_size
    )
