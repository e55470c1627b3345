"""Qwen2_5_VLForConditionalGeneration: Qwen2-VL's directory layout and config mapping
(megamm.convert.adapters.qwen2_vl_hf) with the Qwen2.5-VL tower (RMSNorm, SwiGLU, window attention,
`tokens_per_second` for video positions)."""

from __future__ import annotations

from megamm.convert.adapters.qwen2_vl_hf import Qwen2VLHfAdapter
from megamm.models.towers.qwen2_vl import QWEN2_5_VL

ADAPTER = Qwen2VLHfAdapter("qwen2.5-vl-hf", QWEN2_5_VL, "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl_text")
