"""Convert checkpoints between Hugging Face (and original LLaVA / Meta LLaMA) weights and megamm.

    # a llava-hf LlavaForConditionalGeneration or LlavaNextForConditionalGeneration directory (either key spelling)
    python tools/convert_checkpoint.py import-hf --llava llava-1.5-7b-hf --save ckpt/llava \\
        --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2
    # separate towers (the projector starts from the training run's --seed); --text: LLaMA, Mistral, Qwen2
    python tools/convert_checkpoint.py import-hf --vision clip-vit-large-patch14-336 --text vicuna-7b-v1.5 \\
        --save ckpt/stage0 --projector-type mlp2x_gelu --vision-feature-layer -2 --pad-token-id 32001
    python tools/convert_checkpoint.py import-hf --vision siglip-so400m-patch14-384 --text Qwen2-0.5B \\
        --save ckpt/qwen --vision-feature-select-strategy full
    # original LLaVA (model.mm_projector) with its CLIP tower
    python tools/convert_checkpoint.py import-hf --original-llava llava-v1.5-7b --vision clip-vit-large-patch14-336 \\
        --save ckpt/llava
    # Qwen2-VL / Qwen2.5-VL (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    python tools/convert_checkpoint.py import-hf --qwen2-vl Qwen2-VL-7B-Instruct --save ckpt/qwen2vl
    # InternVL (InternVLForConditionalGeneration, e.g. InternVL3-1B-hf)
    python tools/convert_checkpoint.py import-hf --internvl InternVL3-1B-hf --save ckpt/internvl
    # back to Hugging Face
    python tools/convert_checkpoint.py export-hf --load ckpt/run --out llava-hf-out --tokenizer llava-1.5-7b-hf
    python tools/convert_checkpoint.py export-hf --load ckpt/qwen2vl --out qwen2vl-out --architecture qwen2-vl-hf
    python tools/convert_checkpoint.py export-hf --load ckpt/internvl --out internvl-out --architecture internvl-hf

Conversion runs on one process whatever the target layout: the checkpoint holds global tensors
that any --tensor-model-parallel-size / --pipeline-model-parallel-size loads (the sizes given here
are the ones the model is validated for and recorded with). Start training from an imported
checkpoint with `--load DIR --no-load-optim` (or `--finetune`). See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import re
import sys

from megamm.config import ProjectorConfig
from megamm.config.precision import DTYPES
from megamm.config.registry import PROJECTORS
from megamm.convert import ConversionError
from megamm.convert.exporter import KEY_STYLES, export_hf
from megamm.convert.importer import (
    EXPORT_ARCHITECTURES,
    QWEN2_VL_ADAPTERS,
    Summary,
    import_internvl_hf,
    import_llava_hf,
    import_original_llava,
    import_qwen2_vl_hf,
    import_towers,
)

TOWER_ONLY = ("projector_type", "vision_feature_layer", "vision_feature_select_strategy", "max_position_embeddings")
NEW_TOKENS = ("image_token_id", "pad_token_id", "vocab_multiple")


def _size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B)", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 500MB or 5GB")
    return int(float(match.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[match.group(2)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    imp = commands.add_parser("import-hf", help="Hugging Face / original LLaVA / Meta LLaMA -> megamm checkpoint",
                              description="Write a megamm checkpoint (iteration 0, no optimizer state) from a llava-hf "
                                          "directory, an original LLaVA directory + its vision tower, or a CLIP/SigLIP "
                                          "directory + a LLaMA/Mistral/Qwen2 directory (Hugging Face, or Meta format).")
    source = imp.add_argument_group("source (one of: --llava; --qwen2-vl; --internvl; --vision and --text; "
                                    "--original-llava and --vision)")
    source.add_argument("--llava", metavar="DIR", help="llava-hf LlavaForConditionalGeneration or "
                                                       "LlavaNextForConditionalGeneration or "
                                                       "LlavaOnevisionForConditionalGeneration directory")
    source.add_argument("--qwen2-vl", metavar="DIR", help="Qwen2VLForConditionalGeneration or "
                                                          "Qwen2_5_VLForConditionalGeneration directory")
    source.add_argument("--internvl", metavar="DIR", help="InternVLForConditionalGeneration directory")
    source.add_argument("--original-llava", metavar="DIR", help="original LLaVA directory (model.mm_projector)")
    source.add_argument("--vision", metavar="DIR", help="CLIP or SigLIP directory (vision model or full model)")
    source.add_argument("--text", metavar="DIR", help="causal LM directory (LLaMA, Mistral, Qwen2): Hugging Face "
                                                      "(config.json), or Meta for LLaMA (params.json + "
                                                      "consolidated.*.pth)")
    imp.add_argument("--save", required=True, metavar="DIR", help="megamm save directory (gets iter_0000000 and latest)")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1, metavar="T",
                     help="validate the model for this tensor-parallel size (default 1)")
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1, metavar="P",
                     help="validate the model for this many pipeline stages (default 1)")
    imp.add_argument("--dtype", choices=sorted(DTYPES), help="store tensors in this dtype (default: as in the source)")
    towers = imp.add_argument_group("separate towers (--vision with --text)")
    towers.add_argument("--projector-type", choices=PROJECTORS.names(), help="default mlp2x_gelu")
    towers.add_argument("--vision-feature-layer", type=int, help="hidden state fed to the projector (default -2)")
    towers.add_argument("--vision-feature-select-strategy", choices=("default", "full"),
                        help="default: drop the class token; full: keep every token (default: default)")
    towers.add_argument("--max-position-embeddings", type=int,
                        help="Meta-format text weights only: longest sequence (params.json has none; default 4096)")
    tokens = imp.add_argument_group("new tokens (--text or --original-llava: the text model has no image token)")
    tokens.add_argument("--image-token-id", type=int, help="id of the image token (default: the text vocabulary size)")
    tokens.add_argument("--pad-token-id", type=int, help="add a pad token with this id (default: none)")
    tokens.add_argument("--vocab-multiple", type=int, help="pad the vocabulary to a multiple of this (default 64)")

    exp = commands.add_parser("export-hf", help="megamm checkpoint -> Hugging Face directory",
                              description="Write a megamm checkpoint (any layout) as a Hugging Face "
                                          "LlavaForConditionalGeneration directory, or in the layout "
                                          "--architecture names.")
    exp.add_argument("--load", required=True, metavar="DIR", help="a megamm checkpoint or save directory with latest")
    exp.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    exp.add_argument("--tokenizer", metavar="DIR", help="copy tokenizer / processor files from this directory")
    exp.add_argument("--dtype", choices=sorted(DTYPES), help="write tensors in this dtype (default: as saved)")
    exp.add_argument("--max-shard-size", type=_size, default=5 * 2**30, metavar="SIZE",
                     help="largest safetensors shard, e.g. 2GB (default 5GB)")
    exp.add_argument("--key-style", choices=KEY_STYLES, default="legacy",
                     help="legacy: the published llava-hf spelling (language_model.model.*), read by every "
                          "transformers >= 4.46; installed: the installed transformers' own names (default legacy)")
    exp.add_argument("--pad-token-id", type=int, help="pad_token_id for config.json (default: the imported one)")
    exp.add_argument("--architecture", choices=EXPORT_ARCHITECTURES, default="llava-hf",
                     help="the Hugging Face layout to write: llava-hf (LlavaForConditionalGeneration), "
                          "llava-next-hf (LlavaNextForConditionalGeneration), "
                          "llava-onevision-hf (LlavaOnevisionForConditionalGeneration), "
                          f"{' / '.join(QWEN2_VL_ADAPTERS)} (Qwen2-VL / Qwen2.5-VL), internvl-hf "
                          "(InternVLForConditionalGeneration) (default llava-hf)")
    return parser


def _check_import_args(args: argparse.Namespace) -> str:
    """The source mode; raises ConversionError for a combination that does not fit it."""
    sources = [name for name in ("llava", "qwen2_vl", "internvl", "original_llava", "vision", "text")
               if getattr(args, name)]
    if sources == ["llava"]:
        mode = "llava"
    elif sources == ["qwen2_vl"]:
        mode = "qwen2_vl"
    elif sources == ["internvl"]:
        mode = "internvl"
    elif sorted(sources) == ["original_llava", "vision"]:
        mode = "original"
    elif sorted(sources) == ["text", "vision"]:
        mode = "towers"
    else:
        raise ConversionError("give one source: --llava DIR; or --qwen2-vl DIR; or --internvl DIR; or --vision DIR "
                              "--text DIR; or --original-llava DIR --vision DIR")
    given = {name for name in TOWER_ONLY + NEW_TOKENS if getattr(args, name) is not None}
    allowed = set(TOWER_ONLY + NEW_TOKENS) if mode == "towers" else set(NEW_TOKENS) if mode == "original" else set()
    wrong = sorted(given - allowed)
    if wrong:
        flags = ", ".join("--" + name.replace("_", "-") for name in wrong)
        raise ConversionError(f"{flags} do not apply to this source (the source's own config decides)")
    if min(args.tensor_model_parallel_size, args.pipeline_model_parallel_size) < 1:
        raise ConversionError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    return mode


def _import(args: argparse.Namespace) -> Summary:
    mode = _check_import_args(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    tokens = {"image_token_id": args.image_token_id, "pad_token_id": args.pad_token_id,
              "vocab_multiple": args.vocab_multiple or 64}
    if mode == "llava":
        return import_llava_hf(args.llava, args.save, tp, pp, args.dtype)
    if mode == "qwen2_vl":
        return import_qwen2_vl_hf(args.qwen2_vl, args.save, tp, pp, args.dtype)
    if mode == "internvl":
        return import_internvl_hf(args.internvl, args.save, tp, pp, args.dtype)
    if mode == "original":
        return import_original_llava(args.original_llava, args.vision, args.save, tp, pp, dtype=args.dtype, **tokens)
    return import_towers(
        args.vision, args.text, args.save, tp, pp,
        projector=ProjectorConfig(type=args.projector_type or "mlp2x_gelu"),
        select_layer=-2 if args.vision_feature_layer is None else args.vision_feature_layer,
        keep_class_token=args.vision_feature_select_strategy == "full",
        max_position_embeddings=args.max_position_embeddings or 4096, dtype=args.dtype, **tokens,
    )


def _print_import(summary: Summary) -> None:
    config = summary.config
    print(f"wrote {summary.path}: {summary.tensors} tensors, {summary.parameters / 1e9:.3f} B parameters")
    print(f"  vision {config.vision.transformer.num_layers} layers x {config.vision.transformer.hidden_size}, "
          f"language {config.language.transformer.num_layers} layers x {config.language.transformer.hidden_size}, "
          f"vocab {config.language.vocab_size} (image token {config.language.image_token_id})")
    if summary.added_tokens:
        print("  new tokens (rows = mean of the text rows): "
              + ", ".join(f"{k} {v}" for k, v in summary.added_tokens.items()))
    if summary.fresh_projector:
        print("  no projector in the sources: a run loading this checkpoint initializes it from --seed")
    if summary.kept_aside:
        print(f"  kept for export (not on LLaVA's path): {', '.join(summary.kept_aside)}")
    if summary.skipped:
        print(f"  not part of a LLaVA model, not converted: {', '.join(summary.skipped)}")
    print(f"  train from it with --load {summary.path.parent} --no-load-optim (or --finetune)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "import-hf":
            _print_import(_import(args))
        else:
            summary = export_hf(args.load, args.out, args.tokenizer, args.dtype, args.max_shard_size,
                                args.key_style, args.pad_token_id, args.architecture)
            print(f"wrote {summary.path}: {summary.tensors} tensors in {summary.shards} safetensors shard(s), "
                  f"{summary.bytes / 2**20:.1f} MiB")
            if summary.filled:
                print(f"  not in megamm, written as an identity LayerNorm (unused by LLaVA): {', '.join(summary.filled)}")
            if summary.copied:
                print(f"  copied {', '.join(summary.copied)}")
    except (ConversionError, OSError) as error:
        print(f"convert_checkpoint: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
