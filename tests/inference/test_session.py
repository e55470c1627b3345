"""InferenceSession.from_checkpoint and tools/generate.py for the Qwen2-VL family: a checkpoint
imported from a random tiny transformers model answers an image question and a video question
(frame files) with transformers' greedy tokens, and the run's native-resolution settings (pixel
ranges, video sampling, the qwen2_vl template) are what the session prepares inputs with.

transformers' side is built without megamm: the image patches by its PIL image processor, the
prompt ids by the `tokenizers` library on the chat text the official Qwen2-VL chat template writes,
the video patches from the image processor's patches of its frames (the frames come in equal pairs,
so each temporal patch is a still image: the processor's patches of that frame).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megamm.config import LlavaConfig
from megamm.config.run import TrainingConfig
from megamm.convert.importer import import_qwen2_vl_hf
from megamm.data.native_samples import native_settings
from megamm.data.tokenizer import load_tokenizer
from megamm.inference.session import InferenceSession, Video, data_settings
from tests.convert.test_qwen2_vl import build_hf
from tests.convert.test_roundtrip import save_hf
from tests.data.test_qwen_template import CORPUS
from tests.data_fixtures import write_qwen_tokenizer
from tests.tiny import qwen2_vl_config

qwen2_vl_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 8
# Placeholders where Hugging Face's messages put an image before the text (no newline between).
IMAGE_QUESTION = "<image>Describe both pictures."
VIDEO_QUESTION = "<video>What happens in the video?"
# The image keeps its size (a multiple of patch 4 x merge 2 within the default 56 * 56 .. 28 * 28 * 1280
# pixels); the frames are scaled up to the video bounds (at least 128 * 28 * 28 pixels), which the
# image bounds would not do.
IMAGE_SIZE = (72, 56)
FRAME_SIZE = (48, 40)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _picture(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth gradients with noise: (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    base = np.stack(np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height)), -1)
    pixels = np.concatenate([base, base[..., :1][..., ::-1]], -1) + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _hf_patches(images: list[Image.Image], video: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' PIL image processor (default bounds; the video's per frame): patches, grids."""
    bounds = {"min_pixels": 128 * 28 * 28, "max_pixels": 28 * 28 * 768} if video else {}
    processor = qwen2_vl_pil.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, **bounds)
    out = processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _chat_text(question: str, pad: str, tokens: int) -> str:
    """The official Qwen2-VL chat template's text for one user turn of an image or video, then text."""
    text = question.removeprefix("<image>").removeprefix("<video>")
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|>{pad * tokens}<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tokenizer, a tiny Qwen2-VL model with its ids, imported to a megamm checkpoint, and the media."""
    tmp = tmp_path_factory.mktemp("qwen_session")
    tokenizer_path = write_qwen_tokenizer(tmp / "tokenizer.json", CORPUS)
    tokenizer = load_tokenizer(tokenizer_path, image_token="<|image_pad|>")
    ids = {"image_token_id": tokenizer.image_token_id, "video_token_id": tokenizer.token_id("<|video_pad|>"),
           "vision_start_token_id": tokenizer.token_id("<|vision_start|>"),
           "vision_end_token_id": tokenizer.token_id("<|vision_end|>")}
    # A video frame has at least 128 * 28 * 28 pixels (1600 tokens here): room for two temporal patches.
    hf = build_hf("qwen2_vl", scale=0.5, vocab_size=tokenizer.vocab_size, token_ids=ids, max_positions=4096)
    import_qwen2_vl_hf(save_hf(hf, tmp / "hf"), tmp / "ckpt")
    media = tmp / "media"
    media.mkdir()
    _picture(IMAGE_SIZE, 1).save(media / "picture.png")
    frames = [_picture(FRAME_SIZE, 2), _picture(FRAME_SIZE, 3)]
    names = []
    for index, frame in enumerate(frames):  # four frames A A B B: two temporal patches, each a still
        for copy in range(2):
            names.append(f"frame_{index}_{copy}.png")
            frame.save(media / names[-1])
    return {"tmp": tmp, "tokenizer": tokenizer_path, "ids": ids, "hf": hf, "media": media, "frames": frames,
            "frame_names": names}


def _hf_generate(checkpoint: dict, question: str, video: bool, stop: tuple[int, ...]) -> list[int]:
    """transformers' greedy continuation (without its stop token) of the question with the image or video."""
    import tokenizers

    media = checkpoint["media"]
    if video:
        frame_patches, frame_grids = _hf_patches(checkpoint["frames"], video=True)
        grid = torch.tensor([[len(checkpoint["frames"]), *frame_grids[0, 1:].tolist()]])
        kwargs = {"pixel_values_videos": frame_patches, "video_grid_thw": grid}
        pad, token = "<|video_pad|>", checkpoint["ids"]["video_token_id"]
    else:
        patches, grid = _hf_patches([Image.open(media / "picture.png").convert("RGB")], video=False)
        kwargs = {"pixel_values": patches, "image_grid_thw": grid}
        pad, token = "<|image_pad|>", checkpoint["ids"]["image_token_id"]
    text = _chat_text(question, pad, int(grid.prod()) // 4)
    ids = torch.tensor([tokenizers.Tokenizer.from_file(str(checkpoint["tokenizer"])).encode(text).ids])
    assert int((ids == token).sum()) == int(grid.prod()) // 4
    types = (ids == token).int() * (2 if video else 1)
    with torch.no_grad():
        out = checkpoint["hf"].generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types, do_sample=False,
            max_new_tokens=NEW_TOKENS, eos_token_id=list(stop), pad_token_id=stop[0],
            suppress_tokens=[checkpoint["ids"]["image_token_id"], checkpoint["ids"]["video_token_id"]], **kwargs)
    tokens = out[0, ids.shape[1]:].tolist()
    return tokens[:next((i for i, t in enumerate(tokens) if t in stop), len(tokens))]


