"""1F1B keeps few microbatches in flight: the memory bound of the pipeline schedules.

What makes 1F1B worth having over "all forwards, then all backwards" (GPipe) is the activation
memory: a stage holds the activations of every microbatch it has forwarded but not yet backwarded.
In the non-interleaved schedule, rank r of pp stages warms up with pp - r - 1 forwards and then
alternates one forward and one backward, so at no point of its order does it hold more than pp - r
microbatches, whatever the number of microbatches M.

The interleaved schedule (vp model chunks per stage) follows Megatron-LM
(`forward_backward_pipelining_with_interleaving`): rank r runs
`warmup = (pp - r - 1) * 2 + (vp - 1) * pp` forwards (capped at the total vp * M; all of them when
M == pp, where Megatron also runs every forward first), then alternates one forward and one
backward. A chunk-microbatch (one chunk's forward of one microbatch) holds activations until its
backward, so at most `min(warmup + 1, vp * M)` are in flight.

These orders are what `PipelineSchedule` executes (megamm/pipeline/schedules.py), so checking
`schedule_order` checks the schedule's memory; an all-forward-then-all-backward order still covers
every operation once, forward first (what tests/pipeline/test_schedules.py checks), but fails here.
"""

from __future__ import annotations

import pytest

from megamm.pipeline.schedules import schedule_order


def in_flight_profile(order: list[tuple[str, int, int]]) -> list[int]:
    """The number of chunk-microbatches forwarded but not yet backwarded after each operation.

    Also checks the order is well formed (no backward before its forward, nothing twice), so the
    count means what it says."""
    held: set[tuple[int, int]] = set()
    done: set[tuple[int, int]] = set()
    profile = []
    for kind, chunk, microbatch in order:
        key = (chunk, microbatch)
        if kind == "F":
            assert key not in held and key not in done, f"forward of {key} twice"
            held.add(key)
        else:
            assert key in held, f"backward of {key} before its forward"
            held.remove(key)
            done.add(key)
        profile.append(len(held))
    assert not held, f"never backwarded: {sorted(held)}"
    return profile


def megatron_interleaved_warmup(pp: int, rank: int, vp: int, microbatches: int) -> int:
    """Megatron-LM's number of warm-up forwards of the interleaved schedule (stated independently of
    megamm's code: see the module docstring)."""
    total = vp * microbatches
    if microbatches == pp:
        return total
    return min((pp - rank - 1) * 2 + (vp - 1) * pp, total)


NON_INTERLEAVED = [(pp, m) for pp in (1, 2, 3, 4, 8) for m in (1, 2, 3, 4, 5, 7, 8, 16, 33)]


@pytest.mark.parametrize(("pp", "microbatches"), NON_INTERLEAVED)
def test_1f1b_holds_at_most_pp_minus_rank_microbatches(pp: int, microbatches: int) -> None:
    """vp = 1: rank r never holds more than pp - r microbatches; the bound is reached (the schedule
    does overlap stages) whenever there are that many microbatches."""
    for rank in range(pp):
        profile = in_flight_profile(schedule_order(pp, rank, 1, microbatches, forward_only=False))
        assert len(profile) == 2 * microbatches
        assert max(profile) <= pp - rank, (
            f"pp={pp} rank={rank} M={microbatches}: {max(profile)} microbatches in flight, bound {pp - rank}"
        )
        assert max(profile) == min(pp - rank, microbatches)


INTERLEAVED = [(2, 2, 2), (2, 2, 4), (2, 2, 6), (2, 3, 4), (2, 3, 8), (4, 2, 4), (4, 2, 8), (4, 2, 12),
               (4, 3, 8), (4, 4, 16), (3, 2, 6), (3, 2, 9)]


@pytest.mark.parametrize(("pp", "vp", "microbatches"), INTERLEAVED)
def test_interleaved_1f1b_holds_at_most_megatron_warmup_plus_one(pp: int, vp: int, microbatches: int) -> None:
    """vp > 1: at most min(warmup + 1, vp * M) chunk-microbatches in flight, and the first backward
    comes right after the warmup + 1-th forward (exactly warmup forwards when they are all of them)."""
    total = vp * microbatches
    for rank in range(pp):
        order = schedule_order(pp, rank, vp, microbatches, forward_only=False)
        profile = in_flight_profile(order)
        warmup = megatron_interleaved_warmup(pp, rank, vp, microbatches)
        bound = min(warmup + 1, total)
        assert max(profile) <= bound, (
            f"pp={pp} vp={vp} rank={rank} M={microbatches}: {max(profile)} in flight, bound {bound}"
        )
        leading_forwards = next(i for i, (kind, _, _) in enumerate(order) if kind == "B")
        assert leading_forwards == bound, f"rank {rank}: {leading_forwards} forwards before the 1st backward"


def test_forward_only_holds_nothing_for_backward() -> None:
    """Evaluation runs forwards only: every chunk-microbatch once, in Megatron's chunk order."""
    for pp, vp, microbatches in [(4, 1, 5), (4, 2, 8)]:
        for rank in range(pp):
            order = schedule_order(pp, rank, vp, microbatches, forward_only=True)
            assert all(kind == "F" for kind, _, _ in order)
            expected = [(c, m) for c in range(vp) for m in range(microbatches)]
            assert sorted((c, m) for _, c, m in order) == expected


def test_all_forward_then_all_backward_would_break_the_bound() -> None:
    """The checker itself: a GPipe order of 8 microbatches holds all 8 at once on every rank, above
    the 1F1B bound of pp - r = 4..1, so `in_flight_profile` does tell the two schedules apart."""
    pp, microbatches = 4, 8
    gpipe = [("F", 0, m) for m in range(microbatches)] + [("B", 0, m) for m in range(microbatches)]
    assert max(in_flight_profile(gpipe)) == microbatches
    assert all(microbatches > pp - rank for rank in range(pp))
