"""The registries resolve to their parts, the families refuse what their Hugging Face form cannot
hold, and configs written before families get theirs derived once."""

from __future__ import annotations

from dataclasses import replace

import pytest

from megamm.config import ParallelConfig
from megamm.config.parsing import run_config_from_dict, run_config_to_dict
from megamm.config.registry import HF_ARCHITECTURES, LANGUAGE_MODELS, PROJECTORS, VISION_TOWERS
from megamm.config.run import RunConfig
from megamm.data.images import image_normalization
from megamm.models.decoders import decoder_family
from megamm.models.projectors.base import Projector
from megamm.models.towers import tower_family
from tests.tiny import language_config, llava_config, qwen2_language_config, vision_config


def test_every_registered_part_resolves_under_its_name() -> None:
    for name in VISION_TOWERS:
        assert tower_family(name).name == name
    for name in LANGUAGE_MODELS:
        assert decoder_family(name).name == name
    for name in HF_ARCHITECTURES:
        assert HF_ARCHITECTURES.get(name).name == name
    for name in PROJECTORS:
        assert issubclass(PROJECTORS.get(name), Projector)


def test_unknown_family_names_are_config_problems() -> None:
    config = llava_config(vision=replace(vision_config(), family="vit"),
                          language=replace(language_config(), family="gpt2"))
    problems = config.problems(ParallelConfig())
    assert "vision.family: unknown vision tower family 'vit'; known: clip, internvit, qwen2_5_vl, qwen2_vl, siglip" in problems
    assert "language.family: unknown language-model family 'gpt2'; known: llama, mistral, qwen2" in problems


def test_tower_family_checks_the_architecture_flags() -> None:
    clip_like = vision_config()
    assert tower_family("clip").problems(clip_like) == []
    problems = tower_family("siglip").problems(clip_like)
    assert problems == [("vision (class_token, pre_norm, patch_bias) = (True, True, False): the siglip family's "
                        "Hugging Face tower has (False, False, True)")]


@pytest.mark.parametrize(("family", "accepts_qwen2_biases"), [("llama", False), ("mistral", False), ("qwen2", True)])
def test_language_families_hold_their_own_biases(family: str, accepts_qwen2_biases: bool) -> None:
    qwen2 = qwen2_language_config()
    assert (decoder_family(family).problems(qwen2) == []) == accepts_qwen2_biases
    llama = language_config()
    assert (decoder_family(family).problems(llama) == []) == (family != "qwen2")


def test_missing_vision_family_is_derived_from_the_class_token() -> None:
    """A megamm.json written before families: CLIP has a class token, SigLIP none; the image
    statistics follow the family unless asked otherwise."""
    tree = run_config_to_dict(RunConfig(model=llava_config(vision=replace(vision_config(), class_token=False))))
    del tree["model"]["vision"]["family"]
    del tree["model"]["language"]["family"]
    model = run_config_from_dict(tree).model
    assert model.vision.family == "siglip" and model.language.family == "llama"
    assert image_normalization(model.vision, None) == "siglip"
    assert image_normalization(model.vision, "clip") == "clip"
