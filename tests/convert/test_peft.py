"""LoRA / DoRA adapters exchanged with Hugging Face PEFT, and merged into their base.

From a Hugging Face LLaVA imported as the base: adapters on the decoder (q/v/o/gate/down: some
fused parts left out), the projector and the vision tower, with random B (and DoRA magnitudes), saved
as a LoRA checkpoint. Then:

- export-peft: `PeftModel.from_pretrained` on the base's Hugging Face export loads the directory
  and gives megamm's logits (1e-4, fp32);
- import-peft of that directory gives back the same adapter tensors, bit for bit;
- merge: the merged plain checkpoint computes the adapted model's logits, and its Hugging Face
  export (the existing exporter) gives them too.

The Qwen2-VL family likewise (Qwen2-VL with LoRA and DoRA, Qwen2.5-VL with LoRA; images of two
sizes and a video): adapters on the decoder, every linear of the tower's layers (qkv one module in
Hugging Face's form) and the patch merger, exported for `Qwen2VLForConditionalGeneration` (
`Qwen2_5_VLForConditionalGeneration`), loaded by PEFT with megamm's logits; and an adapter that peft
itself creates on that model (its own init, random B) imports, and the merged import gives PEFT's logits.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from megamm.checkpoint import format
from megamm.checkpoint.adapters import load_pretrained
from megamm.checkpoint.checkpointer import Checkpointer
from megamm.checkpoint.model_weights import load_model_weights
from megamm.config.parsing import run_config_from_dict
from megamm.config.resolved import resolve
from megamm.convert import ConversionError
from megamm.convert.exporter import export_hf
from megamm.convert.importer import import_internvl_hf, import_llava_hf, import_qwen2_vl_hf
from megamm.convert.lora_merge import merge_adapters
from megamm.convert.peft import ADAPTER_CONFIG, export_peft, import_peft
from megamm.convert.writer import CheckpointReader
from megamm.models.llava import LlavaModel
from megamm.models.lora import apply_lora, reset_magnitudes
from megamm.parallel.state import ParallelState
from tests.convert import test_internvl as internvl
from tests.convert import test_llava_next as llava_next
from tests.convert.test_qwen2_vl import ARCHITECTURES, MODEL_KEYS, build_hf, hf_inputs
from tests.convert.test_qwen2_vl import VOCAB as QWEN_VOCAB
from tests.convert.test_roundtrip import VOCAB, build_hf_llava, llava_batch, save_hf
from tests.convert.tiled import gathered_logits
from tests.tiny import native_microbatches

LOGIT_ATOL = 1e-4
TARGETS = "q_proj,v_proj,o_proj,gate_proj,down_proj,projector,vision"


def _check_peft_logits(adapted: torch.Tensor, plain: torch.Tensor, megamm: torch.Tensor, label: str) -> None:
    """PEFT's logits with the adapters (`adapted`) equal megamm's, and differ from the base model's."""
    assert (adapted - plain).abs().max() > 1e-2, "the adapters must change the logits for the test to mean something"
    error = (adapted - megamm).abs().max().item()
    print(f"PEFT vs megamm logits ({label}): max abs error {error:.2e}")
    assert error < LOGIT_ATOL, f"PEFT vs megamm logits ({label}): max abs error {error}"


def _check_import_is_the_export(imported_dir: Path, original_dir: Path) -> CheckpointReader:
    """Every model tensor of the imported adapter checkpoint equals the exported one, bit for bit."""
    imported, original = CheckpointReader(imported_dir), CheckpointReader(original_dir)
    keys = sorted(k for k in original.tensors if k.startswith(format.MODEL))
    assert sorted(k for k in imported.tensors if k.startswith(format.MODEL)) == keys
    for key, value in original.read(keys).items():
        assert torch.equal(imported.read([key])[key], value), key
    return imported


def _megamm_logits(model: LlavaModel, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                           images_per_sample=batch["images_per_sample"], return_logits=True)
    return out["logits"][..., :VOCAB].transpose(0, 1)


def _hf_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits


@torch.no_grad()
def _randomize(named_parameters, b_name: str = "lora_b", magnitude_name: str = "magnitude") -> None:
    """B random (not PEFT's zero init) and DoRA's magnitudes off the weight norms, so the adapters
    change the logits."""
    generator = torch.Generator().manual_seed(0)
    for name, param in named_parameters:
        if b_name in name:
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
        elif magnitude_name in name:
            param.mul_(1.0 + 0.2 * torch.rand(param.shape, generator=generator))


@pytest.fixture(scope="module", params=[False, True], ids=["lora", "dora"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    dora = request.param
    root = tmp_path_factory.mktemp("peft-dora" if dora else "peft")
    import_llava_hf(save_hf(build_hf_llava(seed=4), root / "hf"), root / "base")
    base = format.resolve(root / "base")
    tree = dict(format.read_description(base)["config"])
    tree["training"] = {"micro_batch_size": 1, "global_batch_size": 1, "seq_length": 40, "mock_data": True,
                        "seed": 3, "lora_rank": 4, "lora_alpha": 16.0, "lora_target_modules": [TARGETS],
                        "lora_use_dora": dora, "pretrained_checkpoint": str(base)}
    config = resolve(run_config_from_dict(tree), 1)
    state = ParallelState.single()
    state.seed(3)
    model = LlavaModel(config.model, state)
    apply_lora(model, config.lora)
    model.initialize(3)
    load_pretrained([model], base, state, log=lambda _: None)
    reset_magnitudes([model])
    _randomize(model.named_parameters())
    Checkpointer(state, config, [model], save_dir=root / "lora", log=lambda _: None).save_model(0, 0)
    batch = llava_batch()
    export_hf(base, root / "base-hf")
    return {"root": root, "base": base, "model": model, "batch": batch, "logits": _megamm_logits(model, batch),
            "dora": dora, "peft": export_peft(root / "lora", root / "peft")}


def _hf_base(directory: Path) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(directory, torch_dtype=torch.float32,
                                                         attn_implementation="eager")


@pytest.mark.slow
def test_peft_loads_the_exported_adapters_with_megamm_logits(setup: dict) -> None:
    root, batch, peft_dir = setup["root"], setup["batch"], setup["peft"]
    peft_config = json.loads((peft_dir / ADAPTER_CONFIG).read_text())
    assert peft_config["use_dora"] == setup["dora"] and peft_config["r"] == 4 and peft_config["lora_alpha"] == 16.0
    assert "model.language_model.layers.0.self_attn.q_proj" in peft_config["target_modules"]
    assert "model.language_model.layers.0.self_attn.k_proj" not in peft_config["target_modules"]
    base_hf = _hf_base(root / "base-hf")
    plain = _hf_logits(base_hf, batch)
    adapted = _hf_logits(PeftModel.from_pretrained(base_hf, peft_dir), batch)
    _check_peft_logits(adapted, plain, setup["logits"], "DoRA" if setup["dora"] else "LoRA")


@pytest.mark.slow
def test_imported_peft_adapters_are_the_exported_ones(setup: dict) -> None:
    root, peft_dir = setup["root"], setup["peft"]
    imported = _check_import_is_the_export(import_peft(peft_dir, setup["base"], root / "imported"), root / "lora")
    tree = imported.description["config"]["training"]
    assert tree["lora_target_modules"] == [TARGETS] and tree["lora_use_dora"] == setup["dora"]


@pytest.mark.slow
def test_merged_checkpoint_equals_the_adapted_model_and_exports(setup: dict) -> None:
    root, batch = setup["root"], setup["batch"]
    merged = merge_adapters(root / "lora", root / "merged")
    description = format.read_description(merged)
    assert "lora_rank" not in description["config"]["training"] and "contents" not in description
    plain = LlavaModel(setup["model"].config, ParallelState.single())
    load_model_weights(plain, merged, ParallelState.single())
    error = (_megamm_logits(plain, batch) - setup["logits"]).abs().max().item()
    print(f"merged vs adapted megamm logits: max abs error {error:.2e}")
    assert error < 1e-5, f"merged vs adapted megamm logits: max abs error {error}"
    export_hf(merged, root / "merged-hf")
    error = (_hf_logits(_hf_base(root / "merged-hf"), batch) - setup["logits"]).abs().max().item()
    print(f"merged Hugging Face export vs megamm logits: max abs error {error:.2e}")
    assert error < LOGIT_ATOL, f"merged Hugging Face export vs megamm logits: max abs error {error}"


@pytest.mark.slow
def test_peft_settings_megamm_cannot_represent_are_refused(setup: dict, tmp_path: Path) -> None:
    peft_dir = setup["peft"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((peft_dir / "adapter_model.safetensors").read_bytes())
    peft_config = json.loads((peft_dir / ADAPTER_CONFIG).read_text())
    (bad / ADAPTER_CONFIG).write_text(json.dumps({**peft_config, "use_rslora": True, "rank_pattern": {"q_proj": 8}}))
    with pytest.raises(ConversionError, match="use_rslora = True.*\n.*rank_pattern"):
        import_peft(bad, setup["base"], tmp_path / "out")
    # One decoder layer only: megamm's targets adapt every layer alike.
    only_layer_0 = {**peft_config, "target_modules": [
        m for m in peft_config["target_modules"] if "language_model.layers.1." not in m]}
    tensors = {k: v for k, v in load_file(peft_dir / "adapter_model.safetensors").items()
               if "language_model.layers.1." not in k}
    (bad / ADAPTER_CONFIG).write_text(json.dumps(only_layer_0))
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(ConversionError, match="every decoder layer alike"):
        import_peft(bad, setup["base"], tmp_path / "out2")


def _merge_tool():
    spec = importlib.util.spec_from_file_location("merge_lora", Path(__file__).resolve().parents[2] / "tools"
                                                  / "merge_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow
def test_the_tool_merges_and_refuses_a_whole_model(setup: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    main = _merge_tool()
    assert main(["merge", "--load", str(setup["root"] / "lora"), "--save", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "latest").is_file()
    assert main(["export-peft", "--load", str(setup["base"]), "--out", str(tmp_path / "peft")]) == 2
    assert "not a LoRA run's checkpoint" in capsys.readouterr().err


# ---- the Qwen2-VL family ----------------------------------------------------------------------------

QWEN_TARGETS = "q_proj,v_proj,o_proj,gate_proj,down_proj,vision,projector"


@torch.no_grad()
def _native_logits(model: LlavaModel, batch: dict) -> torch.Tensor:
    out = model.eval()(**{k: batch[k] for k in MODEL_KEYS}, return_logits=True)
    return out["logits"][..., :QWEN_VOCAB].transpose(0, 1)


@pytest.fixture(scope="module", params=[("qwen2_vl", False), ("qwen2_vl", True), ("qwen2_5_vl", False)],
                ids=["qwen2_vl-lora", "qwen2_vl-dora", "qwen2_5_vl-lora"])
def qwen_setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    family, dora = request.param
    root = tmp_path_factory.mktemp(f"peft-{family}-{'dora' if dora else 'lora'}")
    architecture = ARCHITECTURES[family]
    hf = build_hf(family)
    import_qwen2_vl_hf(save_hf(hf, root / "hf", shard_size="200KB"), root / "base")
    base = format.resolve(root / "base")
    tree = dict(format.read_description(base)["config"])
    tree["training"] = {"micro_batch_size": 1, "global_batch_size": 1, "seq_length": 40, "mock_data": True,
                        "seed": 3, "lora_rank": 4, "lora_alpha": 16.0, "lora_target_modules": [QWEN_TARGETS],
                        "lora_use_dora": dora, "pretrained_checkpoint": str(base)}
    config = resolve(run_config_from_dict(tree), 1)
    state = ParallelState.single()
    state.seed(3)
    model = LlavaModel(config.model, state)
    apply_lora(model, config.lora)
    model.initialize(3)
    load_pretrained([model], base, state, log=lambda _: None)
    reset_magnitudes([model])
    _randomize(model.named_parameters())
    Checkpointer(state, config, [model], save_dir=root / "lora", log=lambda _: None).save_model(0, 0)
    export_hf(base, root / "base-hf", architecture=architecture)
    batch = native_microbatches(config.model)[0]
    return {"root": root, "base": base, "family": family, "dora": dora, "architecture": architecture,
            "hf_class": type(hf), "batch": batch, "logits": _native_logits(model, batch),
            "peft": export_peft(root / "lora", root / "peft", architecture)}


def _qwen_hf_logits(model: torch.nn.Module, setup: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**hf_inputs(setup["batch"], setup["family"])).logits


@pytest.mark.slow
def test_peft_loads_qwen2_vl_adapters_with_megamm_logits(qwen_setup: dict) -> None:
    setup = qwen_setup
    peft_config = json.loads((setup["peft"] / ADAPTER_CONFIG).read_text())
    modules = peft_config["target_modules"]
    assert peft_config["use_dora"] == setup["dora"]
    # The tower's fused qkv is one module with one adapter; the merger's linears are adapted.
    assert {"model.visual.blocks.1.attn.qkv", "model.visual.merger.mlp.0", "model.visual.merger.mlp.2",
            "model.language_model.layers.1.self_attn.q_proj"} <= set(modules)
    shapes = {k: tuple(v.shape) for k, v in load_file(setup["peft"] / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight"] == (4, 32)
    assert shapes["base_model.model.model.visual.blocks.0.attn.qkv.lora_B.weight"] == (96, 4)
    if setup["dora"]:
        assert shapes["base_model.model.model.visual.blocks.0.attn.qkv.lora_magnitude_vector"] == (96,)
    base_hf = setup["hf_class"].from_pretrained(setup["root"] / "base-hf", torch_dtype=torch.float32)
    plain = _qwen_hf_logits(base_hf, setup)
    adapted = _qwen_hf_logits(PeftModel.from_pretrained(base_hf, setup["peft"]), setup)
    _check_peft_logits(adapted, plain, setup["logits"], f"{setup['family']}, {'DoRA' if setup['dora'] else 'LoRA'}")
    _check_import_is_the_export(import_peft(setup["peft"], setup["base"], setup["root"] / "imported",
                                            setup["architecture"]), setup["root"] / "lora")


@pytest.mark.slow
def test_a_peft_made_qwen2_vl_adapter_imports_with_peft_logits(qwen_setup: dict) -> None:
    """peft's own adapter (its init of A and DoRA's magnitude, random B) on the exported model's
    modules: imported and merged, megamm gives PEFT's logits."""
    setup, root = qwen_setup, qwen_setup["root"]
    modules = json.loads((setup["peft"] / ADAPTER_CONFIG).read_text())["target_modules"]
    base_hf = setup["hf_class"].from_pretrained(root / "base-hf", torch_dtype=torch.float32)
    made = peft.get_peft_model(base_hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=modules,
                                                        use_dora=setup["dora"]))
    _randomize(made.named_parameters(), b_name="lora_B", magnitude_name="lora_magnitude_vector")
    made.save_pretrained(root / "peft-made")
    expected = _qwen_hf_logits(made, setup)
    # Through the tool, as a user would (--architecture names the Hugging Face layout).
    assert _merge_tool()(["import-peft", "--peft", str(root / "peft-made"), "--pretrained-checkpoint",
                          str(setup["base"]), "--save", str(root / "imported-made"),
                          "--architecture", setup["architecture"]]) == 0
    merged = merge_adapters(root / "imported-made", root / "merged-made")
    plain = LlavaModel(run_config_from_dict(format.read_description(merged)["config"]).model, ParallelState.single())
    load_model_weights(plain, merged, ParallelState.single())
    error = (_native_logits(plain, setup["batch"]) - expected).abs().max().item()
    print(f"PEFT-made adapter imported vs PEFT logits ({setup['family']}): max abs error {error:.2e}")
    assert error < LOGIT_ATOL, f"imported PEFT adapter vs PEFT logits: max abs error {error}"


# ---- the tiled families -----------------------------------------------------------------------------

TILED_ARCHITECTURES = {"llava_next": "llava-next-hf", "internvl": "internvl-hf"}


def _tiled_family(family: str, root: Path) -> dict:
    """The family's random transformers model imported as the base, a batch and its HF inputs."""
    if family == "llava_next":
        hf = llava_next.build_hf()
        import_llava_hf(save_hf(hf, root / "hf", shard_size="200KB"), root / "base")
        batch = llava_next.make_batch()
        return {"hf_class": type(hf), "batch": batch, "hf_inputs": llava_next.hf_inputs(batch)}
    hf = internvl.build_hf("qwen2")
    import_internvl_hf(save_hf(hf, root / "hf", shard_size="200KB"), root / "base")
    batch = internvl.internvl_batch()
    return {"hf_class": type(hf), "batch": batch,
            "hf_inputs": {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}}


@pytest.fixture(scope="module", params=list(TILED_ARCHITECTURES))
def tiled_setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    family = request.param
    root = tmp_path_factory.mktemp(f"peft-{family}")
    setup = {"family": family, "root": root, "architecture": TILED_ARCHITECTURES[family],
             **_tiled_family(family, root)}
    base = format.resolve(root / "base")
    tree = dict(format.read_description(base)["config"])
    # An any-resolution model trains on dataset files only: the run names some (never read here).
    data = {"data_path": [__file__], "tokenizer_model": __file__} if family == "llava_next" else {"mock_data": True}
    tree["training"] = {"micro_batch_size": 1, "global_batch_size": 1, "seq_length": 40, "seed": 3, "lora_rank": 4,
                        "lora_alpha": 16.0, "lora_target_modules": [TARGETS], "pretrained_checkpoint": str(base),
                        **data}
    config = resolve(run_config_from_dict(tree), 1)
    state = ParallelState.single()
    state.seed(3)
    model = LlavaModel(config.model, state)
    apply_lora(model, config.lora)
    model.initialize(3)
    load_pretrained([model], base, state, log=lambda _: None)
    _randomize(model.named_parameters())
    Checkpointer(state, config, [model], save_dir=root / "lora", log=lambda _: None).save_model(0, 0)
    export_hf(base, root / "base-hf", architecture=setup["architecture"])
    return {**setup, "base": base, "megamm_logits": gathered_logits(model.eval(), setup["batch"]),
            "peft": export_peft(root / "lora", root / "peft", setup["architecture"])}


@pytest.mark.slow
def test_peft_loads_tiled_family_adapters_with_megamm_logits(tiled_setup: dict) -> None:
    """LLaVA-NeXT and InternVL: adapters on the decoder, the tower's layers and the projector
    (InternVL's pixel-shuffle MLP after its norm) load in PEFT with megamm's logits; the newline
    embedding, the layer scale and the norms are frozen, so nothing but adapters is exported; the
    import gives back the same tensors."""
    setup = tiled_setup
    modules = json.loads((setup["peft"] / ADAPTER_CONFIG).read_text())["target_modules"]
    tower = "model.vision_tower.encoder.layers.1." if setup["family"] == "llava_next" else "model.vision_tower.encoder.layer.1."
    assert any(m.startswith(tower) for m in modules), modules
    assert {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"} <= set(modules)
    assert "model.language_model.layers.1.self_attn.q_proj" in modules
    keys = load_file(setup["peft"] / "adapter_model.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in keys), sorted(keys)
    base_hf = setup["hf_class"].from_pretrained(setup["root"] / "base-hf", torch_dtype=torch.float32,
                                                attn_implementation="eager")
    with torch.no_grad():
        plain = base_hf.eval()(**setup["hf_inputs"]).logits
        adapted = PeftModel.from_pretrained(base_hf, setup["peft"]).eval()(**setup["hf_inputs"]).logits
    _check_peft_logits(adapted, plain, setup["megamm_logits"], setup["family"])
    _check_import_is_the_export(import_peft(setup["peft"], setup["base"], setup["root"] / "imported",
                                            setup["architecture"]), setup["root"] / "lora")
