"""The unit of a key map: one megamm parameter and the Hugging Face tensors it is made of.

Tensor names on the Hugging Face side are canonical (megamm.convert.hf_keys): the component prefix
("vision.", "text.", "projector.") plus the key inside the Hugging Face component, so one family's
key map serves every checkpoint layout that holds the component.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """`megamm` is the concatenation of `parts` along dim 0 (`[q; k; v]`, `[gate; up]`).

    rows: the rows of each part where they differ (GQA's q is wider than k and v); None means equal
    parts. The exporter splits the megamm tensor back with it.
    """

    megamm: str
    parts: tuple[str, ...]
    rows: tuple[int, ...] | None = None

    def split_rows(self, total: int) -> list[int]:
        """Rows of each part of a megamm tensor with `total` rows."""
        if self.rows is not None:
            return list(self.rows)
        return [total // len(self.parts)] * len(self.parts)
