"""Generation: KV cache = recomputation, batched = one at a time, stop tokens and lengths, sampling,
tp=2 = tp=1, model-only checkpoint loads at any tp, and the command-line tools end to end.

The language model is initialized with a large std (0.5) so that its next-token distributions are
sharp and depend on the context: a cache that dropped or misplaced a position changes the tokens.
One spawned 2-process job saves a tp=2 training checkpoint, loads it at tp=2 and tp=1, generates
with both, and runs tools/evaluate_vqa.py at tp=2; the single-process tests compare against it.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from megamm.checkpoint.format import CheckpointMismatchError
from megamm.checkpoint.model_weights import load_model_weights
from megamm.config import ParallelConfig
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.convert.importer import import_qwen2_vl_hf
from megamm.inference.generation import Generation, GenerationConfig, GenerationError, Prompt, generate
from megamm.inference.sampling import SamplingConfig, choose_tokens, filter_logits, make_generators
from megamm.inference.session import InferenceSession
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState
from megamm.transformer.kv_cache import KVCache
from tests.distributed import run_distributed
from tests.tiny import (
    IMAGE_TOKEN_ID,
    NATIVE_IMAGE_TOKEN,
    NATIVE_VIDEO_TOKEN,
    TEXT_TOKENS,
    VISION_END,
    VISION_START,
    language_config,
    llava_config,
    native_vision_inputs,
)

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingConfig()
SAMPLED = SamplingConfig(temperature=1.0, top_k=40, top_p=0.9)
SAVED_SEED, OTHER_SEED = 11, 12


def _model_config(vocab_size: int = 100, image_token_id: int = IMAGE_TOKEN_ID, layers: int = 2):
    language = replace(language_config(init_method_std=0.5, num_layers=layers), vocab_size=vocab_size,
                       image_token_id=image_token_id)
    return llava_config(language=language)


def _model(state: ParallelState, seed: int = SAVED_SEED, **config) -> LlavaModel:
    model = LlavaModel(_model_config(**config), state)
    model.initialize(seed)
    return model.eval()


def _prompts(image_token_id: int = IMAGE_TOKEN_ID, vocab_size: int = 100) -> list[Prompt]:
    """Three prompts of different lengths with 1, 0 and 2 images."""
    rng = random.Random(3)
    generator = torch.Generator().manual_seed(3)
    tokens = _model_config().image_tokens_per_image

    def text(n: int) -> list[int]:
        return [rng.choice([i for i in range(5, vocab_size) if i != image_token_id]) for _ in range(n)]

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, 16, 16, generator=generator)

    image = [image_token_id] * tokens
    return [
        Prompt([1, *text(3), *image, *text(4)], images(1)),
        Prompt([1, *text(5)]),
        Prompt([1, *text(2), *image, *text(1), *image, *text(2)], images(2)),
    ]


def _assert_same(a: list[Generation], b: list[Generation]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.tokens == y.tokens
        assert x.finish_reason == y.finish_reason
        finite = torch.isfinite(x.logits)
        assert torch.equal(finite, torch.isfinite(y.logits))
        torch.testing.assert_close(x.logits[finite], y.logits[finite], rtol=1e-4, atol=1e-4)


# ---- one process -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_kv_cache_gives_the_tokens_of_recomputation(sampling: SamplingConfig) -> None:
    model = _model(ParallelState.single())
    config = GenerationConfig(max_new_tokens=10, sampling=sampling, seed=5, return_logits=True)
    cached = generate(model, _prompts(), config)
    recomputed = generate(model, _prompts(), replace(config, use_cache=False))
    _assert_same(cached, recomputed)
    assert all(len(set(g.tokens)) > 3 for g in cached)  # context-dependent, not one repeated token
    assert len({tuple(g.tokens) for g in cached}) == 3


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_batched_equals_one_at_a_time(sampling: SamplingConfig) -> None:
    model = _model(ParallelState.single())
    config = GenerationConfig(max_new_tokens=8, sampling=sampling, seed=9, return_logits=True)
    prompts = _prompts()
    batched = generate(model, prompts, config)
    alone = [generate(model, [p], config, seeds=[config.seed + i])[0] for i, p in enumerate(prompts)]
    _assert_same(batched, alone)


def test_the_seed_decides_the_samples() -> None:
    model = _model(ParallelState.single())
    config = GenerationConfig(max_new_tokens=8, sampling=SamplingConfig(temperature=2.0))
    first = [g.tokens for g in generate(model, _prompts(), config)]
    assert first == [g.tokens for g in generate(model, _prompts(), config)]
    assert first != [g.tokens for g in generate(model, _prompts(), replace(config, seed=1))]


def test_stop_tokens_and_max_new_tokens() -> None:
    model = _model(ParallelState.single())
    prompts = _prompts()
    free = generate(model, prompts, GenerationConfig(max_new_tokens=6))
    assert [len(g.tokens) for g in free] == [6, 6, 6] and {g.finish_reason for g in free} == {"length"}
    # Stop sample 0 at its third token: it ends there (without it); the others run on unchanged
    # unless they produce it too.
    stop = free[0].tokens[2]
    stopped = generate(model, prompts, GenerationConfig(max_new_tokens=6, stop_token_ids=(stop,)))
    assert stopped[0].tokens == free[0].tokens[: free[0].tokens.index(stop)]
    assert stopped[0].finish_reason == "stop"
    for before, after in zip(free[1:], stopped[1:]):
        expected = before.tokens[: before.tokens.index(stop)] if stop in before.tokens else before.tokens
        assert after.tokens == expected
        assert after.finish_reason == ("stop" if stop in before.tokens else "length")
    # Every sequence stopping at once ends the loop.
    firsts = tuple(g.tokens[0] for g in free)
    assert all(g.tokens == [] and g.finish_reason == "stop"
               for g in generate(model, prompts, GenerationConfig(max_new_tokens=6, stop_token_ids=firsts)))
    assert [len(g.tokens) for g in generate(model, prompts, GenerationConfig(max_new_tokens=1))] == [1, 1, 1]


def test_image_token_is_never_generated() -> None:
    model = _model(ParallelState.single())
    # Make the image token the most likely output everywhere: generation must still skip it.
    with torch.no_grad():
        model.language.output_layer.weight[IMAGE_TOKEN_ID] = model.language.final_norm.weight * 100
    tokens = [t for g in generate(model, _prompts(), GenerationConfig(max_new_tokens=5)) for t in g.tokens]
    assert IMAGE_TOKEN_ID not in tokens


def test_sampling_filters_and_distribution() -> None:
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1, 1e-9]]).log()
    kept = torch.isfinite(filter_logits(logits, SamplingConfig(temperature=1.0, top_k=3)))
    assert kept.tolist() == [[True, True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.7)))
    assert kept.tolist() == [[True, True, False, False, False]]  # 0.5 < 0.7 <= 0.75
    kept = torch.isfinite(filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.01)))
    assert kept.tolist() == [[True, False, False, False, False]]  # at least one token
    # The exponential race samples from softmax(logits / T): compare frequencies over many seeds.
    rows = 4000
    batch = torch.tensor([[0.5, 0.3, 0.2, 1e-9, 1e-9]]).log().expand(rows, -1)
    draws = choose_tokens(batch, SamplingConfig(temperature=1.0), make_generators(list(range(rows)), torch.device("cpu")))
    frequencies = torch.bincount(draws, minlength=5).float() / rows
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0]), atol=0.03, rtol=0)
    assert choose_tokens(batch[:2], GREEDY, None).tolist() == [0, 0]


def test_requests_that_cannot_be_served() -> None:
    model = _model(ParallelState.single())
    with pytest.raises(GenerationError, match="max_new_tokens must be >= 1"):
        generate(model, _prompts(), GenerationConfig(max_new_tokens=0))
    with pytest.raises(GenerationError, match="top_p must be in"):
        generate(model, _prompts(), GenerationConfig(sampling=SamplingConfig(temperature=1.0, top_p=0.0)))
    with pytest.raises(GenerationError, match="max_position_embeddings 4096"):
        generate(model, _prompts(), GenerationConfig(max_new_tokens=4090))
    with pytest.raises(GenerationError, match="other than the image and video tokens"):
        generate(model, _prompts(), GenerationConfig(), pad_id=IMAGE_TOKEN_ID)
    with pytest.raises(GenerationError, match="prompt 0 has no tokens"):
        generate(model, [Prompt([])], GenerationConfig())
    staged = LlavaModel(_model_config(), ParallelState(pp_size=2), post_process=False)
    with pytest.raises(NotImplementedError, match="pipeline-parallel generation is not supported"):
        generate(staged, _prompts(), GenerationConfig())
    context_parallel = LlavaModel(_model_config(), ParallelState(cp_size=2))
    with pytest.raises(GenerationError, match="generation runs at context-parallel size 1 \\(got 2\\)"):
        generate(context_parallel, _prompts(), GenerationConfig())
    cache = KVCache(batch_size=1, max_length=4)
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.layer(0).update(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8))


# ---- two processes: a tp=2 checkpoint, tp=2 vs tp=1 generation, the tool at tp=2 -------------------


def _load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_config(vocab_size: int, image_token_id: int, tokenizer_model: str) -> RunConfig:
    return RunConfig(
        model=_model_config(vocab_size, image_token_id),
        parallel=ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
        training=TrainingConfig(micro_batch_size=1, global_batch_size=2, seq_length=64, mock_data=True,
                                seed=SAVED_SEED, tokenizer_model=tokenizer_model, chat_template="llava_v1"),
    )


def _tp_job(tmp: str, vocab_size: int, image_token_id: int, tool_args: list[str]) -> dict:
    from megamm.checkpoint.checkpointer import Checkpointer
    from megamm.parallel.params import param_specs
    from megamm.parallel.sharding import gather_master
    from megamm.parallel.state import initialize_parallel_state
    from megamm.pipeline.chunks import build_model_chunks
    from megamm.training.step import build_trainer
    from tests.distributed import solo_state

    initialize_parallel_state()
    tp2 = ParallelState.from_groups(tp=2, pp=1, device=torch.device("cpu"))
    tp1 = solo_state()
    config = _run_config(vocab_size, image_token_id, f"{tmp}/tok.model")
    tp2.seed(SAVED_SEED)
    resolved = resolve(config, tp2.world_size)
    chunks = build_model_chunks(resolved, tp2)
    trainer = build_trainer(resolved, tp2, chunks)
    Checkpointer(tp2, resolved, chunks, trainer.optimizer, trainer.scaler, save_dir=f"{tmp}/ckpt",
                 log=lambda _: None).save(1, 2)
    model_config = config.model.for_runtime(torch.float32)
    loaded = {}
    for name, state in (("tp2", tp2), ("tp1", tp1)):
        model = LlavaModel(model_config, state)
        model.initialize(OTHER_SEED)
        load_model_weights(model, f"{tmp}/ckpt", state)
        loaded[name] = model.eval()
    reference = LlavaModel(model_config, tp1)
    reference.initialize(SAVED_SEED)
    expected = dict(reference.named_parameters())
    tp2_specs = param_specs(loaded["tp2"])
    weights_exact = all(
        torch.equal(gather_master(p.detach(), tp2_specs[n].layout, tp2.tp_group), expected[n])
        for n, p in loaded["tp2"].named_parameters()
    ) and all(torch.equal(p, expected[n]) for n, p in loaded["tp1"].named_parameters())
    prompts = _prompts(image_token_id, vocab_size)
    out: dict = {"weights_exact": weights_exact}
    for sampling_name, sampling in (("greedy", GREEDY), ("sampled", SAMPLED)):
        config_ = GenerationConfig(max_new_tokens=8, sampling=sampling, seed=4, return_logits=True)
        for name, model in loaded.items():
            out[f"{name}/{sampling_name}"] = generate(model, prompts, config_)
    # Two data-parallel replicas split the questions; sampled answers must not depend on the split.
    dp2 = ParallelState.from_groups(tp=1, pp=1, device=torch.device("cpu"))
    session = InferenceSession.from_checkpoint(f"{tmp}/ckpt", dp2)
    answers = session.answer(_vqa_pairs(tmp), session.generation_config(max_new_tokens=6, sampling=SAMPLED), batch_size=1)
    out["dp2_sampled_answers"] = [a.text for a in answers]
    # The tool last: it ends the process group when it is done.
    _load_tool("evaluate_vqa").main([*tool_args, "--tensor-model-parallel-size", "2",
                                      "--predictions", f"{tmp}/predictions_tp2.jsonl"])
    return out


def _vqa_pairs(tmp: str | Path) -> list[tuple[str | None, str]]:
    images = Path(tmp) / "images"
    return [(str(images / "red.png"), "What colour is it?"), (str(images / "blue.png"), "What shape is in <image>?"),
            (None, "Say a word.")]


def _write_images(directory: Path) -> None:
    directory.mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(directory / "red.png")
    square = Image.new("RGB", (20, 12), (20, 20, 220))
    square.paste((250, 250, 0), (4, 2, 10, 8))
    square.save(directory / "blue.png")


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.data.test_render_prompt import WORDS
    from tests.data.test_templates import LLAVA_V1_SYSTEM
    from tests.data.test_templates import _load_tool as tokenizer_tool

    pytest.importorskip("sentencepiece")
    tmp = tmp_path_factory.mktemp("generation")
    corpus = tmp / "corpus.txt"
    rng = random.Random(0)
    corpus.write_text("\n".join([LLAVA_V1_SYSTEM, "USER: what colour? ASSISTANT: red.", "blue yellow square"]
                                + [" ".join(rng.choice(WORDS.split()) for _ in range(6)) for _ in range(100)]) + "\n")
    args = ["--input", str(corpus), "--model-prefix", str(tmp / "tok"), "--vocab-size", "120"]
    assert tokenizer_tool().main([*args, "--user-defined-symbols", "<image>,<pad>"]) == 0
    from megamm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tmp / "tok.model")
    _write_images(tmp / "images")
    questions = [
        {"id": "q1", "image": "red.png", "question_type": "color",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "q2", "image": "blue.png", "type": "shape",
         "conversations": [{"from": "human", "value": "What shape is in <image>?"}, {"from": "gpt", "value": "a square"}]},
        {"id": "q3", "image": "blue.png", "question_type": "color",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "q4", "conversations": [{"from": "human", "value": "Say a word."}, {"from": "gpt", "value": "cat"}]},
    ]
    (tmp / "images" / "questions.json").write_text(json.dumps(questions))
    tool_args = ["--load", str(tmp / "ckpt"), "--questions", str(tmp / "images" / "questions.json"),
                 "--tokenizer-model", str(tmp / "tok.model"), "--chat-template", "llava_v1",
                 "--max-new-tokens", "6", "--batch-size", "2", "--device", "cpu"]
    results = run_distributed(_tp_job, 2, str(tmp), tokenizer.vocab_size, tokenizer.image_token_id, tool_args)
    return {"results": results, "tmp": tmp, "tool_args": tool_args, "tokenizer": tokenizer}


def test_checkpoint_weights_load_exactly_at_tp2_and_tp1(tp_run: dict) -> None:
    assert all(rank["weights_exact"] for rank in tp_run["results"])


@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
def test_tp2_generates_the_tokens_of_tp1(tp_run: dict, sampling: str) -> None:
    for rank in tp_run["results"]:
        _assert_same(rank[f"tp2/{sampling}"], rank[f"tp1/{sampling}"])
        assert len({tuple(g.tokens) for g in rank[f"tp2/{sampling}"]}) == 3
    rank0, rank1 = tp_run["results"]
    assert [g.tokens for g in rank0[f"tp2/{sampling}"]] == [g.tokens for g in rank1[f"tp2/{sampling}"]]


def test_data_parallel_answers_equal_one_process(tp_run: dict) -> None:
    session = InferenceSession.from_checkpoint(tp_run["tmp"] / "ckpt")
    answers = session.answer(_vqa_pairs(tp_run["tmp"]), session.generation_config(max_new_tokens=6, sampling=SAMPLED),
                             batch_size=3)
    for rank in tp_run["results"]:
        assert rank["dp2_sampled_answers"] == [a.text for a in answers]
    assert all(a.text for a in answers)


def test_model_weights_mismatch_lists_every_problem(tp_run: dict) -> None:
    tokenizer = tp_run["tokenizer"]
    deeper = LlavaModel(_model_config(tokenizer.vocab_size, tokenizer.image_token_id, layers=3), ParallelState.single())
    with pytest.raises(CheckpointMismatchError, match="missing in the checkpoint: model/language.decoder.layers.2"):
        load_model_weights(deeper, tp_run["tmp"] / "ckpt", ParallelState.single())
    wider = LlavaModel(_model_config(tokenizer.vocab_size + 8, tokenizer.image_token_id), ParallelState.single())
    with pytest.raises(CheckpointMismatchError,
                       match=r"model/language.embedding.weight: checkpoint has shape \[\d+, 64\]"):
        load_model_weights(wider, tp_run["tmp"] / "ckpt", ParallelState.single())
    with pytest.raises(FileNotFoundError, match="no megamm checkpoint"):
        load_model_weights(deeper, tp_run["tmp"] / "images", ParallelState.single())


def test_evaluate_vqa_tool_one_process_equals_tp2(tp_run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    tmp = tp_run["tmp"]
    assert _load_tool("evaluate_vqa").main([*tp_run["tool_args"], "--predictions", str(tmp / "predictions_tp1.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "4 questions" in printed and "exact match:" in printed and "color" in printed and "shape" in printed
    tp1 = [json.loads(line) for line in (tmp / "predictions_tp1.jsonl").read_text().splitlines()]
    tp2 = [json.loads(line) for line in (tmp / "predictions_tp2.jsonl").read_text().splitlines()]
    assert [r["id"] for r in tp1] == ["q1", "q2", "q3", "q4"]
    assert tp1 == tp2
    assert all(r["prediction"] for r in tp1)
    assert _load_tool("evaluate_vqa").main([*tp_run["tool_args"], "--blank-image", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["blank_image"] is True and summary["total"] == 4 and set(summary["by_type"]) == {"(untyped)", "color", "shape"}


def test_generate_tool_answers_pairs_and_files(tp_run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    tmp = tp_run["tmp"]
    # The tokenizer and template come from the checkpoint's run config this time.
    common = ["--load", str(tmp / "ckpt"), "--max-new-tokens", "4", "--device", "cpu"]
    generate_tool = _load_tool("generate")
    assert generate_tool.main([*common, "--image", str(tmp / "images" / "red.png"), "--prompt", "What colour?",
                               "--image", "none", "--prompt", "Say a word."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("red.png] What colour?") and lines[2] == "[no image] Say a word."
    assert lines[1].startswith("  -> ") and lines[3].startswith("  -> ")
    (tmp / "prompts.jsonl").write_text(json.dumps({"image": "images/red.png", "prompt": "What colour?"}) + "\n")
    assert generate_tool.main([*common, "--prompts-file", str(tmp / "prompts.jsonl")]) == 0
    assert capsys.readouterr().out.splitlines()[1] == lines[1]  # the same question, the same answer
    with pytest.raises(SystemExit, match="1 --image/--video for 2 --prompt"):
        generate_tool.main([*common, "--image", "none", "--prompt", "a", "--prompt", "b"])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_native_generation_matches_transformers_generate(family: str, tmp_path: Path) -> None:
    """A Qwen2-VL-family model imported from transformers generates transformers' greedy tokens with
    the KV cache and M-RoPE (prompt positions from megamm.data.mrope, then n + k + delta): two
    prompts of different lengths batched (left padding), one with two images, one with a video."""
    from tests.convert.test_qwen2_vl import build_hf
    from tests.convert.test_roundtrip import save_hf

    hf = build_hf(family, scale=0.5)  # sharp, context-dependent next-token distributions
    summary = import_qwen2_vl_hf(save_hf(hf, tmp_path / "hf"), tmp_path / "ckpt")
    model = LlavaModel(summary.config, ParallelState.single())
    load_model_weights(model, tmp_path / "ckpt", model.state)
    model.eval()
    vision = native_vision_inputs(summary.config)
    a, b, _ = vision["images"]
    video = vision["video"]
    rng = random.Random(5)

    def text(n: int) -> list[int]:
        return [rng.randrange(TEXT_TOKENS) for _ in range(n)]

    def run(token: int, n: int) -> list[int]:
        return [VISION_START, *[token] * n, VISION_END]

    prompts = [
        Prompt([*text(3), *run(NATIVE_IMAGE_TOKEN, a.num_tokens), *text(2), *run(NATIVE_IMAGE_TOKEN, b.num_tokens),
                *text(3)], torch.cat([a.pixel_values, b.pixel_values]), torch.tensor([a.grid_thw, b.grid_thw])),
        Prompt([*text(2), *run(NATIVE_VIDEO_TOKEN, video.num_tokens), *text(2)],
               pixel_values_videos=video.pixel_values, video_grid_thw=torch.tensor([video.grid_thw]),
               video_seconds_per_grid=(video.second_per_grid,)),
    ]
    config = GenerationConfig(max_new_tokens=8)
    ours = [g.tokens for g in generate(model, prompts, config)]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt.input_ids])
        types = (ids == NATIVE_IMAGE_TOKEN).int() + 2 * (ids == NATIVE_VIDEO_TOKEN).int()
        kwargs = {"pixel_values": prompt.pixel_values, "image_grid_thw": prompt.image_grid_thw,
                  "pixel_values_videos": prompt.pixel_values_videos, "video_grid_thw": prompt.video_grid_thw}
        if family == "qwen2_5_vl" and prompt.video_grid_thw is not None:
            kwargs["second_per_grid_ts"] = torch.tensor(prompt.video_seconds_per_grid)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                              max_new_tokens=config.max_new_tokens, do_sample=False,
                              suppress_tokens=[NATIVE_IMAGE_TOKEN, NATIVE_VIDEO_TOKEN],
                              **{k: v for k, v in kwargs.items() if v is not None})
        expected.append(out[0, ids.shape[1]:].tolist())
    assert ours == expected, f"megamm {ours}, transformers {expected}"
    assert all(len(set(tokens)) > 1 for tokens in expected), f"degenerate continuations prove little: {expected}"


def test_session_prompts_a_native_resolution_model(tmp_path: Path) -> None:
    """InferenceSession with a Qwen2-VL model: the prompt is the qwen2_vl rendering with the image's
    own token count, its patches and grid are megamm.data.native_resolution's, and `answer` gives
    what `generate` gives for that prompt."""
    from megamm.data.native_resolution import NativeResolution, preprocess_image
    from megamm.data.native_samples import native_settings
    from megamm.data.templates import render_prompt
    from megamm.data.tokenizer import load_tokenizer
    from megamm.inference.session import DataSettings
    from tests.data.test_qwen_template import CORPUS
    from tests.data_fixtures import write_qwen_tokenizer
    from tests.tiny import qwen2_vl_config

    write_qwen_tokenizer(tmp_path / "tokenizer.json", CORPUS)
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json", image_token="<|image_pad|>", pad_token="<|endoftext|>")
    config = qwen2_vl_config()
    language = replace(config.language, vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_token_id,
                       video_token_id=tokenizer.token_id("<|video_pad|>"),
                       transformer=replace(config.language.transformer, init_method_std=0.5))
    model = LlavaModel(replace(config, language=language), ParallelState.single())
    model.initialize(SAVED_SEED)
    model.eval()
    native = native_settings(config.vision, TrainingConfig())
    session = InferenceSession(model, tokenizer, DataSettings(str(tmp_path / "tokenizer.json"), "qwen2_vl",
                                                              normalization="qwen2_vl", native=native))
    image = Image.fromarray(torch.randint(0, 256, (40, 60, 3), generator=torch.Generator().manual_seed(1),
                                          dtype=torch.uint8).numpy())
    prompt = session.prompt("Describe both pictures.", image)
    expected = preprocess_image(image, NativeResolution(patch_size=4, merge_size=2, temporal_patch_size=2))
    assert expected.num_tokens > 1
    turns = [{"from": "human", "value": "<image>\nDescribe both pictures."}]
    assert prompt.input_ids == render_prompt(turns, "qwen2_vl", tokenizer, [expected.num_tokens]).input_ids
    assert torch.equal(prompt.pixel_values, expected.pixel_values)
    assert prompt.image_grid_thw.tolist() == [list(expected.grid_thw)]
    config = GenerationConfig(max_new_tokens=5)
    (answer,) = session.answer([(image, "Describe both pictures.")], config)
    assert answer.tokens == generate(model, [prompt], config, pad_id=tokenizer.pad_id)[0].tokens


def test_session_prompts_carry_the_tile_tags_training_used(tmp_path: Path) -> None:
    """A run trained with --tile-tags: the session reads the setting from the run config and its
    prompt puts a tag before each tile's image tokens, as the training samples did; the setting with
    another template is refused."""
    from megamm.data.internvl_template import tile_tags
    from megamm.data.templates import template_tokenizer
    from megamm.inference.session import data_settings
    from tests.models.test_internvit import internvl_microbatches
    from tests.tiny import internvl_config

    internvl_microbatches(tmp_path)  # the tokenizer and images 16x16, 40x16, 16x32
    tokenizer = template_tokenizer(tmp_path / "tokenizer.json", "internvl")
    config = internvl_config(vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_token_id)
    training = {"tokenizer_model": str(tmp_path / "tokenizer.json"), "chat_template": "internvl",
                "image_aspect_ratio": "resize", "max_image_tiles": 4, "tile_tags": True}
    settings = data_settings({"training": training}, config)
    assert settings.tile_tags and settings.normalization == "internvit"
    with pytest.raises(ValueError, match="tile tags need the chat template internvl, got 'chatml'"):
        data_settings({"training": {**training, "chat_template": "chatml"}}, config)
    model = LlavaModel(config, ParallelState.single())
    model.initialize(0)
    session = InferenceSession(model, tokenizer, settings)
    prompt = session.prompt("Describe it.", Image.open(tmp_path / "image1.png"))
    tiles = prompt.pixel_values.shape[0]
    tags = [tokenizer.token_id(tag) for tag in tile_tags(tiles)]
    assert tiles == 4 and [token for token in prompt.input_ids if token in tags] == tags
    assert prompt.input_ids.count(tokenizer.image_token_id) == tiles * model.image_tokens_per_image
    (generation,) = generate(model, [prompt], GenerationConfig(max_new_tokens=2))
    assert len(generation.tokens) == 2
