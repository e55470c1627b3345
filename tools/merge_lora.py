"""LoRA checkpoints: merge them into their base, and exchange adapters with Hugging Face PEFT.

    # adapters + base -> a plain megamm checkpoint (then export-hf writes the merged Hugging Face model)
    python tools/merge_lora.py merge --load runs/lora --save ckpt/merged [--pretrained-checkpoint ckpt/base]
    python tools/convert_checkpoint.py export-hf --load ckpt/merged --out merged-hf

    # adapters -> a PEFT adapter directory for the base's Hugging Face export
    python tools/convert_checkpoint.py export-hf --load ckpt/base --out base-hf
    python tools/merge_lora.py export-peft --load runs/lora --out lora-peft
    #   PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained("base-hf"), "lora-peft")
    # a Qwen2-VL-family base: --architecture qwen2-vl-hf (qwen2.5-vl-hf) for both, as for export-hf

    # a PEFT adapter trained elsewhere (on the Hugging Face form of ckpt/base) -> a megamm LoRA checkpoint
    python tools/merge_lora.py import-peft --peft lora-peft --pretrained-checkpoint ckpt/base --save runs/imported

A LoRA run's checkpoint names its base (`--pretrained-checkpoint` of the run); `merge` takes it
from there unless given. The imported checkpoint resumes training with `--load runs/imported
--no-load-optim --pretrained-checkpoint ckpt/base` and the LoRA flags it records, or merges like a
trained one. Everything runs in one process on the CPU; see docs/conversion.md ("PEFT adapters").
"""

from __future__ import annotations

import argparse
import sys

from megamm.convert import ConversionError
from megamm.convert.importer import EXPORT_ARCHITECTURES
from megamm.convert.lora_merge import merge_adapters
from megamm.convert.peft import export_peft, import_peft


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="merge_lora.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="fold the adapters into the base: a plain megamm checkpoint")
    merge.add_argument("--load", required=True, help="the LoRA run's checkpoint (or its --save directory)")
    merge.add_argument("--save", required=True, help="new directory for the merged checkpoint")
    merge.add_argument("--pretrained-checkpoint", help="the base (default: the one the LoRA checkpoint names)")
    merge.add_argument("--no-verify-checkpoint", action="store_true", help="skip the checksum check of the reads")
    export = commands.add_parser("export-peft", help="write the adapters as a PEFT adapter directory")
    export.add_argument("--load", required=True, help="the LoRA run's checkpoint (or its --save directory)")
    export.add_argument("--out", required=True, help="new directory: adapter_config.json, adapter_model.safetensors")
    imported = commands.add_parser("import-peft", help="read a PEFT adapter directory into a megamm LoRA checkpoint")
    imported.add_argument("--peft", required=True, help="PEFT adapter directory (adapter_config.json + safetensors)")
    imported.add_argument("--pretrained-checkpoint", required=True, help="the megamm base the adapter was trained on")
    imported.add_argument("--save", required=True, help="new directory for the megamm LoRA checkpoint")
    for command in (export, imported):
        command.add_argument("--architecture", choices=EXPORT_ARCHITECTURES, default="llava-hf",
                             help="the Hugging Face layout of the model the adapter is for, as export-hf's "
                                  "(default llava-hf)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "merge":
            path = merge_adapters(args.load, args.save, args.pretrained_checkpoint, not args.no_verify_checkpoint)
        elif args.command == "export-peft":
            path = export_peft(args.load, args.out, args.architecture)
        else:
            path = import_peft(args.peft, args.pretrained_checkpoint, args.save, args.architecture)
    except (ConversionError, OSError, ValueError, RuntimeError) as error:
        print(f"merge_lora: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
