"""LLaVA-NeXT conversion: a random tiny transformers `LlavaNextForConditionalGeneration` (CLIP tower,
LLaMA text model) imported into megamm gives transformers' logits (fp32, 1e-4) on a batch whose
images have different aspect ratios (a wide one, a tall one, a square one; two in one sample), at
tp=1 here and at tp=2 (sequence parallel) and pp=2 from the imported checkpoint loaded at that layout;
import then export is bit-exact, the export loads with `from_pretrained`, and greedy generation gives
transformers' `generate` tokens.

The images go through megamm's own preprocessing (megamm.data.anyres_images, tested against
transformers' processor in tests/data/test_anyres_images.py) and megamm's token count
(megamm.config.anyres); transformers lays out the same tiles from `image_sizes` itself and raises
if its feature count disagrees with the placeholders.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MistralConfig,
)

from megamm.checkpoint import format
from megamm.checkpoint.checkpointer import Checkpointer
from megamm.config import LlavaConfig
from megamm.config.anyres import image_tokens, tiles_per_image
from megamm.config.parsing import run_config_from_dict
from megamm.config.resolved import resolve
from megamm.convert import ConversionError
from megamm.convert.exporter import export_hf
from megamm.convert.importer import import_llava_hf
from megamm.data.anyres_images import preprocess_anyres
from megamm.inference.generation import GenerationConfig, Prompt, generate
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.pipeline.chunks import build_model_chunks
from megamm.pipeline.schedules import PipelineSchedule
from megamm.training.data import stage_keys
from tests.convert.test_roundtrip import (
    IMAGE,
    IMAGE_TOKEN,
    PATCH,
    randomize_,
    save_hf,
    text_kwargs,
    vision_kwargs,
)
from tests.convert.tiled import MODEL_INPUTS, gathered_logits, load_imported, mean_loss, random_image
from tests.distributed import run_distributed

LOGIT_TOLERANCE = 1e-4
PINPOINTS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]
# (height, width) of each sample's images: wide; tall and square.
IMAGE_SIZES = [[(20, 50)], [(50, 20), (33, 33)]]
SEQ = 176


def build_hf(seed: int = 1, strategy: str = "default", text: str = "llama") -> LlavaNextForConditionalGeneration:
    """A random tiny LLaVA-NeXT: CLIP tower, LLaMA (or Mistral, LLaVA-1.6-Mistral's text model) decoder."""
    text_kwargs_ = {**text_kwargs(), "max_position_embeddings": 256}
    text_config = MistralConfig(**text_kwargs_, sliding_window=None) if text == "mistral" else LlamaConfig(**text_kwargs_)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision_kwargs()),
        text_config=text_config,
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu", image_grid_pinpoints=PINPOINTS,
    )
    config._attn_implementation = "eager"
    model = LlavaNextForConditionalGeneration(config).eval()
    randomize_(model, seed)
    return model


