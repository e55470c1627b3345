"""import-hf -> export-hf gives back the Hugging Face tensors bit for bit; bad inputs give clear errors.

Also holds the small random-weight Hugging Face models the other conversion tests build (no
downloads): a LLaVA with a CLIP tower, GQA, vision feature layer -2 and an mlp2x_gelu projector,
whose language model is a LLaMA or a Qwen2 (q/k/v biases, rope base 1e6, tied embeddings).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
)

from megamm.config.registry import HF_ARCHITECTURES
from megamm.convert import ConversionError
from megamm.convert.exporter import export_hf
from megamm.convert.importer import import_llava_hf
from megamm.convert.readers import WeightFiles
from megamm.convert.writer import CheckpointReader

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_main = _load_tool().main

VOCAB = 120
IMAGE_TOKEN = 112
PAD_TOKEN = 113
IMAGE, PATCH = 16, 4
TOKENS_PER_IMAGE = (IMAGE // PATCH) ** 2  # 16; the class token is dropped ("default")


def vision_kwargs() -> dict:
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "image_size": IMAGE, "patch_size": PATCH, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "projection_dim": 16}


def text_kwargs(vocab: int = VOCAB) -> dict:
    return {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
            "num_attention_heads": 8, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": 128,
            "rope_theta": 500.0, "tie_word_embeddings": False,
            "pad_token_id": PAD_TOKEN if vocab > PAD_TOKEN else None}


# The language-model families the conversion tests run over.
TEXT_FAMILIES = ("llama", "qwen2")


def text_config(family: str = "llama", vocab: int = VOCAB) -> LlamaConfig | Qwen2Config:
    """A small causal LM config of `family`: LLaMA (untied) or Qwen2 (tied, rope base 1e6)."""
    if family == "qwen2":
        return Qwen2Config(**{**text_kwargs(vocab), "rope_theta": 1e6, "tie_word_embeddings": True})
    return LlamaConfig(**text_kwargs(vocab))


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norms around 1), so a mis-mapped tensor changes the output."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if re.search(r"(norm|layrnorm|layer_norm\d?)\.weight$", name):
            param.copy_(1.0 + 0.2 * noise)
        elif param.dim() >= 2:
            param.copy_(noise * param[0].numel() ** -0.5)
        else:
            param.copy_(0.2 * noise)


def build_hf_llava(seed: int = 1, text: str = "llama") -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision_kwargs()), text_config=text_config(text),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=TOKENS_PER_IMAGE,
    )
    config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(config).eval()
    randomize_(model, seed)
    return model


def save_hf(model: torch.nn.Module, directory: Path, shard_size: str = "60KB") -> Path:
    """save_pretrained in safetensors, sharded (so the index path is exercised)."""
    model.save_pretrained(directory, max_shard_size=shard_size)
    return directory


def llava_batch(seed: int = 5, batch: int = 2, seq: int = 40) -> dict[str, torch.Tensor]:
    """Text ids with one image (16 image tokens) per sample, labels with an ignored prefix."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, IMAGE_TOKEN, (batch, seq), generator=generator)
    for sample in range(batch):
        start = 3 + 5 * sample
        input_ids[sample, start:start + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN, -100)
    labels[:, :2] = -100
    pixel_values = torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values,
            "images_per_sample": torch.ones(batch, dtype=torch.long)}


def hf_state(directory: Path) -> dict[str, torch.Tensor]:
    files = WeightFiles(directory)
    return {name: files.get(name) for name in files.names}


