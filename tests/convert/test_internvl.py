"""InternVL conversion: random tiny InternVLForConditionalGeneration models (a Qwen2 text model with
RMSNorm, QK-normalized InternViT layers without q/k/v biases and the last hidden state; a Llama text
model with LayerNorm, biased q/k/v and the penultimate hidden state) imported into megamm give
transformers' logits (fp32, 1e-4) on a batch whose images have different aspect ratios, hence
different tile counts (tiles and thumbnails from megamm.data.images as the InternVL processor cuts
them), at tp=1 here and at tp=2 (sequence parallel) and pp=2 from the imported checkpoint in one
spawned run; import then export is bit-exact and loads with `from_pretrained`; greedy generation
gives transformers' `generate` tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file
from transformers import InternVLConfig, InternVLForConditionalGeneration

from megamm.convert.adapters.internvl_hf import ADAPTER
from megamm.convert.exporter import export_hf
from megamm.convert.importer import import_internvl_hf
from megamm.data.images import preprocess_tiles
from megamm.inference.generation import GenerationConfig, Prompt, generate
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.pipeline.schedules import PipelineSchedule
from tests.convert.test_parity import _session
from tests.convert.test_roundtrip import convert_main, randomize_, save_hf, text_config
from tests.convert.tiled import gathered_logits, load_imported, mean_loss
from tests.distributed import run_distributed

IMAGE_TOKEN = 112
TILE, PATCH = 16, 4
TOKENS_PER_TILE = (TILE // PATCH) ** 2 // 4  # 4: pixel shuffle merges 2x2 of the 4x4 patches
LOGIT_TOLERANCE = 1e-4
# (width, height) of each sample's images: wide (3 tiles + thumbnail), square (1 tile), tall (2 + thumbnail).
IMAGE_SIZES = [[(48, 16), (16, 16)], [(16, 34)]]
SEQ = 56
TEXT_FAMILIES = ("qwen2", "llama")


def build_hf(family: str, seed: int = 3) -> InternVLForConditionalGeneration:
    qwen = family == "qwen2"
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": TILE, "patch_size": PATCH, "norm_type": "rms_norm" if qwen else "layer_norm",
              "use_qk_norm": qwen, "attention_bias": not qwen, "layer_scale_init_value": 0.1, "hidden_act": "gelu"}
    text = text_config(family)
    config = InternVLConfig(vision_config=vision, text_config=text.to_dict(), image_token_id=IMAGE_TOKEN,
                            image_seq_length=TOKENS_PER_TILE, vision_feature_layer=-1 if qwen else -2,
                            tie_word_embeddings=text.tie_word_embeddings)
    config._attn_implementation = "eager"
    model = InternVLForConditionalGeneration(config).eval()
    randomize_(model, seed)
    return model


def tiled_images(sizes: list[tuple[int, int]], seed: int) -> tuple[torch.Tensor, list[int]]:
    """Random RGB images of `sizes` cut as InternVL does: `[tiles, 3, 16, 16]` and tiles per image."""
    rng = np.random.default_rng(seed)
    tiles = []
    for width, height in sizes:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        tiles.append(preprocess_tiles(image, TILE, 4, "internvit", float_ratios=True)[0])
    return torch.cat(tiles), [t.shape[0] for t in tiles]


def internvl_batch(seed: int = 5) -> dict:
    """Two rows of SEQ tokens: text with each image's tiles x 4 image tokens; labels skip the images."""
    generator = torch.Generator().manual_seed(seed)
    rows, pixels, per_sample = [], [], []
    for number, sizes in enumerate(IMAGE_SIZES):
        values, tiles = tiled_images(sizes, seed + number)
        ids = [3 + number]
        for count in tiles:
            ids += [IMAGE_TOKEN] * (count * TOKENS_PER_TILE) + torch.randint(0, 100, (3,), generator=generator).tolist()
        ids += torch.randint(0, 100, (SEQ - len(ids),), generator=generator).tolist()
        rows.append(ids)
        pixels.append(values)
        per_sample.append(sum(tiles))
    input_ids = torch.tensor(rows)
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN, -100)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": torch.cat(pixels),
            "images_per_sample": torch.tensor(per_sample)}


@pytest.fixture(scope="module", params=TEXT_FAMILIES)
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    family = request.param
    root = tmp_path_factory.mktemp(f"internvl-{family}")
    hf = build_hf(family)
    directory = save_hf(hf, root / "hf", shard_size="100KB")
    summary = import_internvl_hf(directory, root / "imported", tp=2, pp=2)
    batch = internvl_batch()
    with torch.no_grad():
        hf_logits = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    return {"family": family, "root": root, "hf": hf, "hf_dir": directory, "save": root / "imported",
            "summary": summary, "batch": batch, "hf_logits": hf_logits}


def test_import_matches_transformers_logits(converted: dict) -> None:
    model = load_imported(converted["save"], ParallelState.single())
    vision = model.config.vision
    assert vision.family == "internvit" and vision.intern_vit.qk_norm == (converted["family"] == "qwen2")
    assert model.config.projector.type == "internvl_mlp" and model.config.projector.pixel_shuffle
    assert converted["batch"]["images_per_sample"].tolist() == [5, 3]  # 4 + 1 and 3 tiles
    error = (gathered_logits(model, converted["batch"]) - converted["hf_logits"]).abs().max().item()
    print(f"{converted['family']} tp=1: max |logits diff| {error:.3e}")
    assert error < LOGIT_TOLERANCE, f"max |megamm - transformers| logit difference {error:.2e}"


