"""Adapters by target name, and merging: the merged plain model computes what the adapted one does."""

from __future__ import annotations

import pytest
import torch

from megamm.config import LlavaConfig
from megamm.config.anyres import AnyResConfig
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.models.llava import LlavaModel
from megamm.models.lora import adapters, apply_lora, merge_lora, reset_magnitudes
from megamm.parallel.state import ParallelState
from tests.adapters import perturb_adapters
from tests.tiny import (
    NATIVE_SEQ,
    anyres_batch,
    internvl_config,
    llava_config,
    make_batch,
    native_microbatches,
    qwen2_vl_config,
)


def _model(targets: str, dora: bool = False, dropout: float = 0.0, config: LlavaConfig | None = None) -> LlavaModel:
    config = config or llava_config()
    # An any-resolution model trains on dataset files only: the run names some (never read here).
    data = ({"data_path": [__file__], "tokenizer_model": __file__} if config.anyres is not None
            else {"mock_data": True})
    run = RunConfig(model=config, training=TrainingConfig(
        seq_length=48, lora_rank=4, lora_alpha=8.0, lora_dropout=dropout, lora_use_dora=dora,
        lora_target_modules=[targets], **data))
    config = resolve(run, 1)
    state = ParallelState.single()
    state.seed(3)
    model = LlavaModel(config.model, state)
    apply_lora(model, config.lora)
    model.initialize(3)
    return model


def test_targets_select_layers_and_fused_parts() -> None:
    model = _model("k_proj,gate_proj,o_proj,projector")
    found = {name: layer.adapter.targeted for name, layer in adapters([model])}
    assert found == {
        "projector.fc1": (0,), "projector.fc2": (0,),
        **{f"language.decoder.layers.{i}.self_attention.qkv": (1,) for i in range(2)},
        **{f"language.decoder.layers.{i}.self_attention.proj": (0,) for i in range(2)},
        **{f"language.decoder.layers.{i}.mlp.fc1": (0,) for i in range(2)},
    }
    # select_layer -2: the tower's last layer never runs, so it gets no adapter.
    assert not any(name.startswith("vision.encoder.layers.2.") for name, _ in adapters([_model("vision")]))
    # Targeted parts (language, projector) train their adapters only; the untargeted vision tower
    # follows its freeze flag (off): its used layers train.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".adapter." in n or n.startswith("vision.")}
    assert any(n.startswith("vision.") for n in trainable)
    assert not any(n.startswith(("language.", "projector.")) and ".adapter." not in n for n in trainable)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_vl_targets_the_tower_layers_the_merger_and_the_decoder(family: str) -> None:
    """`vision` is every linear of the native tower's layers (all of them run: it has no
    select_layer), `projector` its patch merger; the tower's qkv, one module in Hugging Face's form,
    gets one adapter of the whole layer, Qwen2.5-VL's SwiGLU fc1 (gate_proj, up_proj there) one
    per part."""
    config = qwen2_vl_config(family)
    vision = {name: layer.adapter for name, layer in adapters([_model("vision", config=config)])}
    expected_fc1 = (0, 1) if family == "qwen2_5_vl" else (0,)
    assert {name: (a.targeted, a.shared) for name, a in vision.items()} == {
        f"vision.encoder.layers.{i}.{path}": parts for i in range(2) for path, parts in (
            ("self_attention.qkv", ((0, 1, 2), True)), ("self_attention.proj", ((0,), False)),
            ("mlp.fc1", (expected_fc1, False)), ("mlp.fc2", ((0,), False)))}
    assert tuple(vision["vision.encoder.layers.0.self_attention.qkv"].lora_a.shape) == (4, 32)
    model = _model("projector,q_proj", config=config)
    assert {name for name, _ in adapters([model])} == {"vision.merger.fc1", "vision.merger.fc2", *(
        f"language.decoder.layers.{i}.self_attention.qkv" for i in range(2))}
    # The merger is the projector: adapted, its base frozen; the tower (no target) trains fully.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("vision.merger.")} == {
        f"vision.merger.fc{i}.adapter.lora_{k}" for i in (1, 2) for k in "ab"}
    assert "vision.encoder.layers.0.self_attention.qkv.weight" in trainable
    assert not any(n.startswith("language.") and ".adapter." not in n for n in trainable)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_merged_qwen2_vl_equals_the_adapted_model(family: str, dora: bool) -> None:
    """Images of two sizes and a video, M-RoPE positions, packed rows (tests.tiny.native_microbatches)."""
    config = qwen2_vl_config(family)
    model = _model("q_proj,v_proj,o_proj,up_proj,down_proj,vision,projector", dora=dora, config=config).eval()
    microbatches = native_microbatches(model.config)

    @torch.no_grad()
    def logits() -> list[torch.Tensor]:
        return [model(**mb, return_logits=True)["logits"] for mb in microbatches]

    base = logits()
    reset_magnitudes([model])
    perturb_adapters([model], model.state)
    adapted = logits()
    assert all(a.shape[0] == NATIVE_SEQ for a in adapted)
    assert max((a - b).abs().max() for a, b in zip(adapted, base)) > 1e-2, "the adapters must change the model"
    assert len(merge_lora([model])) == 2 * 4 + 2 + 2 * 4
    assert not any(".adapter." in name for name, _ in model.named_parameters())
    for merged, reference in zip(logits(), adapted):
        assert (merged - reference).abs().max() / reference.abs().max() < 1e-5


