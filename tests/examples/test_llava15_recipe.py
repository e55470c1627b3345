"""The LLaVA-1.5 recipe (examples/llava15/) at its real sizes: configs parse and validate for 2 nodes
x 8 GPUs, hold the published hyperparameters, match the model the import step writes, and fit an
80 GB GPU by the memory estimate; the scripts convert first and export last. Nothing is built
(the parameter count comes from a meta-device model).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shlex
import subprocess
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from megamm.checkpoint import format
from megamm.config import ProjectorConfig
from megamm.config.parsing import parse_run_config, run_config_to_dict
from megamm.config.resolved import resolve
from megamm.convert.adapters.causal_lm import language_config_from_hf
from megamm.convert.adapters.vision_tower import vision_config_from_hf
from megamm.convert.importer import extend_vocab
from megamm.train import saved_run_config

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "llava15"
WORLD = 16  # 2 nodes x 8 GPUs
STAGES = {"stage1": RECIPE / "stage1_pretrain.yaml", "stage2": RECIPE / "stage2_finetune.yaml"}

# The Hugging Face configs of the two source models (their published field values, written out).
CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768}
VICUNA_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
             "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data_flags(root: Path) -> list[str]:
    """The tokenizer and image folder the recipe names exist on a cluster, not here: stand-ins."""
    tokenizer = root / "tokenizer.model"
    tokenizer.touch()
    (root / "images").mkdir(exist_ok=True)
    return ["--tokenizer-model", str(tokenizer), "--image-folder", str(root / "images")]


@pytest.fixture(scope="module")
def data_flags(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return _data_flags(tmp_path_factory.mktemp("llava15_data"))


@pytest.fixture(scope="module")
def configs(data_flags: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both stages parsed as megamm.train parses them; stage 2 loads a stand-in for stage 1's last
    checkpoint (its megamm.json, as stage 1 saves it), at the relative path the YAML names."""
    stage1 = parse_run_config(["--config", str(STAGES["stage1"]), *data_flags], WORLD)
    root = tmp_path_factory.mktemp("llava15_run")
    checkpoint = root / stage1.training.save
    checkpoint.mkdir(parents=True)
    format.write_description(checkpoint, format.describe(0, {}, "none", run_config_to_dict(stage1)))
    cwd = Path.cwd()
    os.chdir(root)
    try:
        stage2 = parse_run_config(["--config", str(STAGES["stage2"]), *data_flags], WORLD, saved_run_config)
    finally:
        os.chdir(cwd)
    return {"stage1": stage1, "stage2": stage2}


def test_stage2_takes_its_model_from_stage1(configs: dict) -> None:
    """The stage-2 file has no model section: the model is the one stage 1's checkpoint saved."""
    import yaml

    assert "model" not in yaml.safe_load(STAGES["stage2"].read_text())
    assert configs["stage2"].model == configs["stage1"].model


def test_hyperparameters_are_llava15(configs: dict) -> None:
    one, two = configs["stage1"].training, configs["stage2"].training
    assert (one.lr, one.global_batch_size, two.lr, two.global_batch_size) == (1e-3, 256, 2e-5, 128)
    # One epoch of LLaVA-Pretrain-558K and of the 665K instruction mix.
    for t, samples in ((one, 558_128), (two, 665_298)):
        assert t.lr_decay_style == "cosine" and t.min_lr == 0.0 and t.weight_decay == 0.0
        assert t.train_iters == math.ceil(samples / t.global_batch_size)
        assert t.lr_warmup_iters == math.ceil(0.03 * t.train_iters)
        assert t.bf16 and t.finetune and t.seq_length == 2048
    # LLaVA's data: captions with the plain template, then the instruction mix with vicuna_v1.
    assert (one.chat_template, two.chat_template) == ("plain", "vicuna_v1")
    assert one.data_path[0].endswith("blip_laion_cc_sbu_558k.json") and two.data_path[0].endswith("mix665k.json")
    # Stage 1 trains the projector only; stage 2 the projector and the language model.
    assert one.freeze_LM and one.freeze_ViT and not one.freeze_projector
    assert two.freeze_LM is False and two.freeze_ViT
    assert one.load == "checkpoints/llava15/stage0" and two.load == one.save


