"""Peak resident memory of checkpoint conversion on a ~1B-parameter random LLaVA.

    python bench/bench_convert_memory.py [--work DIR] [--dtype fp32|bf16] [--keep]

Writes a llava-hf directory with random weights (CLIP ViT-L/14-336 tower, a 2048-wide 12-layer
LLaMA-style decoder with GQA, a 32064-token vocabulary: about 1.0 B parameters) shard by shard,
without building the model, then runs `import-hf` and `export-hf` of tools/convert_checkpoint.py,
each in a fresh process that reports its own peak RSS (VmHWM). A conversion that streams
tensor by tensor peaks near the interpreter's baseline plus one tensor (import) or one output shard
(export); one that loads the model would peak at one or two model sizes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from megamm.config.precision import DTYPES

ROOT = Path(__file__).resolve().parents[1]
# The precisions this bench writes (a subset of megamm.config.precision.DTYPES).
WRITTEN_DTYPES = ("fp32", "bf16")

VISION = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
          "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
          "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
TEXT = {"model_type": "llama", "vocab_size": 32064, "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False}


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the llava-hf layout (legacy key spelling), in file order."""
    v, t = VISION, TEXT
    h, f, g = v["hidden_size"], v["intermediate_size"], v["image_size"] // v["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "vision_tower.vision_model.embeddings.class_embedding": (h,),
        "vision_tower.vision_model.embeddings.patch_embedding.weight": (h, 3, v["patch_size"], v["patch_size"]),
        "vision_tower.vision_model.embeddings.position_embedding.weight": (g * g + 1, h),
    }
    for norm in ("pre_layrnorm", "post_layernorm"):
        shapes.update({f"vision_tower.vision_model.{norm}.weight": (h,), f"vision_tower.vision_model.{norm}.bias": (h,)})
    for i in range(v["num_hidden_layers"]):
        p = f"vision_tower.vision_model.encoder.layers.{i}."
        for name, (rows, cols) in {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
                                   "self_attn.out_proj": (h, h), "mlp.fc1": (f, h), "mlp.fc2": (h, f)}.items():
            shapes.update({p + name + ".weight": (rows, cols), p + name + ".bias": (rows,)})
        for norm in ("layer_norm1", "layer_norm2"):
            shapes.update({p + norm + ".weight": (h,), p + norm + ".bias": (h,)})
    d, ffn, vocab = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    kv = d // t["num_attention_heads"] * t["num_key_value_heads"]
    shapes.update({"multi_modal_projector.linear_1.weight": (d, h), "multi_modal_projector.linear_1.bias": (d,),
                   "multi_modal_projector.linear_2.weight": (d, d), "multi_modal_projector.linear_2.bias": (d,),
                   "language_model.model.embed_tokens.weight": (vocab, d)})
    for i in range(t["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
                       p + "mlp.down_proj.weight": (d, ffn), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    shapes.update({"language_model.model.norm.weight": (d,), "language_model.lm_head.weight": (vocab, d)})
    return shapes


def write_llava(directory: Path, dtype: torch.dtype, shard_bytes: int = 1 << 30) -> int:
    """Random weights in safetensors shards of about `shard_bytes`; returns the parameter count."""
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shapes = tensor_shapes()
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for index, names in enumerate(groups, start=1):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=generator) * 0.02).to(dtype) for n in names}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    total = sum(torch.Size(s).numel() for s in shapes.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * dtype.itemsize}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 32000,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
        "vision_config": VISION, "text_config": TEXT}))
    return total


# The process's own peak resident set (VmHWM, KiB). Not ru_maxrss: Linux carries a parent's peak
# into a forked and exec'd child's ru_maxrss, which would report this driver's memory.
PEAK = "peak = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"


def run_child(arguments: list[str]) -> dict:
    """Run the converter in a fresh interpreter that prints its own peak RSS."""
    tool = str(ROOT / "tools" / "convert_checkpoint.py")
    code = (f"import runpy, sys, time; start = time.perf_counter(); "
            f"code = runpy.run_path({tool!r}, run_name='converter')['main'](sys.argv[1:]); {PEAK}; "
            f"print('PEAK', peak, time.perf_counter() - start, code)")
    result = subprocess.run([sys.executable, "-c", code, *arguments], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    peak = [line for line in result.stdout.splitlines() if line.startswith("PEAK")]
    if result.returncode or not peak or not peak[0].endswith(" 0"):
        raise RuntimeError(f"conversion failed:\n{result.stdout}\n{result.stderr}")
    _, kib, seconds, _ = peak[0].split()
    return {"peak_rss_gib": int(kib) / 2**20, "seconds": float(seconds)}


def baseline() -> float:
    """Peak RSS of an interpreter that imports what the converter imports, and converts nothing."""
    code = ("import transformers, megamm.convert.exporter, megamm.convert.importer; "
            f"from transformers import AutoConfig, LlavaForConditionalGeneration; {PEAK}; print(peak)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--dtype", choices=WRITTEN_DTYPES, default="fp32")
    parser.add_argument("--keep", action="store_true", help="keep the scratch files")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="megamm-convert-bench-"))
    try:
        started = time.perf_counter()
        params = write_llava(work / "hf", DTYPES[args.dtype])
        model_gib = params * DTYPES[args.dtype].itemsize / 2**30
        print(f"random llava-hf model: {params / 1e9:.3f} B parameters, {model_gib:.2f} GiB ({args.dtype}), "
              f"written in {time.perf_counter() - started:.1f} s")
        print(f"interpreter + imports baseline: peak RSS {baseline():.2f} GiB")
        imported = run_child(["import-hf", "--llava", str(work / "hf"), "--save", str(work / "ckpt"),
                              "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "4"])
        print(f"import-hf: peak RSS {imported['peak_rss_gib']:.2f} GiB ({imported['peak_rss_gib'] / model_gib:.2f} x "
              f"the model), {imported['seconds']:.1f} s")
        exported = run_child(["export-hf", "--load", str(work / "ckpt"), "--out", str(work / "out"),
                              "--max-shard-size", "1GB"])
        print(f"export-hf (1 GiB shards): peak RSS {exported['peak_rss_gib']:.2f} GiB "
              f"({exported['peak_rss_gib'] / model_gib:.2f} x the model), {exported['seconds']:.1f} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