@torch.no_grad()
def _outputs(model: LlavaModel) -> torch.Tensor:
    batch = make_batch(model.config, [1, 2], 48)
    return model(batch["input_ids"], batch["pixel_values"], batch["labels"], return_logits=True)["logits"]


@pytest.mark.parametrize("dora", [False, True])
def test_merged_model_equals_the_adapted_model(dora: bool) -> None:
    model = _model("q_proj,v_proj,o_proj,up_proj,down_proj,projector,vision", dora=dora).eval()
    base = _outputs(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_b"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    reset_magnitudes([model])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("magnitude"):
                param.mul_(1.0 + 0.1 * torch.rand(param.shape, generator=generator))
    adapted = _outputs(model)
    assert (adapted - base).abs().max() > 1e-2, "the adapters must change the model for the test to mean something"
    merged_layers = merge_lora([model])
    assert len(merged_layers) == 2 * 4 + 2 + 2 * 4 and not list(adapters([model]))
    assert not any(".adapter." in name for name, _ in model.named_parameters())
    merged = _outputs(model)
    assert (merged - adapted).abs().max() / adapted.abs().max() < 1e-5


def test_fresh_adapters_and_dropout_leave_the_model_unchanged_in_eval() -> None:
    """B starts at zero (PEFT's init) and DoRA's magnitude at the weight's row norms: a fresh adapter
    changes nothing; dropout (training only) acts on the adapter's input, never the base's."""
    plain = _model("projector")
    plain.projector.fc1.adapter = plain.projector.fc2.adapter = None
    reference = _outputs(plain.eval())
    dora = _model("q_proj,v_proj,o_proj,up_proj,down_proj,projector", dora=True, dropout=0.5)
    reset_magnitudes([dora])
    assert torch.allclose(_outputs(dora.eval()), reference, atol=1e-6)
    lora = _model("q_proj,v_proj,o_proj,up_proj,down_proj,projector", dropout=0.5)
    lora.train()
    batch = make_batch(lora.config, [1, 2], 48)
    with torch.no_grad():
        trained = lora(batch["input_ids"], batch["pixel_values"], batch["labels"], return_logits=True)["logits"]
    assert torch.allclose(trained, reference, atol=1e-6)  # B = 0: the dropped input reaches nothing


TILED_TARGETS = "q_proj,v_proj,o_proj,up_proj,down_proj,vision,projector"


def _tiled(family: str) -> tuple[LlavaConfig, dict]:
    """A tiny LLaVA-NeXT (CLIP tower, any-resolution tiles, newline embedding) or InternVL (InternViT
    with layer scale and QK norm, pixel shuffle, InternVL's projector) and a batch of each."""
    if family == "llava_next":
        config = llava_config(anyres=AnyResConfig(((16, 32), (32, 16), (32, 32))))
        return config, anyres_batch(config, [[(12, 30)], [(30, 12), (16, 16)]])
    config = internvl_config()
    return config, make_batch(config, [1, 3], 48)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_merged_tiled_family_equals_the_adapted_model(family: str, dora: bool) -> None:
    """Every linear of the tower's layers, the projector and the decoder adapted; what is not a linear
    (the newline embedding, InternViT's layer scale, the norm before InternVL's projector) is frozen
    with its part, as PEFT freezes every module it does not adapt. Merged, the plain model computes
    what the adapted one does."""
    config, batch = _tiled(family)
    model = _model(TILED_TARGETS, dora=dora, config=config).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable), sorted(trainable)
    for part in ("vision.encoder.layers.0.", "projector.", "language.decoder.layers.1."):
        assert any(n.startswith(part) for n in trainable), f"no adapter in {part}"

    @torch.no_grad()
    def logits() -> torch.Tensor:
        return model(**batch, return_logits=True)["logits"]

    base = logits()
    reset_magnitudes([model])
    perturb_adapters([model], model.state)
    adapted = logits()
    assert (adapted - base).abs().max() > 1e-2, "the adapters must change the model"
    merged_layers = merge_lora([model])
    vision_layers = config.vision.num_layers_used
    assert len(merged_layers) == 4 * vision_layers + 2 + 2 * 4
    assert not any(".adapter." in name for name, _ in model.named_parameters())
    assert (logits() - adapted).abs().max() / adapted.abs().max() < 1e-5


def test_an_untargeted_projector_trains_the_newline_embedding_with_it() -> None:
    """The newline embedding belongs to the projector part: adapters on the decoder only leave the
    projector, and with it the newline, training fully (PEFT's modules_to_save for both)."""
    config, _ = _tiled("llava_next")
    trainable = {n for n, p in _model("q_proj,v_proj", config=config).named_parameters() if p.requires_grad}
    assert {"anyres.image_newline", "projector.fc1.weight"} <= trainable
    assert not any(n.startswith("language.") and ".adapter." not in n for n in trainable)
