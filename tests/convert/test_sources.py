"""The other import sources: separate CLIP + LLaMA directories (Hugging Face and Meta format),
separate SigLIP + Qwen2 directories, the original LLaVA layout, and a SigLIP tower with the "full"
feature strategy.

Each is checked against transformers (outputs on the same weights) or against the llava-hf import
of the same weights (tensor for tensor, exactly).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from megamm.config import ProjectorConfig
from megamm.config.parsing import run_config_from_dict
from megamm.convert import ConversionError
from megamm.convert.adapters.meta_llama import rotate_half_to_meta
from megamm.convert.exporter import export_hf
from megamm.convert.importer import import_llava_hf, import_original_llava, import_towers
from megamm.convert.writer import CheckpointReader
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState
from tests.convert.test_roundtrip import (
    IMAGE,
    IMAGE_TOKEN,
    VOCAB,
    build_hf_llava,
    llava_batch,
    randomize_,
    save_hf,
    text_config,
    text_kwargs,
    vision_kwargs,
)

ATOL = 1e-5
TEXT_VOCAB = 100


@torch.no_grad()
def load_single(save: Path, seed: int = 0) -> tuple[LlavaModel, CheckpointReader]:
    """A one-process LlavaModel with every parameter the checkpoint has (others from `seed`)."""
    reader = CheckpointReader(save)
    config = run_config_from_dict(reader.description["config"]).model
    model = LlavaModel(config, ParallelState.single()).eval()
    model.initialize(seed)
    for name, param in model.named_parameters():
        key = f"model/{name}"
        if key in reader.tensors:
            value = reader.read([key])[key]
            param[: value.shape[0]].copy_(value)  # rows past the vocabulary are padding
    return model, reader


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("towers")
    clip = CLIPModel(CLIPConfig(vision_config=vision_kwargs(),
                                text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "vocab_size": 50, "bos_token_id": 0,
                                             "eos_token_id": 1, "pad_token_id": 1},
                                projection_dim=16)).eval()
    randomize_(clip, seed=8)
    clip.save_pretrained(root / "clip")
    llama_config = LlamaConfig(**text_kwargs(TEXT_VOCAB))
    llama_config._attn_implementation = "eager"
    llama = LlamaForCausalLM(llama_config).eval()
    randomize_(llama, seed=9)
    llama.save_pretrained(root / "llama", max_shard_size="100KB")
    return {"root": root, "clip": clip, "llama": llama}


def test_clip_plus_llama_import_matches_transformers(towers: dict, tmp_path: Path) -> None:
    """The vision tower gives CLIP's hidden_states[-2] (class token dropped), the language model
    LLaMA's logits; image and pad tokens are appended as mean rows; the projector is left out."""
    summary = import_towers(towers["root"] / "clip", towers["root"] / "llama", tmp_path / "ckpt", tp=2, pp=2,
                            projector=ProjectorConfig(type="mlp2x_gelu"), image_token_id=None, pad_token_id=101,
                            vocab_multiple=8)
    assert summary.fresh_projector and summary.added_tokens == {"image": TEXT_VOCAB, "pad": 101}
    assert any(name.endswith("text_model.embeddings.token_embedding.weight") for name in summary.skipped)
    model, reader = load_single(tmp_path / "ckpt")
    assert model.config.language.vocab_size == 104 and model.config.language.image_token_id == TEXT_VOCAB
    assert not any(k.startswith("model/projector.") for k in reader.tensors)
    assert json.loads((reader.path / "megamm.json").read_text())["hf"]["pad_token_id"] == 101

    table = model.language.embedding.weight[:104]
    original = towers["llama"].model.embed_tokens.weight
    torch.testing.assert_close(table[:TEXT_VOCAB], original, rtol=0, atol=0)
    torch.testing.assert_close(table[TEXT_VOCAB:], original.mean(0, keepdim=True).expand(4, -1), rtol=1e-6, atol=1e-6)

    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = towers["clip"].vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(model.vision(pixels).transpose(0, 1), expected[:, 1:], rtol=ATOL, atol=ATOL)
        ids = torch.randint(0, TEXT_VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
        logits = model(input_ids=ids, return_logits=True)["logits"].transpose(0, 1)[..., :TEXT_VOCAB]
        torch.testing.assert_close(logits, towers["llama"](input_ids=ids).logits, rtol=ATOL, atol=ATOL)

    with pytest.raises(ConversionError, match="no projector"):
        export_hf(tmp_path / "ckpt", tmp_path / "out")


def test_siglip_plus_qwen2_import_matches_transformers(tmp_path: Path) -> None:
    """A SigLIP vision model directory and a Qwen2ForCausalLM directory (q/k/v biases, tied
    embeddings, rope base 1e6): the tower gives SigLIP's hidden_states[-2] (every token, "full"),
    the language model Qwen2's logits, and the checkpoint loads at tp=2 x pp=2. A Qwen2 config with
    sliding-window attention is refused."""
    siglip = SiglipVisionModel(SiglipVisionConfig(**{**vision_kwargs(), "hidden_act": "gelu_pytorch_tanh"})).eval()
    randomize_(siglip, seed=13)
    siglip.save_pretrained(tmp_path / "siglip")
    qwen_config = text_config("qwen2", TEXT_VOCAB)
    qwen_config._attn_implementation = "eager"
    qwen = Qwen2ForCausalLM(qwen_config).eval()
    randomize_(qwen, seed=14)
    qwen.save_pretrained(tmp_path / "qwen2")
    summary = import_towers(tmp_path / "siglip", tmp_path / "qwen2", tmp_path / "ckpt", tp=2, pp=2,
                            keep_class_token=True, vocab_multiple=8)
    assert summary.fresh_projector and summary.skipped == []
    model, reader = load_single(tmp_path / "ckpt")
    language = model.config.language
    assert language.family == "qwen2" and model.config.vision.family == "siglip" and language.tie_word_embeddings
    assert language.transformer.add_qkv_bias and not language.transformer.add_bias_linear
    assert "model/language.output_layer.weight" not in reader.tensors
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = siglip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(model.vision(pixels).transpose(0, 1), expected, rtol=ATOL, atol=ATOL)
        ids = torch.randint(0, TEXT_VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
        logits = model(input_ids=ids, return_logits=True)["logits"].transpose(0, 1)[..., :TEXT_VOCAB]
        torch.testing.assert_close(logits, qwen(input_ids=ids).logits, rtol=ATOL, atol=ATOL)

    tree = json.loads((tmp_path / "qwen2" / "config.json").read_text())
    tree.update(use_sliding_window=True, sliding_window=8, max_window_layers=2, layer_types=None)
    (tmp_path / "qwen2" / "config.json").write_text(json.dumps(tree))
    with pytest.raises(ConversionError, match=r"use_sliding_window \(sliding attention in layers \[2, 3\]\)"):
        import_towers(tmp_path / "siglip", tmp_path / "qwen2", tmp_path / "bad", keep_class_token=True)


def _write_meta(llama: LlamaForCausalLM, directory: Path, shards: int = 2) -> None:
    """The LLaMA as Meta-format weights: interleaved rotary rows, split over `shards` model-parallel files."""
    cfg = llama.config
    directory.mkdir()
    (directory / "params.json").write_text(json.dumps({
        "dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads, "norm_eps": cfg.rms_norm_eps, "rope_theta": 500.0,
        "vocab_size": cfg.vocab_size, "multiple_of": 32}))
    state = llama.state_dict()
    full: dict[str, tuple[torch.Tensor, int | None]] = {
        "tok_embeddings.weight": (state["model.embed_tokens.weight"], 1),
        "norm.weight": (state["model.norm.weight"], None),
        "output.weight": (state["lm_head.weight"], 0),
        "rope.freqs": (torch.ones(4), None),
    }
    for i in range(cfg.num_hidden_layers):
        src = f"model.layers.{i}."
        full.update({
            f"layers.{i}.attention.wq.weight": (rotate_half_to_meta(state[src + "self_attn.q_proj.weight"],
                                                                    cfg.num_attention_heads), 0),
            f"layers.{i}.attention.wk.weight": (rotate_half_to_meta(state[src + "self_attn.k_proj.weight"],
                                                                    cfg.num_key_value_heads), 0),
            f"layers.{i}.attention.wv.weight": (state[src + "self_attn.v_proj.weight"], 0),
            f"layers.{i}.attention.wo.weight": (state[src + "self_attn.o_proj.weight"], 1),
            f"layers.{i}.feed_forward.w1.weight": (state[src + "mlp.gate_proj.weight"], 0),
            f"layers.{i}.feed_forward.w3.weight": (state[src + "mlp.up_proj.weight"], 0),
            f"layers.{i}.feed_forward.w2.weight": (state[src + "mlp.down_proj.weight"], 1),
            f"layers.{i}.attention_norm.weight": (state[src + "input_layernorm.weight"], None),
            f"layers.{i}.ffn_norm.weight": (state[src + "post_attention_layernorm.weight"], None),
        })
    for shard in range(shards):
        piece = {k: (t if dim is None else t.chunk(shards, dim=dim)[shard]).clone() for k, (t, dim) in full.items()}
        torch.save(piece, directory / f"consolidated.{shard:02d}.pth")


def test_meta_llama_import_equals_hugging_face_import(towers: dict, tmp_path: Path) -> None:
    """Meta-format weights (rotary rows interleaved, split over two model-parallel files) give the
    same checkpoint tensors as the Hugging Face directory of the same model."""
    _write_meta(towers["llama"], tmp_path / "meta")
    common = {"image_token_id": None, "pad_token_id": None, "vocab_multiple": 8, "max_position_embeddings": 128}
    import_towers(towers["root"] / "clip", towers["root"] / "llama", tmp_path / "hf", **common)
    import_towers(towers["root"] / "clip", tmp_path / "meta", tmp_path / "meta-ckpt", **common)
    hf, meta = CheckpointReader(tmp_path / "hf"), CheckpointReader(tmp_path / "meta-ckpt")
    keys = sorted(k for k in hf.tensors if k.startswith("model/"))
    assert keys == sorted(k for k in meta.tensors if k.startswith("model/"))
    ours, theirs = hf.read(keys), meta.read(keys)
    for key in keys:
        assert torch.equal(ours[key], theirs[key]), key
    # The permutation is not the identity: without it the q rows would differ.
    q = towers["llama"].model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(rotate_half_to_meta(q, 8), q)


def test_original_llava_layout_equals_llava_hf(tmp_path: Path) -> None:
    """model.mm_projector.0/2 + model.* + a separate CLIP tower give the llava-hf import's tensors;
    the image token is appended after the text vocabulary."""
    hf = build_hf_llava(seed=6)
    save_hf(hf, tmp_path / "hf")
    import_llava_hf(tmp_path / "hf", tmp_path / "from-hf")
    hf.model.vision_tower.save_pretrained(tmp_path / "clip")
    original = tmp_path / "original"
    original.mkdir()
    state = hf.state_dict()
    renamed = {}
    for key, value in state.items():
        if key.startswith("model.language_model."):
            renamed["model." + key[len("model.language_model."):]] = value
        elif key.startswith("model.multi_modal_projector.linear_1."):
            renamed["model.mm_projector.0." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("model.multi_modal_projector.linear_2."):
            renamed["model.mm_projector.2." + key.rsplit(".", 1)[1]] = value
        elif key == "lm_head.weight":
            renamed[key] = value
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(original / "model.safetensors"))
    tree = {**text_kwargs(), "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
            "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
            "mm_hidden_size": 32, "mm_vision_tower": "clip", "mm_use_im_start_end": False}
    (original / "config.json").write_text(json.dumps(tree))
    summary = import_original_llava(original, tmp_path / "clip", tmp_path / "from-original", vocab_multiple=8)
    assert summary.added_tokens == {"image": VOCAB}
    a, b = CheckpointReader(tmp_path / "from-hf"), CheckpointReader(tmp_path / "from-original")
    keys = sorted(k for k in a.tensors if k.startswith("model/"))
    assert keys == sorted(k for k in b.tensors if k.startswith("model/"))
    for key in keys:
        x, y = a.read([key])[key], b.read([key])[key]
        if key in ("model/language.embedding.weight", "model/language.output_layer.weight"):
            assert y.shape[0] == 128 and torch.equal(x, y[:VOCAB]), key
        else:
            assert torch.equal(x, y), key
    description = b.description["config"]["model"]
    assert description["language"]["image_token_id"] == VOCAB and description["projector"]["type"] == "mlp2x_gelu"


def test_siglip_llava_with_full_strategy_matches_transformers(tmp_path: Path) -> None:
    """A SigLIP tower (no class token, patch bias, no pre-norm) with strategy 'full' and a pooling
    head kept aside; 'default' (which would drop a patch) is refused."""
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(**{**vision_kwargs(), "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}),
        text_config=LlamaConfig(**text_kwargs()), image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="full", image_seq_length=16,
    )
    config._attn_implementation = "eager"
    hf = LlavaForConditionalGeneration(config).eval()
    randomize_(hf, seed=12)
    save_hf(hf, tmp_path / "hf")
    summary = import_llava_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert any(name.startswith("vision.head.") for name in summary.kept_aside)
    model, _ = load_single(tmp_path / "ckpt")
    assert not model.config.vision.class_token and model.config.vision.patch_bias
    batch = llava_batch(seq=36)
    with torch.no_grad():
        expected = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], return_logits=True)
    torch.testing.assert_close(out["logits"].transpose(0, 1)[..., :VOCAB], expected, rtol=1e-4, atol=1e-4)
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name

    tree = json.loads((tmp_path / "hf" / "config.json").read_text())
    tree["vision_feature_select_strategy"] = "default"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(tree))
    with pytest.raises(ConversionError, match="siglip tower has no class token"):
        import_llava_hf(tmp_path / "hf", tmp_path / "bad")


def test_converted_towers_start_stage_one_training(towers: dict, tmp_path: Path) -> None:
    """megamm.train loads the towers' checkpoint (no projector, which starts from --seed) at step 0
    and trains the projector alone: the LLaVA stage-1 start, through the real entry point."""
    import_towers(towers["root"] / "clip", towers["root"] / "llama", tmp_path / "ckpt",
                  projector=ProjectorConfig(type="mlp2x_gelu"), image_token_id=None, pad_token_id=None,
                  vocab_multiple=8)
    model = CheckpointReader(tmp_path / "ckpt").description["config"]["model"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": model}))
    result = subprocess.run(
        [sys.executable, "-m", "megamm.train", "--config", str(tmp_path / "run.yaml"), "--load", str(tmp_path / "ckpt"),
         "--finetune", "--freeze-LM", "--freeze-ViT", "--mock-data", "--train-iters", "2", "--seq-length", "40",
         "--global-batch-size", "2", "--micro-batch-size", "1", "--log-interval", "1", "--lr", "1.0e-3"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "has no projector" in result.stdout and "iteration        2/2" in result.stdout, result.stdout
