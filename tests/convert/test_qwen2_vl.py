"""Qwen2-VL and Qwen2.5-VL conversion: random tiny transformers models imported into megamm give
transformers' logits (fp32, 1e-4) on a batch with two images of different sizes and a video, at
tp=1 in this process and at tp=2 and pp=2 (loss) from the imported checkpoint loaded at that
layout; import then export is bit-exact and the export loads with `from_pretrained`.

megamm's positions come from megamm.data.mrope (tests.tiny.native_microbatches); transformers
computes its own from `mm_token_type_ids` and the grids, so the comparison also checks that both
place every token alike.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from megamm.checkpoint.model_weights import load_model_weights, read_run_config_tree
from megamm.config.parsing import run_config_from_dict
from megamm.convert.exporter import export_hf
from megamm.convert.importer import import_qwen2_vl_hf
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.pipeline.schedules import PipelineSchedule
from tests.convert.test_parity import _session
from tests.convert.test_roundtrip import convert_main, save_hf
from tests.distributed import run_distributed
from tests.tiny import (
    NATIVE_IMAGE_TOKEN,
    NATIVE_SEQ,
    NATIVE_VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    native_microbatches,
)

VOCAB = 100
LOGIT_TOLERANCE = 1e-4
FAMILIES = ("qwen2_vl", "qwen2_5_vl")
ARCHITECTURES = {"qwen2_vl": "qwen2-vl-hf", "qwen2_5_vl": "qwen2.5-vl-hf"}
MODEL_KEYS = ("input_ids", "pixel_values", "image_grid_thw", "images_per_sample", "pixel_values_videos",
              "video_grid_thw", "videos_per_sample", "position_ids", "labels")


def build_hf(family: str, seed: int = 3, scale: float = 0.15, vocab_size: int = VOCAB,
             token_ids: dict[str, int] | None = None, max_positions: int = 256) -> torch.nn.Module:
    """A random tiny model of `family` with the vision settings of tests.tiny.qwen2_vl_config
    (Qwen2-VL tied, Qwen2.5-VL untied embeddings); every weight drawn with std `scale`, norms and
    biases included. token_ids: the image / video / vision start / end token ids (default tests.tiny's);
    max_positions: the text model's max_position_embeddings."""
    text = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": max_positions,
            "rope_parameters": {"rope_type": "default", "rope_theta": 50.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": None, "eos_token_id": None}
    vision = {"depth": 2, "num_heads": 4, "patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2}
    ids = token_ids or {"image_token_id": NATIVE_IMAGE_TOKEN, "video_token_id": NATIVE_VIDEO_TOKEN,
                        "vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END}
    if family == "qwen2_vl":
        config = Qwen2VLConfig(text_config=text, vision_config={**vision, "embed_dim": 32, "hidden_size": 64,
                                                                "mlp_ratio": 2}, tie_word_embeddings=True, **ids)
        model = Qwen2VLForConditionalGeneration(config)
    else:
        config = Qwen2_5_VLConfig(text_config=text, vision_config={
            **vision, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "window_size": 16,
            "fullatt_block_indexes": [1], "tokens_per_second": 2}, tie_word_embeddings=False, **ids)
        model = Qwen2_5_VLForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model.eval()


def hf_inputs(batch: dict, family: str) -> dict:
    """The transformers inputs of a padded microbatch (it computes the positions itself)."""
    ids = batch["input_ids"]
    types = torch.zeros_like(ids, dtype=torch.int32)
    types[ids == NATIVE_IMAGE_TOKEN] = 1
    types[ids == NATIVE_VIDEO_TOKEN] = 2
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types,
           "pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"],
           "pixel_values_videos": batch["pixel_values_videos"], "video_grid_thw": batch["video_grid_thw"]}
    if family == "qwen2_5_vl":
        out["second_per_grid_ts"] = torch.tensor([1.0])  # the 4-frame video at fps 2: 2 frames per grid
    return out


def _load(save: Path, state: ParallelState, **stage) -> LlavaModel:
    _, tree = read_run_config_tree(save)
    model = LlavaModel(run_config_from_dict(tree).model, state, **stage)
    load_model_weights(model, save, state)
    return model.eval()


def _model_batch(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_KEYS}


@torch.no_grad()
def _logits(model: LlavaModel, batch: dict) -> torch.Tensor:
    """`[b, s, V]` logits, gathered over tp and stripped of vocabulary padding."""
    local = model(**_model_batch(batch), return_logits=True)["logits"].contiguous()
    if model.state.tp_size > 1:
        pieces = [torch.empty_like(local) for _ in range(model.state.tp_size)]
        dist.all_gather(pieces, local, group=model.state.tp_group)
        local = torch.cat(pieces, dim=-1)
    return local[..., :VOCAB].transpose(0, 1)


def _mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100).item()


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf = build_hf(family)
    directory = save_hf(hf, root / "hf", shard_size="200KB")
    summary = import_qwen2_vl_hf(directory, root / "imported", tp=2, pp=2)
    batch = native_microbatches(summary.config)[0]
    with torch.no_grad():
        hf_logits = hf(**hf_inputs(batch, family)).logits
    return {"family": family, "root": root, "hf": hf, "hf_dir": directory, "save": root / "imported",
            "summary": summary, "batch": batch, "hf_logits": hf_logits}


def test_import_matches_transformers_logits(converted: dict) -> None:
    model = _load(converted["save"], ParallelState.single())
    assert model.config.vision.family == converted["family"] and model.config.projector is None
    logits = _logits(model, converted["batch"])
    error = (logits - converted["hf_logits"]).abs().max().item()
    assert error < LOGIT_TOLERANCE, f"max |megamm - transformers| logit difference {error:.2e}"


def test_import_then_export_is_bit_exact_and_loads(converted: dict) -> None:
    out = converted["root"] / "exported"
    export_hf(converted["save"], out, architecture=ARCHITECTURES[converted["family"]])
    original = {}
    for shard in sorted(converted["hf_dir"].glob("*.safetensors")):
        original.update(load_file(shard))
    exported = {}
    for shard in sorted(out.glob("*.safetensors")):
        exported.update(load_file(shard))
    rename = {"model.visual.": "visual.", "model.language_model.": "model."}

    def legacy(key: str) -> str:
        for new, old in rename.items():
            if key.startswith(new):
                return old + key[len(new):]
        return key

    original = {legacy(k): v for k, v in original.items()}
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    cls = type(converted["hf"])
    reloaded = cls.from_pretrained(out).eval()
    with torch.no_grad():
        logits = reloaded(**hf_inputs(converted["batch"], converted["family"])).logits
    assert torch.equal(logits, converted["hf_logits"])


def _layout_job(save: str, batch: dict) -> dict:
    """tp=2 logits and the pp=2 loss of the imported checkpoint (2 processes)."""
    initialize_parallel_state()
    tp_state = ParallelState.from_groups(tp=2, pp=1, device=torch.device("cpu"))
    pp_state = ParallelState.from_groups(tp=1, pp=2, device=torch.device("cpu"))
    logits = _logits(_load(Path(save), tp_state), batch)
    # pp=2: the stages a training run builds, loaded by the Checkpointer (each its own layers).
    pp_state, chunks, _, _, _ = _session(save, 1, 2)
    hidden = chunks[0].config.language.transformer.hidden_size
    tokens = float((batch["labels"][:, 1:] != -100).sum())
    schedule = PipelineSchedule(pp_state, (NATIVE_SEQ, 1, hidden), torch.float32)
    loss = schedule(chunks, _rows(_model_batch(batch)), tokens, None, forward_only=True)
    dist.broadcast(loss, src=pp_state.pp_ranks[-1], group=pp_state.pp_group)
    return {"logits": logits, "pp_loss": loss.item() / tokens}


def _rows(batch: dict) -> list[dict]:
    """A microbatch per row, each with its own images and videos."""
    out, taken = [], {"image": (0, 0), "video": (0, 0)}
    for row in range(batch["input_ids"].shape[0]):
        item = {k: batch[k][row:row + 1] for k in ("input_ids", "labels")}
        item["position_ids"] = batch["position_ids"][:, row:row + 1]
        for kind, values, grids in (("image", "pixel_values", "image_grid_thw"),
                                    ("video", "pixel_values_videos", "video_grid_thw")):
            count = int(batch[f"{kind}s_per_sample"][row])
            first, patch = taken[kind]
            own = batch[grids][first:first + count]
            patches = int(own.prod(dim=1).sum())
            item[values] = batch[values][patch:patch + patches] if count else None
            item[grids] = own if count else None
            item[f"{kind}s_per_sample"] = torch.tensor([count])
            taken[kind] = (first + count, patch + patches)
        out.append(item)
    return out


@pytest.mark.slow
def test_imported_checkpoint_matches_transformers_at_tp2_and_pp2(converted: dict) -> None:
    per_rank = run_distributed(_layout_job, 2, str(converted["save"]), converted["batch"])
    hf_loss = _mean_loss(converted["hf_logits"], converted["batch"]["labels"])
    for rank, result in enumerate(per_rank):
        error = (result["logits"] - converted["hf_logits"]).abs().max().item()
        assert error < LOGIT_TOLERANCE, f"tp=2 rank {rank}: logits off by {error:.2e}"
        assert abs(result["pp_loss"] - hf_loss) / hf_loss < 1e-5, f"pp=2 rank {rank}: {result['pp_loss']} vs {hf_loss}"


def test_tool_imports_and_exports_qwen2_vl(converted: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """tools/convert_checkpoint.py: --qwen2-vl imports, --architecture exports, a mixed source is refused."""
    hf_dir = str(converted["hf_dir"])
    assert convert_main(["import-hf", "--qwen2-vl", hf_dir, "--text", hf_dir, "--save", str(tmp_path / "c")]) == 2
    assert "give one source" in capsys.readouterr().err
    assert convert_main(["import-hf", "--qwen2-vl", hf_dir, "--save", str(tmp_path / "c")]) == 0
    assert "train from it with --load" in capsys.readouterr().out
    architecture = ARCHITECTURES[converted["family"]]
    assert convert_main(["export-hf", "--load", str(tmp_path / "c"), "--out", str(tmp_path / "out"),
                         "--architecture", architecture]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
    assert convert_main(["export-hf", "--load", str(tmp_path / "c"), "--out", str(tmp_path / "llava")]) == 2
    assert "cannot be written as LlavaForConditionalGeneration" in capsys.readouterr().err
