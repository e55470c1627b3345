"""Sample packing: several tokenized samples per fixed-length sequence, attention kept per sample.

Padding every sample to the sequence length wastes most of the compute on short samples; packing
fills each row with whole samples instead. Three pieces:

- `pack_first_fit_decreasing` decides which samples share a row (bin). It runs in C++
  (`megamm._packing`) when the optional extension was built and in Python otherwise, both with a
  segment tree (O(n log n)); both give exactly the same bins (`BACKEND` says
  which one is used, `pack_python` / `pack_cpp` are the two explicitly, `pack_cpp` is None when the
  extension is unavailable).
- `packed_sequence` builds one row: ids, labels, restarting position ids, `cu_seqlens` (the form
  variable-length flash attention takes) and the sample of every token.
- `segment_ids` turns `cu_seqlens` into the sample of every position `[s]` (padding positions each
  their own), the O(s) form the training batches carry (`LanguageModel(..., segment_ids=ids[None])`);
  `block_causal_mask` into the dense `[s, s]` mask, e.g. `LanguageModel(..., attention_mask=mask[None, None])`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch

from megamm.config.constants import IGNORE_INDEX

PackFn = Callable[[Sequence[int], int], list[list[int]]]


def _checked_lengths(lengths: Sequence[int], capacity: int) -> list[int]:
    """Lengths as Python ints (rejecting floats, as the C++ binding does), each in [0, capacity]."""
    capacity = operator.index(capacity)
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    checked = [operator.index(length) for length in lengths]
    for index, length in enumerate(checked):
        if length < 0:
            raise ValueError(f"sample {index} has a negative length {length}")
        if length > capacity:
            raise ValueError(
                f"sample {index} has length {length} > capacity {capacity}; truncate or drop it first"
            )
    return checked


def pack_python(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing in pure Python, the fallback; gives exactly what the C++ version gives.

    Samples are taken by length descending, ties by index ascending (a stable sort), and each goes
    into the first bin (in the order bins were opened) whose remaining room fits it, opening a new
    bin when none does. Within a bin the indices are in placement order, i.e. longest first; this is
    deterministic, which keeps data order reproducible across runs and backends.

    The first bin with room is found with the same max segment tree as the C++ code (O(log n) per
    sample rather than a scan over all open bins, which takes minutes for 10^5 samples): leaves are
    the remaining room of all n possible bins, unopened ones at full capacity, so the leftmost leaf
    with room is the first open bin with room or else exactly the next new bin.
    Raises ValueError naming the index of a sample longer than `capacity` (or negative).
    """
    checked = _checked_lengths(lengths, capacity)
    order = sorted(range(len(checked)), key=lambda index: -checked[index])  # stable: ties by index
    leaves = 1
    while leaves < len(checked):
        leaves *= 2
    tree = [capacity] * (2 * leaves)  # tree[node] = max room below node; leaves at [leaves, 2 * leaves)
    bins: list[list[int]] = []
    for index in order:
        length = checked[index]
        node = 1
        while node < leaves:  # descend to the leftmost leaf with room >= length
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        bin_index = node - leaves
        if bin_index == len(bins):
            bins.append([])
        bins[bin_index].append(index)
        tree[node] -= length
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def _load_cpp() -> PackFn | None:
    """The compiled packer, or None when the optional extension was not built (a failed compile
    must not make the package unusable, only slower)."""
    try:
        from megamm import _packing
    except ImportError:
        return None
    return _packing.pack_first_fit_decreasing


pack_cpp: PackFn | None = _load_cpp()
BACKEND: str = "cpp" if pack_cpp is not None else "python"


