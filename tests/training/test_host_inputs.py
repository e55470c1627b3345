"""The model plans a microbatch's vision work from host inputs: no device tensor is read on the host.

The device here is `meta`: its tensors have shapes but no values, so reading one on the host
(`tolist`, `item`, a copy to the CPU, an op whose output size depends on values) raises, which is
where a CUDA run would synchronize with the device. The training step's copy to the device leaves
`HOST_INPUTS` (token ids, grids, counts) on the CPU; a forward and backward of the Qwen2-VL model
(padded and packed microbatches: grids, patch segments, windows of Qwen2.5-VL) and of the fixed-size
LLaVA model then runs with every other tensor on the meta device.
"""

from __future__ import annotations

import pytest
import torch

from megamm.models.llava import HOST_INPUTS, LlavaModel
from megamm.parallel.state import ParallelState
from megamm.training.step import _to_device
from tests.tiny import llava_config, make_batch, native_microbatches, qwen2_vl_config

META = torch.device("meta")


def test_the_copy_to_the_device_leaves_host_inputs_on_the_cpu() -> None:
    batch = native_microbatches(qwen2_vl_config())[1]
    moved = _to_device(batch, ParallelState.single(META))
    for key, value in moved.items():
        assert value.device == (torch.device("cpu") if key in HOST_INPUTS else META), key
    assert {"input_ids", "image_grid_thw", "video_grid_thw"} <= batch.keys()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_a_step_reads_no_device_tensor_on_the_host(family: str) -> None:
    config = llava_config() if family == "llava" else qwen2_vl_config(family)
    batches = [make_batch(config, [2, 1])] if family == "llava" else native_microbatches(config)
    model = LlavaModel(config, ParallelState.single(META)).to(META)
    for batch in batches:
        out = model(**_to_device(batch, ParallelState.single(META)))
        assert out["loss"].device == META and out["loss"].shape == batch["input_ids"].shape
        out["loss"].sum().backward()