def test_checkpoint_session_and_generate_tool_match_transformers(
    checkpoint: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    """from_checkpoint (qwen2_vl template and <|image_pad|> by default) and tools/generate.py give
    transformers' greedy tokens for an image question and a video question of frame files."""
    media = checkpoint["media"]
    session = InferenceSession.from_checkpoint(checkpoint["tmp"] / "ckpt", tokenizer_model=str(checkpoint["tokenizer"]))
    assert session.settings.chat_template == "qwen2_vl"
    assert session.tokenizer.image_token == "<|image_pad|>"
    stop = session.generation_config().stop_token_ids
    assert session.tokenizer.token_id("<|im_end|>") in stop
    video = Video(checkpoint["frame_names"], frame_rate=2.0)
    answers = session.answer([("picture.png", IMAGE_QUESTION), (video, VIDEO_QUESTION)],
                             session.generation_config(max_new_tokens=NEW_TOKENS), image_root=media)
    expected = [_hf_generate(checkpoint, IMAGE_QUESTION, False, stop),
                _hf_generate(checkpoint, VIDEO_QUESTION, True, stop)]
    assert [a.tokens for a in answers] == expected
    assert all(len(set(tokens)) > 1 for tokens in expected), f"degenerate continuations prove little: {expected}"

    prompts = media / "prompts.json"
    prompts.write_text(json.dumps([{"image": "picture.png", "prompt": IMAGE_QUESTION},
                                   {"video": checkpoint["frame_names"], "frame_rate": 2, "prompt": VIDEO_QUESTION}]))
    tool = _load_tool("generate")
    assert tool.main(["--load", str(checkpoint["tmp"] / "ckpt"), "--tokenizer-model", str(checkpoint["tokenizer"]),
                      "--prompts-file", str(prompts), "--max-new-tokens", str(NEW_TOKENS)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1::2] == [f"  -> {session.tokenizer.decode(tokens).strip()}" for tokens in expected], printed
    assert printed[2] == f"[video of 4 frames from {checkpoint['frame_names'][0]!r}] {VIDEO_QUESTION}"


def test_a_native_checkpoints_settings_come_from_its_run(tmp_path: Path) -> None:
    """The pixel ranges and video sampling the run trained with, the qwen2_vl template by default
    (whatever a synthetic-data run saved), refusals for another template or tiles."""
    config: LlavaConfig = qwen2_vl_config()
    training = {"tokenizer_model": "tok.json", "chat_template": "llava_v1", "min_pixels": 1024, "max_pixels": 4096,
                "video_min_pixels": 2048, "video_max_pixels": 8192, "video_fps": 1.0, "video_max_frames": 6}
    settings = data_settings({"training": training}, config)
    assert settings.chat_template == "qwen2_vl"
    native = settings.native
    assert (native.image.min_pixels, native.image.max_pixels) == (1024, 4096)
    assert (native.video.min_pixels, native.video.max_pixels) == (2048, 8192)
    assert (native.fps, native.max_frames) == (1.0, 6)
    assert data_settings({"training": {"tokenizer_model": "t"}}, config).native == native_settings(
        config.vision, TrainingConfig())
    with pytest.raises(ValueError) as error:
        data_settings({"training": training}, config, chat_template="chatml", max_image_tiles=4)
    assert "chat template 'chatml'" in str(error.value) and "needs qwen2_vl" in str(error.value)
    assert "max image tiles 4" in str(error.value)
    with pytest.raises(ValueError, match="native-resolution settings .*min_pixels .* larger than max_pixels"):
        data_settings({"training": {**training, "min_pixels": 8192}}, config)
