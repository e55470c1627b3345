"""Which language-model layers each pipeline stage (and virtual stage) holds, and what a schedule needs.

Pure arithmetic on the parallel sizes, in the config layer so that validation and the model
builders share one rule.

Without virtual stages, stage r holds one contiguous block; `first_stage_layers` /
`last_stage_layers` make the split uneven (the first stage also carries the vision tower and the
projector, the last one the output layer and loss), the middle stages share the rest evenly.

With virtual stages (`layers_per_virtual_stage`), the layers form `pp * vp` chunks in order and
stage r holds chunks r, r + pp, r + 2 pp, ... (the interleaved schedule's placement), so a
microbatch travels around the ring of stages vp times.
"""

from __future__ import annotations


def layout_problems(
    num_layers: int,
    pp: int,
    layers_per_virtual_stage: int | None = None,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> list[str]:
    """Every reason the requested split is impossible (empty when it is fine)."""
    found = []
    uneven = first_stage_layers is not None or last_stage_layers is not None
    if layers_per_virtual_stage is not None:
        if uneven:
            found.append("uneven first/last stage layers cannot be combined with virtual pipeline stages")
        if pp < 2:
            found.append("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        if layers_per_virtual_stage < 1 or num_layers % (pp * layers_per_virtual_stage):
            found.append(
                f"{num_layers} language layers do not split into {pp} stages x chunks of "
                f"{layers_per_virtual_stage} layers (layers must be a multiple of {pp * max(layers_per_virtual_stage, 1)})"
            )
        return found
    if not uneven:
        if num_layers % pp:
            found.append(f"{num_layers} language layers are not divisible by {pp} pipeline stages")
        return found
    if pp < 2:
        found.append("first/last stage layer counts need --pipeline-model-parallel-size > 1")
        return found
    first = first_stage_layers if first_stage_layers is not None else 0
    last = last_stage_layers if last_stage_layers is not None else 0
    fixed_stages = int(first_stage_layers is not None) + int(last_stage_layers is not None)
    rest, others = num_layers - first - last, pp - fixed_stages
    if first < 0 or last < 0 or rest < 0:
        found.append(f"first ({first}) + last ({last}) stage layers exceed the {num_layers} language layers")
    elif others == 0 and rest:
        found.append(f"first ({first}) + last ({last}) stage layers must add up to {num_layers} with {pp} stages")
    elif others and rest % others:
        found.append(
            f"the {rest} language layers left after the first/last stages do not split evenly over the "
            f"other {others} stages"
        )
    return found


def virtual_stages(num_layers: int, pp: int, layers_per_virtual_stage: int | None) -> int:
    """Model chunks per pipeline stage: `num_layers / (pp * layers_per_virtual_stage)`, 1 without
    virtual stages (and for a split `layout_problems` refuses, so validation can still ask)."""
    if layers_per_virtual_stage is None or layers_per_virtual_stage < 1 or pp < 1:
        return 1
    return max(1, num_layers // (pp * layers_per_virtual_stage))


def stage_layers(
    num_layers: int,
    pp: int,
    pp_rank: int,
    layers_per_virtual_stage: int | None = None,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> list[range]:
    """The global layer numbers of each model chunk on stage `pp_rank` (one chunk without vp)."""
    problems = layout_problems(num_layers, pp, layers_per_virtual_stage, first_stage_layers, last_stage_layers)
    if problems:
        raise ValueError("; ".join(problems))
    if layers_per_virtual_stage is not None:
        chunks = virtual_stages(num_layers, pp, layers_per_virtual_stage)
        return [
            range((c * pp + pp_rank) * layers_per_virtual_stage, (c * pp + pp_rank + 1) * layers_per_virtual_stage)
            for c in range(chunks)
        ]
    counts = []
    fixed = {0: first_stage_layers, pp - 1: last_stage_layers}
    rest = num_layers - sum(v for v in fixed.values() if v is not None)
    others = pp - sum(v is not None for v in fixed.values())
    for stage in range(pp):
        given = fixed.get(stage)
        counts.append(given if given is not None else rest // others)
    start = sum(counts[:pp_rank])
    return [range(start, start + counts[pp_rank])]


def schedule_problems(pp: int, vp: int, num_microbatches: int) -> list[str]:
    if vp > 1 and (num_microbatches < pp or num_microbatches % pp):
        return [
            (f"the interleaved pipeline schedule needs the number of microbatches per step ({num_microbatches}: "
            f"global batch / (micro batch x data-parallel size)) to be a positive multiple of the "
            f"{pp} pipeline stages")
        ]
    return []
