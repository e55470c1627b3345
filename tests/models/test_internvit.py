"""InternVL (InternViT tower, pixel shuffle, InternVL projector) trained at tp=2 and at tp=2 with
sequence parallelism equals one process: loss and every gradient within 1e-5 (fp32), on samples
built by the data pipeline (the internvl template with NVLM tile tags, images of three aspect ratios
cut into 1, 3 and 4 tiles by megamm.data.samples), padded and packed (block-causal rows).

Two towers: QK norm with RMSNorm and no q/k/v biases (the QK norm's sum of squares spans the heads
of both tp ranks), and LayerNorm with q/k/v biases. Under sequence parallelism the tower's 17
positions are padded to 18. One spawned job of 2 gloo processes runs every case.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megamm.data.batching import packed_microbatches, padded_microbatches
from megamm.data.internvl_template import INTERNVL, THUMBNAIL_TAG
from megamm.data.samples import ImageSettings, Sample, SampleBuilder
from megamm.data.sources import Record
from megamm.data.tokenizer import Tokenizer, load_tokenizer
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState, initialize_parallel_state
from tests.data_fixtures import write_qwen_tokenizer
from tests.distributed import run_distributed
from tests.models.test_qwen2_vl_parity import _accumulate, _grads, _relative
from tests.tiny import internvl_config

SEED = 2024
TOLERANCE = 1e-5
SEQ = 80
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
            "<tile_1>", "<tile_2>", "<tile_3>", THUMBNAIL_TAG)
CORPUS = ["What is in the picture? A red square.", "Describe it. A tall green tower and a wide blue bar."]


def internvl_samples(root: Path) -> tuple[list[Sample], Tokenizer]:
    """Three samples (images of 16x16, 40x16 and 16x32 pixels cut into 1, 4 and 3 tiles, the
    internvl template with NVLM tile tags, SEQ tokens at most) and their tokenizer."""
    tokenizer = load_tokenizer(write_qwen_tokenizer(root / "tokenizer.json", CORPUS, SPECIALS),
                               image_token="<IMG_CONTEXT>", pad_token="<|endoftext|>")
    rng = np.random.default_rng(1)
    records = []
    for number, (width, height) in enumerate([(16, 16), (40, 16), (16, 32)]):
        path = root / f"image{number}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        conversation = [{"from": "human", "value": "<image>\nDescribe it."},
                        {"from": "gpt", "value": CORPUS[number % 2].split("? ")[-1]}]
        records.append(Record("test", number, str(number), conversation, [str(path)]))
    settings = ImageSettings(16, "resize", "internvit", 4, float_ratios=True)
    builder = SampleBuilder(tokenizer, INTERNVL.with_tile_tags(4), settings, 4, SEQ)
    samples = [builder.build(record) for record in records]
    assert [s.tiles_per_image for s in samples] == [[1], [4], [3]]
    return samples, tokenizer


def internvl_microbatches(root: Path) -> tuple[list[dict], int, int]:
    """Padded microbatches (2 rows) and one packed microbatch of the three `internvl_samples`, the
    tokenizer's vocabulary size and its image token id."""
    samples, tokenizer = internvl_samples(root)
    pad, shape = tokenizer.pad_id, (3, 16, 16)
    microbatches = padded_microbatches(samples, 2, SEQ, pad, shape) + packed_microbatches(samples[:2], 1, SEQ, pad,
                                                                                          shape)
    return microbatches, tokenizer.vocab_size, tokenizer.image_token_id


def _parity_job(microbatches: list[dict], vocab: int, image_token: int) -> dict[str, dict]:
    reference_state = initialize_parallel_state(tensor_model_parallel_size=1)
    tp_state = ParallelState.from_groups(tp=2, pp=1, device=torch.device("cpu"))
    results = {}
    for qk_norm in (True, False):
        config = internvl_config(qk_norm=qk_norm, vocab_size=vocab, image_token_id=image_token)
        reference = LlavaModel(config, reference_state)
        reference.initialize(SEED)
        reference_loss = _accumulate(reference, microbatches)
        reference_grads = _grads(reference)
        for sequence_parallel in (False, True):
            model = LlavaModel(config, tp_state, sequence_parallel=sequence_parallel)
            model.initialize(SEED)
            loss = _accumulate(model, microbatches)
            grads = _grads(model)
            results[f"{'qk_norm' if qk_norm else 'layernorm'}-tp2{'+sp' if sequence_parallel else ''}"] = {
                "loss": loss, "reference_loss": reference_loss,
                "grad_errors": {n: _relative(g, reference_grads[n]) for n, g in grads.items()},
                "zero_grads": [n for n, g in grads.items() if g.norm() == 0],
            }
    return results


@pytest.fixture(scope="module")
def parity_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    microbatches, vocab, image_token = internvl_microbatches(tmp_path_factory.mktemp("internvit"))
    return run_distributed(_parity_job, 2, microbatches, vocab, image_token)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["qk_norm-tp2", "qk_norm-tp2+sp", "layernorm-tp2", "layernorm-tp2+sp"])
def test_internvl_training_matches_single_process(parity_results: list[dict], case: str) -> None:
    for rank, results in enumerate(parity_results):
        result = results[case]
        loss_error = abs(result["loss"] - result["reference_loss"]) / abs(result["reference_loss"])
        worst = max(result["grad_errors"].items(), key=lambda item: item[1])
        print(f"{case} rank {rank}: loss relative error {loss_error:.2e}, worst gradient {worst[0]} {worst[1]:.2e}")
        assert loss_error < TOLERANCE, f"rank {rank}: loss {result['loss']} vs {result['reference_loss']}"
        assert worst[1] < TOLERANCE, f"rank {rank}: gradient of {worst[0]} off by {worst[1]:.2e} (relative)"
        assert not result["zero_grads"], f"rank {rank}: parameters without gradient {result['zero_grads']}"
        names = result["grad_errors"]
        assert any("q_norm" in n for n in names) == case.startswith("qk_norm")
        assert any("layer_scale.lambda_2" in n for n in names)
