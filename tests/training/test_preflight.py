"""The tokenizer check before a run starts, for the qwen2_vl template: Qwen's image token and its
markers (megamm.training.preflight)."""

from __future__ import annotations

from pathlib import Path

from megamm.config.run import RunConfig, TrainingConfig
from megamm.training.preflight import file_problems
from tests.data_fixtures import write_qwen_tokenizer
from tests.tiny import language_config, llava_config, native_vision_config


def test_qwen_markers_and_image_token_are_checked_up_front(tmp_path: Path) -> None:
    tokenizer = write_qwen_tokenizer(tmp_path / "tokenizer.json", ["Hello there."],
                                     ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"))
    (tmp_path / "rows.json").write_text('[{"conversations": [{"from": "human", "value": "Hi"}, '
                                        '{"from": "gpt", "value": "Yes."}]}]')
    language = language_config()
    run = RunConfig(
        model=llava_config(vision=native_vision_config(), language=language),
        training=TrainingConfig(data_path=[str(tmp_path / "rows.json")], tokenizer_model=str(tokenizer),
                                chat_template="qwen2_vl"),
    )
    (problem,) = file_problems(run)
    assert problem.startswith(f"--tokenizer-model {tokenizer} does not fit the model: it has no single token for "
                              "'<|vision_start|>', '<|vision_end|>', '<|video_pad|>'")
    # The image token is Qwen's <|image_pad|> (id 3 here), not "<image>".
    assert f"it gives the image token '<|image_pad|>' id 3 but model.language.image_token_id is " \
           f"{language.image_token_id}" in problem