def pack_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign sample indices to bins of `capacity` tokens by first-fit decreasing.

    `lengths` is a sequence of ints or a 1-D integer numpy array. Returns one list of sample indices
    per bin, bins in the order they were opened, indices in each bin in placement order (longest
    first). Uses the C++ backend when built (see `BACKEND`); both backends give the same result.
    Raises ValueError naming the index of a sample longer than `capacity`: the caller truncates or
    drops such samples first, since where to cut is a data decision, not a packing one.
    """
    if pack_cpp is not None:
        return pack_cpp(lengths, capacity)
    return pack_python(lengths, capacity)


def packed_sequence(samples: list[dict], capacity: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One packed row from tokenized samples (`input_ids`, `labels`: equal-length lists of ints).

    Returns `[capacity]` tensors:
    - `input_ids`: the samples concatenated, then `pad_id` up to `capacity`.
    - `labels`: the samples' labels (Hugging Face convention: aligned with the ids, the model shifts
      them), IGNORE_INDEX (-100) on padding and on the first token of every sample. The loss at
      position i predicts labels[i + 1], so the first label of a sample is never a target when the
      sample runs alone; in a row it would be the target of the previous sample's last token, a
      prediction across samples. Ignoring it makes every per-token loss equal to the standalone one.
    - `position_ids`: 0, 1, ... restarting for every sample (rotary positions as if alone); 0 on
      padding, so each padding token looks like a sample of its own, matching `block_causal_mask`
      (padding attends only itself) and position-id based boundary detection.
    - `sample_index`: which sample each token belongs to, -1 on padding.
    and `cu_seqlens` `[len(samples) + 1]` int32: 0, then the cumulative sample lengths, ending with
    the total real length (padding is not a sample).
    """
    total = sum(len(sample["input_ids"]) for sample in samples)
    if total > capacity:
        raise ValueError(f"samples hold {total} tokens, more than the capacity {capacity}")
    input_ids = torch.full((capacity,), pad_id, dtype=torch.long)
    labels = torch.full((capacity,), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(capacity, dtype=torch.long)
    sample_index = torch.full((capacity,), -1, dtype=torch.long)
    cu_seqlens = [0]
    start = 0
    for number, sample in enumerate(samples):
        ids, sample_labels = sample["input_ids"], sample["labels"]
        if len(ids) != len(sample_labels):
            raise ValueError(f"sample {number}: {len(ids)} input_ids but {len(sample_labels)} labels")
        end = start + len(ids)
        input_ids[start:end] = torch.as_tensor(ids, dtype=torch.long)
        labels[start:end] = torch.as_tensor(sample_labels, dtype=torch.long)
        if end > start:
            labels[start] = IGNORE_INDEX
        position_ids[start:end] = torch.arange(end - start)
        sample_index[start:end] = number
        cu_seqlens.append(end)
        start = end
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
        "sample_index": sample_index,
    }


def segment_ids(cu_seqlens: torch.Tensor | Sequence[int], capacity: int) -> torch.Tensor:
    """`[capacity]` int64: the sample each position of a packed row belongs to (0, 1, ...), and for
    each padding position (past `cu_seqlens[-1]`) an id of its own (so padding attends only itself).

    The O(s) form of a packed row's attention: query i may attend key j where their ids are equal
    and j <= i (`block_causal_mask`); ring attention derives each block's mask from it.
    """
    bounds = torch.as_tensor(cu_seqlens, dtype=torch.long).flatten()
    if bounds.numel() == 0 or bounds[0] != 0:
        raise ValueError("cu_seqlens must start with 0")
    lengths = bounds[1:] - bounds[:-1]
    if (lengths < 0).any() or bounds[-1] > capacity:
        raise ValueError(f"cu_seqlens must be non-decreasing and end at most at capacity {capacity}")
    end = int(bounds[-1])
    samples = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    return torch.cat([samples, torch.arange(lengths.numel(), lengths.numel() + capacity - end)])


def block_causal_mask(cu_seqlens: torch.Tensor | Sequence[int], capacity: int) -> torch.Tensor:
    """`[capacity, capacity]` bool mask, True where query i may attend key j.

    A real token attends the keys of its own sample at or before it (block-diagonal causal), so
    no information crosses samples. A padding position (past `cu_seqlens[-1]`) attends only itself:
    a row with no True would make the softmax 0/0 (NaN), which would poison gradients even though
    padding has no loss. Real tokens never attend padding. The same segments as `segment_ids`.
    """
    owner = segment_ids(cu_seqlens, capacity)
    return (owner[:, None] == owner[None, :]).tril()
