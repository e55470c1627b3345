"""What the tiled families' conversion tests share (LLaVA-NeXT, LLaVA-OneVision, InternVL, and their
PEFT tests): a random image, an imported checkpoint as a model, its logits gathered over tp, and
the mean loss of transformers' logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from megamm.checkpoint.model_weights import load_model_weights, read_run_config_tree
from megamm.config.parsing import run_config_from_dict
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState
from tests.convert.test_roundtrip import VOCAB

# The batch keys the model takes (a batch holds those of its family; labels are left out: logits only).
MODEL_INPUTS = ("input_ids", "pixel_values", "images_per_sample", "image_sizes", "pixel_values_videos",
                "videos_per_sample")


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def load_imported(save: Path, state: ParallelState, **stage) -> LlavaModel:
    """The checkpoint `save`'s model at `state`'s layout (`stage`: LlavaModel's keyword arguments), in
    eval mode."""
    _, tree = read_run_config_tree(save)
    model = LlavaModel(run_config_from_dict(tree).model, state, **stage)
    load_model_weights(model, save, state)
    return model.eval()


@torch.no_grad()
def gathered_logits(model: LlavaModel, batch: dict) -> torch.Tensor:
    """`[b, s, V]` logits on the batch's model inputs, gathered over tp and stripped of vocabulary
    padding."""
    local = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, return_logits=True)["logits"].contiguous()
    if model.state.tp_size > 1:
        pieces = [torch.empty_like(local) for _ in range(model.state.tp_size)]
        dist.all_gather(pieces, local, group=model.state.tp_group)
        local = torch.cat(pieces, dim=-1)
    return local[..., :VOCAB].transpose(0, 1)


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Transformers' loss: the mean next-token cross entropy of `[b, s, V]` logits over the labels."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100).item()