def sample_inputs(sizes: list[tuple[int, int]], seed: int) -> dict:
    """One sample's preprocessed images: tiles `[t, 3, 16, 16]`, sizes `[n, 2]`, image-token counts."""
    tiles, shapes = zip(*(preprocess_anyres(random_image(h, w, seed + i), IMAGE, [tuple(p) for p in PINPOINTS], "clip")
                          for i, (h, w) in enumerate(sizes)))
    tokens = [image_tokens(size, [tuple(p) for p in PINPOINTS], IMAGE, IMAGE // PATCH) for size in shapes]
    return {"pixel_values": torch.cat(tiles), "image_sizes": torch.tensor(shapes), "tokens": tokens}


def make_batch(seed: int = 5) -> dict:
    """Two samples of SEQ tokens: text, each image's run of image tokens, text; labels with an
    ignored prefix and the image positions ignored."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, IMAGE_TOKEN, (len(IMAGE_SIZES), SEQ), generator=generator)
    pixels, sizes, per_sample = [], [], []
    for row, row_sizes in enumerate(IMAGE_SIZES):
        images = sample_inputs(row_sizes, seed + 10 * row)
        start = 3
        for count in images["tokens"]:
            ids[row, start:start + count] = IMAGE_TOKEN
            start += count + 2
        pixels.append(images["pixel_values"])
        sizes.append(images["image_sizes"])
        per_sample.append(len(row_sizes))
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.cat(pixels), "image_sizes": torch.cat(sizes),
            "images_per_sample": torch.tensor(per_sample)}


def hf_inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"]),
            "pixel_values": batch["pixel_values"], "image_sizes": batch["image_sizes"]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("llava_next")
    hf = build_hf()
    directory = save_hf(hf, root / "hf", shard_size="200KB")
    summary = import_llava_hf(directory, root / "imported", tp=2, pp=2)
    batch = make_batch()
    with torch.no_grad():
        hf_logits = hf(**hf_inputs(batch)).logits
    return {"root": root, "hf": hf, "hf_dir": directory, "save": root / "imported", "summary": summary,
            "batch": batch, "hf_logits": hf_logits}


def test_import_matches_transformers_logits(converted: dict) -> None:
    model = load_imported(converted["save"], ParallelState.single())
    assert model.config.anyres is not None and model.config.anyres.pinpoints == [tuple(p) for p in PINPOINTS]
    logits = gathered_logits(model, converted["batch"])
    error = (logits - converted["hf_logits"]).abs().max().item()
    assert error < LOGIT_TOLERANCE, f"max |megamm - transformers| logit difference {error:.2e}"


def test_mistral_text_model_matches_transformers(tmp_path: Path) -> None:
    hf = build_hf(seed=4, text="mistral")
    import_llava_hf(save_hf(hf, tmp_path / "hf"), tmp_path / "imported")
    model = load_imported(tmp_path / "imported", ParallelState.single())
    assert model.config.language.family == "mistral"
    batch = make_batch(seed=6)
    with torch.no_grad():
        expected = hf(**hf_inputs(batch)).logits
    error = (gathered_logits(model, batch) - expected).abs().max().item()
    assert error < LOGIT_TOLERANCE, f"max |megamm - transformers| logit difference {error:.2e}"


def test_token_check_names_the_sample(converted: dict) -> None:
    model = load_imported(converted["save"], ParallelState.single())
    batch = {k: v for k, v in converted["batch"].items() if k in MODEL_INPUTS}
    short = batch["input_ids"].clone()
    short[1, 3] = 7  # one image token of sample 1 fewer
    with pytest.raises(ValueError, match="sample 1: 153 image-token positions, but its 2 image"):
        model(**{**batch, "input_ids": short})
    with pytest.raises(ValueError, match="give 13 \\(base image \\+ tiles each: \\[4, 4, 5\\]\\)"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:-1]})
    with pytest.raises(ValueError, match="pixel_values given without image_sizes"):
        model(**{**batch, "image_sizes": None})


def test_import_then_export_is_bit_exact_and_loads(converted: dict) -> None:
    out = converted["root"] / "exported"
    export_hf(converted["save"], out, architecture="llava-next-hf")
    original, exported = {}, {}
    for shard in sorted(converted["hf_dir"].glob("*.safetensors")):
        original.update(load_file(shard))
    for shard in sorted(out.glob("*.safetensors")):
        exported.update(load_file(shard))
    rename = {"model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector.",
              "model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
              "model.image_newline": "image_newline"}

    def legacy(key: str) -> str:
        for new, old in rename.items():
            if key.startswith(new):
                key = old + key[len(new):]
                break
        return key.replace("vision_tower.", "vision_tower.vision_model.", 1) if key.startswith("vision_tower.") \
            and not key.startswith("vision_tower.vision_model.") else key

    original = {legacy(k): v for k, v in original.items()}
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = reloaded(**hf_inputs(converted["batch"])).logits
    assert torch.equal(logits, converted["hf_logits"])
    with pytest.raises(ConversionError, match="no any-resolution tiling; export as llava-next-hf"):
        export_hf(converted["save"], converted["root"] / "as_llava", architecture="llava-hf")


def test_greedy_generation_matches_transformers(converted: dict) -> None:
    model = load_imported(converted["save"], ParallelState.single())
    images = sample_inputs([(50, 20), (33, 33)], 40)
    generator = torch.Generator().manual_seed(9)
    ids = [int(t) for t in torch.randint(0, IMAGE_TOKEN, (4,), generator=generator)]
    for count in images["tokens"]:
        ids += [IMAGE_TOKEN] * count + [int(torch.randint(0, IMAGE_TOKEN, (1,), generator=generator))]
    prompt = Prompt(ids, pixel_values=images["pixel_values"], image_sizes=images["image_sizes"])
    ours = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0].tokens
    with torch.no_grad():
        theirs = converted["hf"].generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pixel_values=images["pixel_values"], image_sizes=images["image_sizes"], max_new_tokens=8,
            do_sample=False, eos_token_id=None, pad_token_id=0,
            suppress_tokens=[IMAGE_TOKEN])[0, len(ids):].tolist()
    assert ours == theirs


def test_full_strategy_with_a_class_token_is_refused(tmp_path: Path) -> None:
    directory = save_hf(build_hf(strategy="full"), tmp_path / "hf")
    with pytest.raises(ConversionError, match="class token must be dropped"):
        import_llava_hf(directory, tmp_path / "out")


def _split_rows(batch: dict, config: LlavaConfig) -> list[dict]:
    """A microbatch per row, each with its own images (tiles counted by megamm.config.anyres) and
    LLaVA-OneVision videos (`[videos, frames, C, H, W]`, counted by videos_per_sample); None where a
    row has none, as the batching gives them."""
    out, image, tile, video = [], 0, 0, 0
    pinpoints, side = config.anyres.pinpoints, config.vision.image_size
    for row in range(batch["input_ids"].shape[0]):
        count = int(batch["images_per_sample"][row])
        sizes = batch["image_sizes"][image:image + count]
        tiles = sum(tiles_per_image(tuple(size), pinpoints, side) for size in sizes.tolist())
        item = {k: batch[k][row:row + 1] for k in ("input_ids", "labels")}
        item.update(pixel_values=batch["pixel_values"][tile:tile + tiles] if tiles else None,
                    image_sizes=sizes if count else None, images_per_sample=torch.tensor([count]))
        if "pixel_values_videos" in batch:
            videos = int(batch["videos_per_sample"][row])
            item.update(pixel_values_videos=batch["pixel_values_videos"][video:video + videos] if videos else None,
                        videos_per_sample=torch.tensor([videos]))
            video += videos
        out.append(item)
        image, tile = image + count, tile + tiles
    return out


def _pipeline_stages(save: str) -> tuple[ParallelState, list[LlavaModel]]:
    """This rank's pp=2 stage of `save`, built and loaded as a training run does (build_model_chunks,
    Checkpointer.load). The run names existing files (the checkpoint's own) as its data; nothing is
    read from them."""
    description = format.read_description(format.resolve(save))
    tree = dict(description["config"])
    tree["parallel"] = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2}
    existing = str(format.resolve(save) / format.DESCRIPTION)
    tree["training"] = {"micro_batch_size": 1, "global_batch_size": 2, "seq_length": 40, "data_path": [existing],
                        "tokenizer_model": existing, "train_iters": 1, "seed": 11}
    config = resolve(run_config_from_dict(tree, world_size=2), 2)
    state = ParallelState.from_groups(tp=1, pp=2, device=torch.device("cpu"))
    chunks = build_model_chunks(config, state)
    Checkpointer(state, config, chunks, None, None, log=lambda _: None).load(save, load_optim=False)
    return state, chunks


def _layout_job(save: str, batches: list[dict]) -> list[dict]:
    """tp=2 (sequence parallel) logits and the pp=2 loss of the imported checkpoint on each batch (2
    processes; the models are loaded once); the LLaVA-OneVision test runs it too. Each pipeline stage
    gets the keys a training run's stage keeps (`stage_keys`)."""
    initialize_parallel_state()
    tp_state = ParallelState.from_groups(tp=2, pp=1, device=torch.device("cpu"))
    tp_model = load_imported(Path(save), tp_state, sequence_parallel=True)
    pp_state, chunks = _pipeline_stages(save)
    hidden = chunks[0].config.language.transformer.hidden_size
    keys = stage_keys(pp_state, packed=False)
    results = []
    for batch in batches:
        tokens = float((batch["labels"][:, 1:] != -100).sum())
        microbatches = [{k: row[k] for k in keys if k in row} for row in _split_rows(batch, chunks[0].config)]
        schedule = PipelineSchedule(pp_state, (batch["input_ids"].shape[1], 1, hidden), torch.float32)
        loss = schedule(chunks, microbatches, tokens, None, forward_only=True)
        dist.broadcast(loss, src=pp_state.pp_ranks[-1], group=pp_state.pp_group)
        results.append({"logits": gathered_logits(tp_model, batch), "pp_loss": loss.item() / tokens})
    return results


def check_layouts(save: Path, *cases: tuple[dict, torch.Tensor]) -> None:
    """tp=2 logits and the pp=2 loss of `save` equal transformers' on each (batch, transformers'
    logits) case (one spawned run of 2 processes for all)."""
    per_rank = run_distributed(_layout_job, 2, str(save), [batch for batch, _ in cases])
    for number, (batch, hf_logits) in enumerate(cases):
        hf_loss = mean_loss(hf_logits, batch["labels"])
        for rank, results in enumerate(per_rank):
            result = results[number]
            error = (result["logits"] - hf_logits).abs().max().item()
            assert error < LOGIT_TOLERANCE, f"batch {number}, tp=2 rank {rank}: logits off by {error:.2e}"
            assert abs(result["pp_loss"] - hf_loss) / hf_loss < 1e-5, \
                f"batch {number}, pp=2 rank {rank}: loss {result['pp_loss']} vs transformers' {hf_loss}"


@pytest.mark.slow
def test_imported_checkpoint_matches_transformers_at_tp2_and_pp2(converted: dict) -> None:
    check_layouts(converted["save"], (converted["batch"], converted["hf_logits"]))