def test_model_is_what_the_import_step_writes(configs: dict) -> None:
    """CLIP ViT-L/14-336 (layer -2, class token dropped) + Vicuna-7B with <image> 32000 and <pad>
    32001 padded to 32064, as the scripts' import-hf flags produce, equals both stages' model."""
    vision = vision_config_from_hf(CLIP_L_336, select_layer=-2, keep_class_token=False, where="clip")
    language, _ = language_config_from_hf(VICUNA_7B, "vicuna")
    extend_vocab(language, image_token_id=32000, pad_token_id=32001, multiple=64)
    for config in configs.values():
        model = config.model
        assert asdict(model.vision) == asdict(vision)
        assert asdict(model.projector) == asdict(ProjectorConfig(type="mlp2x_gelu"))
        ours = asdict(model.language)
        theirs = asdict(language)
        ours.pop("make_vocab_size_divisible_by"), theirs.pop("make_vocab_size_divisible_by")
        assert ours == theirs
        assert model.image_tokens_per_image == 576 and model.language.vocab_size == 32064


def test_parallel_layout_and_memory_fit(configs: dict, data_flags: list[str]) -> None:
    """tp 4 inside a node; stage 2 splits 32 decoder layers 16 / 16; 8 and 16 microbatches per
    step; the estimated peak per GPU leaves room on an 80 GB device; ~7.06 B parameters."""
    estimate = _module(RECIPE / "memory_estimate.py").estimate
    one, two = configs["stage1"], configs["stage2"]
    assert one.parallel.tensor_model_parallel_size == two.parallel.tensor_model_parallel_size == 4
    assert (one.parallel.pipeline_model_parallel_size, two.parallel.pipeline_model_parallel_size) == (1, 2)
    one, two = resolve(one, WORLD), resolve(two, WORLD)
    assert (one.data_parallel_size, two.data_parallel_size) == (4, 2)
    assert (one.microbatches_per_step, two.microbatches_per_step) == (8, 16)
    for name, config in (("stage1", one), ("stage2", two)):
        result = estimate(config)
        assert 7.0e9 < result["parameters"] < 7.1e9, result["parameters"]
        assert result["peak_gib"] < 60, f"{name}: {result}"
    # Stage 1 keeps no optimizer state for the frozen language model and vision tower.
    stage1 = estimate(one)["stages"][0]
    assert stage1["optimizer"] < 0.05
    stage2 = estimate(two)["stages"]
    assert len(stage2) == 2 and all(stage["optimizer"] > 4 for stage in stage2)
    # Context parallelism 2: every rank holds half of each sequence, hence half the activations.
    stage2_cp2 = replace(configs["stage2"], parallel=replace(configs["stage2"].parallel, context_parallel_size=2))
    halved = estimate(resolve(stage2_cp2, WORLD))["stages"]
    assert halved[0]["activations"] == pytest.approx(stage2[0]["activations"] / 2)
    # The same configs on one node would not fit the global batch rule: validation catches it.
    with pytest.raises(Exception, match="global-batch-size"):
        parse_run_config(["--config", str(STAGES["stage1"]), *data_flags, "--micro-batch-size", "48"], WORLD)


@pytest.mark.parametrize("script", ["run_torchrun.sh", "llava15.sbatch"])
def test_scripts_convert_first_and_export_last(script: str) -> None:
    path = RECIPE / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    steps = [text.index(marker) for marker in
             ("import-hf", "stage1_pretrain.yaml", "stage2_finetune.yaml", "export-hf")]
    assert steps == sorted(steps), f"{script}: steps out of order"
    # The converter commands parse with the tool's own parser (and a training stage sits between them).
    parser = _module(ROOT / "tools" / "convert_checkpoint.py").build_parser()
    joined = text.replace("\\\n", " ")
    commands = [shlex.split(line.split("tools/convert_checkpoint.py", 1)[1])
                for line in joined.splitlines() if "tools/convert_checkpoint.py" in line and "import-hf" in line
                or "tools/convert_checkpoint.py" in line and "export-hf" in line]
    assert [c[0] for c in commands] == ["import-hf", "export-hf"], commands
    for command in commands:
        parser.parse_args(command)