def test_import_then_export_is_bit_exact_and_loads(converted: dict) -> None:
    original = {}
    for shard in sorted(converted["hf_dir"].glob("*.safetensors")):
        original.update(load_file(shard))
    for style in ("legacy", "installed"):
        out = converted["root"] / f"exported-{style}"
        export_hf(converted["save"], out, architecture="internvl-hf", key_style=style)
        exported = {}
        for shard in sorted(out.glob("*.safetensors")):
            exported.update(load_file(shard))
        # save_pretrained wrote the published (legacy) spelling; either style names the same tensors.
        if style == "legacy":
            assert sorted(exported) == sorted(original)
        canonical = {ADAPTER.canonical_name(key): tensor for key, tensor in exported.items()}
        assert sorted(canonical) == sorted(ADAPTER.canonical_name(key) for key in original)
        for key, tensor in original.items():
            assert torch.equal(canonical[ADAPTER.canonical_name(key)], tensor), (style, key)
        reloaded = InternVLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
        batch = converted["batch"]
        with torch.no_grad():
            logits = reloaded(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        assert torch.equal(logits, converted["hf_logits"]), style


def test_greedy_generation_matches_transformers(converted: dict) -> None:
    """Two prompts of different lengths and tile counts, batched (left padding), with the KV cache;
    transformers' EOS (its generation config's) is megamm's stop token."""
    model = load_imported(converted["save"], ParallelState.single())
    hf, batch = converted["hf"], converted["batch"]
    first = batch["images_per_sample"][0].item()
    prompts = [Prompt(batch["input_ids"][0, :34].tolist(), batch["pixel_values"][:first]),
               Prompt(batch["input_ids"][1, :30].tolist(), batch["pixel_values"][first:])]
    eos = hf.generation_config.eos_token_id
    config = GenerationConfig(max_new_tokens=8, stop_token_ids=() if eos is None else (eos,))
    ours = [g.tokens for g in generate(model, prompts, config)]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt.input_ids])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt.pixel_values,
                              max_new_tokens=config.max_new_tokens, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
        tokens = out[0, ids.shape[1]:].tolist()
        expected.append(tokens[:-1] if tokens and tokens[-1] == eos else tokens)
    assert ours == expected, f"megamm {ours}, transformers {expected}"
    assert any(len(set(tokens)) > 1 for tokens in expected), f"degenerate continuations prove little: {expected}"


def _layout_job(saves: dict[str, str], batch: dict) -> dict:
    """Per family: tp=2 (sequence parallel) logits and the pp=2 loss of the imported checkpoint."""
    initialize_parallel_state()
    tp_state = ParallelState.from_groups(tp=2, pp=1, device=torch.device("cpu"))
    results = {}
    for family, save in saves.items():
        logits = gathered_logits(load_imported(Path(save), tp_state, sequence_parallel=True), batch)
        pp_state, chunks, _, _, _ = _session(save, 1, 2)
        hidden = chunks[0].config.language.transformer.hidden_size
        tokens = float((batch["labels"][:, 1:] != -100).sum())
        rows = [{k: v[i:i + 1] for k, v in batch.items() if k != "pixel_values"} for i in range(2)]
        first = batch["images_per_sample"][0].item()
        rows[0]["pixel_values"], rows[1]["pixel_values"] = batch["pixel_values"][:first], batch["pixel_values"][first:]
        schedule = PipelineSchedule(pp_state, (SEQ, 1, hidden), torch.float32)
        loss = schedule(chunks, rows, tokens, None, forward_only=True)
        dist.broadcast(loss, src=pp_state.pp_ranks[-1], group=pp_state.pp_group)
        results[family] = {"logits": logits, "pp_loss": loss.item() / tokens}
    return results


@pytest.mark.slow
def test_imported_checkpoints_match_transformers_at_tp2_and_pp2(tmp_path: Path) -> None:
    batch = internvl_batch()
    saves, references = {}, {}
    for family in TEXT_FAMILIES:
        hf = build_hf(family)
        import_internvl_hf(save_hf(hf, tmp_path / family / "hf"), tmp_path / family / "imported", tp=2, pp=2)
        saves[family] = str(tmp_path / family / "imported")
        with torch.no_grad():
            references[family] = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    per_rank = run_distributed(_layout_job, 2, saves, batch)
    for family, hf_logits in references.items():
        hf_loss = mean_loss(hf_logits, batch["labels"])
        for rank, results in enumerate(per_rank):
            result = results[family]
            error = (result["logits"] - hf_logits).abs().max().item()
            assert error < LOGIT_TOLERANCE, f"{family} tp=2 rank {rank}: logits off by {error:.2e}"
            loss_error = abs(result["pp_loss"] - hf_loss) / hf_loss
            print(f"{family} rank {rank}: tp=2+sp max |logits diff| {error:.3e}, pp=2 loss relative error "
                  f"{loss_error:.3e}")
            assert loss_error < 1e-5, f"{family} pp=2 rank {rank}: {result['pp_loss']} vs {hf_loss}"


def test_tool_imports_and_exports_internvl(converted: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """tools/convert_checkpoint.py: --internvl imports, --architecture internvl-hf exports, a mixed
    source is refused, and the LLaVA layout refuses the model."""
    hf_dir = str(converted["hf_dir"])
    assert convert_main(["import-hf", "--internvl", hf_dir, "--text", hf_dir, "--save", str(tmp_path / "c")]) == 2
    assert "give one source" in capsys.readouterr().err
    assert convert_main(["import-hf", "--internvl", hf_dir, "--save", str(tmp_path / "c")]) == 0
    assert convert_main(["export-hf", "--load", str(tmp_path / "c"), "--out", str(tmp_path / "out"),
                         "--architecture", "internvl-hf"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
    assert convert_main(["export-hf", "--load", str(tmp_path / "c"), "--out", str(tmp_path / "llava")]) == 2
    assert "cannot be written as LlavaForConditionalGeneration" in capsys.readouterr().err
