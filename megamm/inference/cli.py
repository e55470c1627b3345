"""What tools/generate.py and tools/evaluate_vqa.py share: flags, process setup, the session.

One process (`python tools/generate.py ...`) runs with tensor-parallel size 1 and no
`torch.distributed`; under torchrun (`torchrun --nproc-per-node N tools/generate.py ...
--tensor-model-parallel-size T`) the N processes form N/T data-parallel replicas of T
tensor-parallel ranks each. Only the first process prints.
"""

from __future__ import annotations

import argparse
import os

import torch

from megamm.config.precision import DTYPES
from megamm.config.registry import CHAT_TEMPLATES, VISION_TOWERS
from megamm.inference.generation import GenerationConfig
from megamm.inference.sampling import SamplingConfig
from megamm.inference.session import InferenceSession
from megamm.parallel.state import ParallelState, initialize_parallel_state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint, data-setting, sampling and layout flags."""
    model = parser.add_argument_group("model")
    model.add_argument("--load", required=True, help="a checkpoint directory, or a --save directory with `latest`")
    model.add_argument("--dtype", choices=sorted(DTYPES), help="parameter dtype (default: what the run trained in)")
    model.add_argument("--tensor-model-parallel-size", type=int, default=1, help="tp ranks (torchrun processes per replica)")
    model.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    data = parser.add_argument_group("inputs (default: the checkpoint's training settings)")
    data.add_argument("--tokenizer-model", help="sentencepiece .model or tokenizer.json")
    data.add_argument("--chat-template", help=", ".join(CHAT_TEMPLATES.names())
                      + " (a Qwen2-VL-family checkpoint: qwen2_vl, the default)")
    data.add_argument("--image-aspect-ratio", choices=("pad", "crop", "resize"), help="image preprocessing mode")
    data.add_argument("--image-normalization", choices=VISION_TOWERS.names(),
                      help="pixel statistics of this vision tower family")
    data.add_argument("--max-image-tiles", type=int, help="1: one image input; more: tiles + thumbnail")
    data.add_argument("--image-root", help="directory image paths are relative to (and must stay inside)")
    data.add_argument("--blank-image", action="store_true",
                      help="replace every image by a uniform mean-colour image (the no-vision baseline)")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per answer")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set reaching this mass")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (question i uses seed + i)")
    gen.add_argument("--batch-size", type=int, default=8, help="questions per forward on one replica")


def setup_state(args: argparse.Namespace) -> ParallelState:
    """This process's parallel state: torchrun's environment if present, else a single process."""
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    tp = args.tensor_model_parallel_size
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return initialize_parallel_state(tp, 1, use_cuda=use_cuda)
    if tp != 1:
        raise SystemExit(f"--tensor-model-parallel-size {tp} needs torchrun --nproc-per-node {tp}")
    return ParallelState.single("cuda" if use_cuda else "cpu")


def open_session(args: argparse.Namespace, state: ParallelState) -> InferenceSession:
    return InferenceSession.from_checkpoint(
        args.load, state, dtype=args.dtype, tokenizer_model=args.tokenizer_model,
        chat_template=args.chat_template, image_aspect_ratio=args.image_aspect_ratio,
        normalization=args.image_normalization, max_image_tiles=args.max_image_tiles,
    )


def generation_config(args: argparse.Namespace, session: InferenceSession) -> GenerationConfig:
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    config = session.generation_config(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
    problems = config.problems()
    if problems:
        raise SystemExit("invalid generation settings: " + "; ".join(problems))
    return config


def is_first_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