def legacy_key(key: str) -> str:
    """transformers >= 4.52 (and 5's unprefixed CLIP) key -> the pre-4.52 llava-hf spelling."""
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    for new, old in (("model.language_model.", "language_model.model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if key.startswith(new):
            return old + key[len(new):]
    rest = key.removeprefix("model.vision_tower.").removeprefix("vision_model.")
    return "vision_tower.vision_model." + rest


# ---- round trip ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXT_FAMILIES)
def test_import_export_round_trip_is_bit_exact(tmp_path: Path, text: str) -> None:
    """Every tensor of the original directory comes back with the same name, dtype and bits; the
    checkpoint is an ordinary megamm checkpoint at iteration 0 with no optimizer state."""
    model = build_hf_llava(text=text)
    model.to(torch.bfloat16)  # a non-fp32 dtype must survive too
    source = save_hf(model, tmp_path / "hf")
    assert (source / "model.safetensors.index.json").is_file()
    summary = import_llava_hf(source, tmp_path / "ckpt", tp=2, pp=2)
    assert summary.kept_aside == ["vision.post_layernorm.bias", "vision.post_layernorm.weight"]
    reader = CheckpointReader(tmp_path / "ckpt")
    assert reader.path.name == "iter_0000000" and (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000000"
    assert reader.description["optimizer"] == "none"
    assert reader.read(["train/iteration"])["train/iteration"].item() == 0
    assert not any(k.startswith("optim/") for k in reader.tensors)
    qkv = reader.read(["model/language.decoder.layers.0.self_attention.qkv.weight"])
    expected = torch.cat([model.state_dict()[f"model.language_model.layers.0.self_attn.{p}_proj.weight"]
                          for p in "qkv"])
    assert torch.equal(next(iter(qkv.values())), expected)

    export_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_bytes=50_000, key_style="installed")
    # Names compared in canonical form: transformers 5 saves its own mix of spellings.
    canonical_name = HF_ARCHITECTURES.get("llava-hf").canonical_name
    original = {canonical_name(k): v for k, v in hf_state(source).items()}
    exported = {canonical_name(k): v for k, v in hf_state(tmp_path / "out").items()}
    assert set(exported) == set(original) and len(original) == len(hf_state(source))
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype == torch.bfloat16, name
        assert torch.equal(exported[name], tensor), name
    # The in-memory spelling of transformers >= 4.52 (model.language_model.*) imports back identically.
    assert any(k.startswith("model.language_model.") for k in hf_state(tmp_path / "out"))
    import_llava_hf(tmp_path / "out", tmp_path / "again")
    again = CheckpointReader(tmp_path / "again")
    keys = [k for k in reader.tensors if k.startswith(("model/", "hf_extra/"))]
    assert sorted(keys) == sorted(k for k in again.tensors if k.startswith(("model/", "hf_extra/")))
    first, second = reader.read(keys), again.read(keys)
    assert all(torch.equal(first[k], second[k]) for k in keys)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["pad_token_id"] == PAD_TOKEN and config["text_config"]["model_type"] == text
    assert config["text_config"]["num_key_value_heads"] == 4 and config["vision_feature_layer"] == -2
    assert reader.description["config"]["model"]["language"]["family"] == text
    if text == "qwen2":  # the q/k/v biases, fused like the weights; tied, so no output layer
        bias = reader.read(["model/language.decoder.layers.0.self_attention.qkv.bias"])
        expected = torch.cat([model.state_dict()[f"model.language_model.layers.0.self_attn.{p}_proj.bias"]
                              for p in "qkv"])
        assert torch.equal(next(iter(bias.values())), expected)
        assert "model/language.output_layer.weight" not in reader.tensors
        assert config["tie_word_embeddings"] and config["text_config"]["rope_parameters"]["rope_theta"] == 1e6


def test_legacy_keys_and_bin_files_round_trip(tmp_path: Path) -> None:
    """The pre-4.52 spelling (language_model.model.*, vision_tower.vision_model.*) in a .bin file
    imports to the same checkpoint, and --legacy-keys exports that spelling back bit for bit."""
    model = build_hf_llava(seed=2)
    current = save_hf(model, tmp_path / "current")
    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    shutil.copy(current / "config.json", legacy_dir / "config.json")
    legacy = {legacy_key(k): v.clone() for k, v in model.state_dict().items()}
    torch.save(legacy, legacy_dir / "pytorch_model.bin")
    import_llava_hf(current, tmp_path / "a")
    import_llava_hf(legacy_dir, tmp_path / "b")
    a, b = CheckpointReader(tmp_path / "a"), CheckpointReader(tmp_path / "b")
    assert set(a.tensors) == set(b.tensors)
    keys = [k for k in a.tensors if k.startswith(("model/", "hf_extra/"))]
    for key, tensor in a.read(keys).items():
        assert torch.equal(tensor, b.read([key])[key]), key
    # --dtype: stored converted (here bf16), then exported in fp32 by request.
    import_llava_hf(legacy_dir, tmp_path / "c", dtype="bf16")
    c = CheckpointReader(tmp_path / "c")
    key = "model/language.embedding.weight"
    assert c.dtype(key) == torch.bfloat16 and torch.equal(c.read([key])[key], a.read([key])[key].bfloat16())
    export_hf(tmp_path / "c", tmp_path / "out-fp32", dtype="fp32")
    assert all(t.dtype == torch.float32 for t in hf_state(tmp_path / "out-fp32").values())
    export_hf(tmp_path / "b", tmp_path / "out", key_style="legacy")
    exported = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))
    assert set(exported) == set(legacy)
    assert all(torch.equal(exported[k], legacy[k]) for k in legacy)


# ---- errors ----------------------------------------------------------------------------------------


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _write_config(directory: Path, tree: dict) -> None:
    (directory / "config.json").write_text(json.dumps(tree))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf(build_hf_llava(seed=3), tmp_path_factory.mktemp("hf"))


