"""LoRA / DoRA settings: which layers get low-rank adapters, their rank, scale and dropout.

Target names (`--lora-target-modules`, comma- or space-separated):

- the decoder's projections under the names of Hugging Face LLaMA-style checkpoints and PEFT:
  `q_proj`, `k_proj`, `v_proj` (parts of megamm's fused `self_attention.qkv`), `o_proj`
  (`self_attention.proj`), `gate_proj`, `up_proj` (parts of the fused SwiGLU `mlp.fc1`) and
  `down_proj` (`mlp.fc2`). A fused layer gets one adapter per targeted part, so a PEFT adapter of
  q_proj alone, or of q, k and v with separate A matrices, maps onto it exactly;
- `projector`: every linear layer of the projector (of a native-resolution tower, the Qwen2-VL
  family: its patch merger, `vision.merger`, which is that model's projector);
- `vision`: every linear layer of the vision tower's transformer layers (attention and MLP).

The table below is data (module-name suffix, fused part): the config layer validates names against
it and `megamm.models.lora` finds the layers with it, so both read one statement of the names.
"""

from __future__ import annotations

from dataclasses import dataclass

# Decoder targets: name -> (module path below a decoder layer, fused part index or None = whole).
LANGUAGE_TARGETS: dict[str, tuple[str, int | None]] = {
    "q_proj": ("self_attention.qkv", 0),
    "k_proj": ("self_attention.qkv", 1),
    "v_proj": ("self_attention.qkv", 2),
    "o_proj": ("self_attention.proj", None),
    "gate_proj": ("mlp.fc1", 0),
    "up_proj": ("mlp.fc1", 1),
    "down_proj": ("mlp.fc2", None),
}
# Whole-part targets: name -> the submodules (names in LlavaModel) whose every linear layer gets an
# adapter. The target's name is also the model part it freezes (megamm.config.run.training_model_config):
# a native tower's merger follows the projector's freeze flag (LlavaModel.apply_freeze), so it is
# the projector here too.
PART_TARGETS: dict[str, tuple[str, ...]] = {"projector": ("projector", "vision.merger"), "vision": ("vision.encoder",)}
TARGET_NAMES = (*LANGUAGE_TARGETS, *PART_TARGETS)
# QLoRA's recommendation, and what `--lora-rank` alone gives: every linear layer of the decoder.
DEFAULT_TARGETS = tuple(LANGUAGE_TARGETS)


@dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r), dropout on the adapter's input, the target
    names (megamm.config.lora.TARGET_NAMES) and DoRA (a learned magnitude per output feature)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    dora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def parts(self) -> frozenset[str]:
        """The model parts ("language", "projector", "vision") that hold a target (unknown names,
        reported by `target_problems`, hold none)."""
        return frozenset("language" if name in LANGUAGE_TARGETS else name
                         for name in self.targets if name in TARGET_NAMES)


def split_targets(values: list[str] | None) -> tuple[str, ...]:
    """`--lora-target-modules q_proj,v_proj o_proj` -> ("q_proj", "v_proj", "o_proj"); None -> the default."""
    if values is None:
        return DEFAULT_TARGETS
    return tuple(dict.fromkeys(name.strip() for value in values for name in value.split(",") if name.strip()))


def target_problems(targets: tuple[str, ...], gated_language_mlp: bool) -> list[str]:
    """Unknown target names, none at all, and SwiGLU parts asked of a decoder without a gated MLP."""
    found = []
    unknown = [name for name in targets if name not in TARGET_NAMES]
    if unknown:
        found.append(f"--lora-target-modules: unknown {', '.join(map(repr, unknown))}; "
                     f"known: {', '.join(TARGET_NAMES)}")
    if not targets:
        found.append("--lora-target-modules names no module")
    if not gated_language_mlp and {"gate_proj", "up_proj"} & set(targets):
        found.append("--lora-target-modules: gate_proj / up_proj are parts of a SwiGLU MLP; this decoder's "
                     "MLP is not gated (model.language.transformer.activation)")
    return found


def number_problems(rank: int, alpha: float, dropout: float) -> list[str]:
    found = []
    if rank < 1:
        found.append(f"--lora-rank must be >= 1, got {rank}")
    if not alpha > 0:
        found.append(f"--lora-alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        found.append(f"--lora-dropout must be in [0, 1), got {dropout}")
    return found
