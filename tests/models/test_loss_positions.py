"""The output layer and the loss at the loss positions only equal the full-logits computation.

One process here; the tensor-parallel (tp=2 and 4, with and without sequence parallelism) and
pipeline (pp=2 and 4, tp x pp with SP) parity jobs compare the parallel runs, which select, with a
single-process reference that computes the full logits (tests/models/test_tp_parity.py,
tests/pipeline/test_schedules.py).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megamm.models.language import loss_positions
from megamm.models.llava import LlavaModel, average_loss
from megamm.parallel.state import ParallelState
from tests.tiny import language_config, llava_config, make_batch

TOLERANCE = 1e-5


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm().clamp(min=1e-12)).item()


def _loss_and_grads(model: LlavaModel, batch: dict, **kwargs) -> tuple[dict, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    average_loss(out).backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_loss_and_gradients_equal_the_full_logits(tied: bool) -> None:
    """A text-only sample, an image sample and padding (ignored labels at the end of a row): the
    per-token loss, the mask and every gradient agree with the full computation, and the output
    layer multiplies exactly the loss positions' rows."""
    config = llava_config(language=replace(language_config(), tie_word_embeddings=tied))
    model = LlavaModel(config, ParallelState.single())
    model.initialize(3)
    batch = make_batch(config, [1, 0])
    batch["labels"][1, 12:] = -100  # padding after the second sample
    rows = []
    hook = model.language.output_layer.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape))
    selected, selected_grads = _loss_and_grads(model, batch)
    hook.remove()
    full, full_grads = _loss_and_grads(model, batch, return_logits=True)

    tokens = int(full["loss_mask"].sum())
    assert 0 < tokens < batch["labels"].numel() // 2, "the batch must leave most positions without a loss"
    assert rows == [torch.Size([tokens, config.language.transformer.hidden_size])]
    assert torch.equal(selected["loss_mask"], full["loss_mask"])
    assert "logits" not in selected
    assert selected["loss"].shape == full["loss"].shape == batch["labels"].shape
    assert torch.equal(selected["loss"][~full["loss_mask"]], torch.zeros(batch["labels"].numel() - tokens))
    assert _relative_error(selected["loss"], full["loss"]) < TOLERANCE
    assert set(selected_grads) == set(full_grads) and full_grads
    for name, grad in full_grads.items():
        assert _relative_error(selected_grads[name], grad) < TOLERANCE, name


def test_positions_built_ahead_give_the_same_loss() -> None:
    """The training step builds the positions on the host; the model derives the same ones."""
    model = LlavaModel(llava_config(), ParallelState.single())
    model.initialize(5)
    batch = make_batch(model.config, [2, 1])
    positions = loss_positions(batch["labels"], model.state)
    # Sequence-first order of [s, b]: position i of row r is index i * b + r.
    mask = torch.cat([batch["labels"][:, 1:] != -100, torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    assert torch.equal(positions, torch.tensor([i * 2 + r for i in range(48) for r in range(2) if mask[r, i]]))
    with torch.no_grad():
        given = model(**batch, loss_positions=positions)["loss"]
        derived = model(**batch)["loss"]
    assert torch.equal(given, derived)


def test_bad_loss_positions_are_refused() -> None:
    model = LlavaModel(llava_config(), ParallelState.single())
    batch = make_batch(model.config, [1, 0])
    with pytest.raises(ValueError, match=r"loss_positions must be int64 indices \[n\].*shape \(2, 48\)"):
        model(**batch, loss_positions=batch["labels"] != -100)