def _copy(hf_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "src"
    shutil.copytree(hf_dir, target)
    return target


def test_unsupported_architectures_are_named(hf_dir: Path, tmp_path: Path) -> None:
    source = _copy(hf_dir, tmp_path)
    tree = _config(source)
    tree["text_config"]["model_type"] = "gpt2"
    _write_config(source, tree)
    with pytest.raises(ConversionError, match="unsupported language architecture 'gpt2'"):
        import_llava_hf(source, tmp_path / "c1")
    tree["text_config"]["model_type"] = "llama"
    tree["vision_config"]["model_type"] = "vit"
    _write_config(source, tree)
    with pytest.raises(ConversionError, match="unsupported vision architecture 'vit'"):
        import_llava_hf(source, tmp_path / "c2")
    tree = _config(hf_dir)
    tree["model_type"] = "mllama"
    _write_config(source, tree)
    with pytest.raises(ConversionError, match="'mllama' is not one of llava, llava_next, llava_onevision"):
        import_llava_hf(source, tmp_path / "c3")
    tree = _config(hf_dir)
    tree["vision_feature_layer"] = [-2, -5]
    tree["text_config"]["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    _write_config(source, tree)
    with pytest.raises(ConversionError, match="concatenation of several layers"):
        import_llava_hf(source, tmp_path / "c4")
    assert not (tmp_path / "c1").exists() or not any((tmp_path / "c1").glob("iter_*"))


def test_missing_files_are_named(hf_dir: Path, tmp_path: Path) -> None:
    source = _copy(hf_dir, tmp_path)
    (source / "config.json").unlink()
    with pytest.raises(ConversionError, match=r"config\.json: missing"):
        import_llava_hf(source, tmp_path / "c")
    source = _copy(hf_dir, tmp_path / "x")
    shard = min(source.glob("model-*.safetensors"))
    shard.unlink()
    with pytest.raises(ConversionError, match=f"shard files that do not exist: {shard.name}"):
        import_llava_hf(source, tmp_path / "c")
    with pytest.raises(ConversionError, match=r"nowhere/config\.json: missing"):
        import_llava_hf(tmp_path / "nowhere", tmp_path / "c")
    # A tensor missing from the weights (not a whole file).
    source = _copy(hf_dir, tmp_path / "y")
    for path in source.glob("model-*.safetensors"):
        tensors = load_file(str(path))
        tensors.pop("language_model.model.layers.1.mlp.up_proj.weight", None)
        save_file(tensors, str(path), metadata={"format": "pt"})
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("language_model.model.layers.1.mlp.up_proj.weight")
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"mlp\.fc1\.weight: missing text\.layers\.1\.mlp\.up_proj\.weight"):
        import_llava_hf(source, tmp_path / "c")


def test_mismatched_vocab_is_refused(hf_dir: Path, tmp_path: Path) -> None:
    source = _copy(hf_dir, tmp_path)
    tree = _config(source)
    tree["text_config"]["vocab_size"] = VOCAB + 8  # the tables still have VOCAB rows
    _write_config(source, tree)
    with pytest.raises(ConversionError, match=r"language\.embedding\.weight: expected \[128, 64\].*mismatched vocab"):
        import_llava_hf(source, tmp_path / "c1")
    tree["text_config"]["vocab_size"] = VOCAB
    tree["image_token_index"] = VOCAB + 3
    _write_config(source, tree)
    with pytest.raises(ConversionError, match=r"image_token_index 123 is outside the text vocabulary of 120"):
        import_llava_hf(source, tmp_path / "c2")


def test_layout_and_flag_errors(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A layout the model cannot take, and flags that do not apply, fail before anything is written."""
    with pytest.raises(ConversionError, match="num_query_groups 4 not divisible by tensor-model-parallel size 8"):
        import_llava_hf(hf_dir, tmp_path / "c", tp=8)
    assert convert_main(["import-hf", "--llava", str(hf_dir), "--save", str(tmp_path / "c"),
                         "--image-token-id", "5"]) == 2
    assert "--image-token-id do not apply to this source" in capsys.readouterr().err
    assert convert_main(["import-hf", "--llava", str(hf_dir), "--text", str(hf_dir), "--save", str(tmp_path / "c")]) == 2
    assert "give one source" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert convert_main(["import-hf", "--llava", str(hf_dir), "--save", str(tmp_path / "ok"),
                         "--pipeline-model-parallel-size", "2"]) == 0
    assert "train from it with --load" in capsys.readouterr().out
    assert convert_main(["import-hf", "--llava", str(hf_dir), "--save", str(tmp_path / "ok")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert_main(["export-hf", "--load", str(tmp_path / "ok"), "--out", str(hf_dir)]) == 2
    assert "not empty" in capsys.readouterr().err
