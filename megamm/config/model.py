"""Model configuration: small dataclasses, validated together, every violation listed at once.

One `TransformerConfig` describes a stack of pre-norm transformer layers; the vision tower and the
language model each hold one. `ParallelConfig` holds the sizes that constrain it (heads % tp, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch

from megamm.config.anyres import AnyResConfig
from megamm.config.registry import LANGUAGE_MODELS, PROJECTORS, VISION_TOWERS
from megamm.config.unparsed import gather

Normalization = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "gelu_tanh", "quick_gelu", "swiglu"]
# The vision tower learns a position table, the language model rotates (rope); nothing else is built.
PositionEmbedding = Literal["rope", "learned"]
Recompute = Literal["none", "full", "selective"]
AttentionBackend = Literal["sdpa", "unfused"]
# Pixel shuffle merges each PIXEL_SHUFFLE_BLOCK x PIXEL_SHUFFLE_BLOCK block of patches into one token.
PIXEL_SHUFFLE_BLOCK = 2
# M-RoPE's position axes: temporal, height, width.
MROPE_AXES = 3


class ConfigError(ValueError):
    """Raised with every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Split norms, dropout and residual adds along the sequence across tp ranks (needs tp > 1 to
    # have an effect); saves activation memory at the cost of nothing but the same collectives.
    sequence_parallel: bool = False
    # Context parallelism: ranks that split each sequence (ring attention over them, images encoded
    # in shares; megamm.parallel.context). Every rank of a cp group reads the same samples.
    context_parallel_size: int = 1
    # How long a collective waits for a peer before the job fails instead of hanging.
    distributed_timeout_minutes: float = 10.0
    # Interleaved pipeline: language layers per model chunk (virtual stage); None = one chunk.
    num_layers_per_virtual_pipeline_stage: int | None = None
    # Uneven pipeline split: language layers on the first / last stage (the rest split evenly).
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None

    @property
    def sequence_parallel_in_effect(self) -> bool:
        """Sequence parallelism splits the sequence over tp ranks: with one rank there is nothing to split."""
        return self.sequence_parallel and self.tensor_model_parallel_size > 1

    @property
    def ranks_per_replica(self) -> int:
        """tp x cp x pp: the ranks one data-parallel replica spans."""
        return self.tensor_model_parallel_size * self.context_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """Model replicas in a world of `world_size` processes (0 when the sizes do not fit)."""
        ranks = self.ranks_per_replica
        return world_size // ranks if ranks > 0 else 0

    def sequence_split_problems(self, seq_length: int) -> list[str]:
        """The splits of a `seq_length` sequence: over cp into 2 x cp equal chunks (the causal load
        balance, megamm.parallel.context), and each rank's share over tp under sequence parallelism."""
        cp, tp = self.context_parallel_size, self.tensor_model_parallel_size
        if cp < 1 or tp < 1:
            return []
        if cp > 1 and seq_length % (2 * cp):
            return [(f"sequence length {seq_length} not divisible by 2 x context-parallel size {cp} = {2 * cp} "
                     "(each rank holds two of 2 x cp equal chunks)")]
        share = seq_length // cp
        if self.sequence_parallel_in_effect and share % tp:
            per_rank = f"each context-parallel rank's {share} tokens" if cp > 1 else f"sequence length {seq_length}"
            return [f"{per_rank} not divisible by tensor-model-parallel size {tp} (sequence parallel)"]
        return []


@dataclass
class TransformerConfig:
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    # GQA: number of key/value heads; None means one per attention head (plain multi-head).
    num_query_groups: int | None = None
    # Per-head width; None means hidden_size // num_attention_heads.
    kv_channels: int | None = None
    normalization: Normalization = "rmsnorm"
    norm_epsilon: float = 1e-5
    activation: Activation = "swiglu"
    # Biases on every linear layer (CLIP/SigLIP: yes, LLaMA: no) and on QKV alone (Qwen-style).
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    position_embedding: PositionEmbedding = "rope"
    rotary_base: float = 10000.0
    # The longest sequence the positions cover: the language model's --seq-length and prompt plus
    # generated tokens must fit; the ViT's patch sequence must fit (its learned table has exactly
    # vision.seq_length rows, the table Hugging Face's CLIP/SigLIP store).
    max_position_embeddings: int = 4096
    causal: bool = True
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # sdpa: F.scaled_dot_product_attention (flash/efficient kernels on GPU). unfused: q k^T, the
    # scaled masked softmax op of megamm.kernels, then v (a debugging and comparison path).
    attention_backend: AttentionBackend = "sdpa"
    init_method_std: float = 0.02
    # Set by the process that builds the model (training flags, or generation's --dtype), never by
    # the model section: `set_by` names the flag; megamm.config.parsing rejects them in a YAML file
    # and leaves them out of a saved config.
    # full: recompute whole layers in backward; selective: only the attention core (softmax(QK)V).
    recompute: Recompute = field(default="none", metadata={"set_by": "--recompute-granularity"})
    # With recompute="full": how many layers (counted from the first) recompute; None = all.
    recompute_num_layers: int | None = field(default=None, metadata={"set_by": "--recompute-num-layers"})
    params_dtype: torch.dtype = field(default=torch.float32, metadata={"set_by": "--bf16 / --fp16"})

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def problems(self, parallel: ParallelConfig, name: str) -> list[str]:
        tp = parallel.tensor_model_parallel_size
        found = []
        positive = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size")
        for attr in positive:
            if getattr(self, attr) < 1:
                found.append(f"{name}.{attr} must be >= 1, got {getattr(self, attr)}")
        if found:
            return found
        heads, groups = self.num_attention_heads, self.query_groups
        if self.kv_channels is None and self.hidden_size % heads:
            found.append(f"{name}.hidden_size {self.hidden_size} not divisible by num_attention_heads {heads}")
        if heads % groups:
            found.append(f"{name}.num_attention_heads {heads} not divisible by num_query_groups {groups}")
        if heads % tp:
            found.append(f"{name}.num_attention_heads {heads} not divisible by tensor-model-parallel size {tp}")
        if groups % tp:
            found.append(f"{name}.num_query_groups {groups} not divisible by tensor-model-parallel size {tp}")
        if self.ffn_hidden_size % tp:
            found.append(f"{name}.ffn_hidden_size {self.ffn_hidden_size} not divisible by tensor-model-parallel size {tp}")
        if self.position_embedding == "rope" and self.head_dim % 2:
            found.append(f"{name}: rope needs an even head dimension, got {self.head_dim}")
        for attr in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, attr) < 1.0:
                found.append(f"{name}.{attr} must be in [0, 1), got {getattr(self, attr)}")
        if self.recompute_num_layers is not None and not 0 <= self.recompute_num_layers <= self.num_layers:
            found.append(f"{name}.recompute_num_layers {self.recompute_num_layers} not in [0, {self.num_layers}]")
        if self.recompute_num_layers is not None and self.recompute != "full":
            found.append(f"{name}.recompute_num_layers is only used with recompute='full'")
        return found


@dataclass
class NativeResolutionConfig:
    """What a native-resolution tower (the Qwen2-VL family) adds to a ViT: no fixed image size.

    Images arrive as flattened patches of `temporal_patch_size` frames x patch x patch pixels with
    a `(t, h, w)` grid each (megamm.data.native_resolution); positions are 2D rotary angles over
    (h, w); each `spatial_merge_size` x `spatial_merge_size` block of patches is merged into one
    output token of width `out_hidden_size`. `window_size` (pixels, None: no windows, Qwen2-VL)
    makes every layer outside `fullatt_block_indexes` attend within windows of that many pixels.
    `merger_norm_epsilon` is the merger's own norm epsilon (1e-6 in both Hugging Face towers).
    `tokens_per_second` (Qwen2.5-VL; None: Qwen2-VL) scales a video's temporal M-RoPE positions to
    seconds (megamm.data.mrope); the tower does not use it, the positions the data pipeline computes do.
    """

    out_hidden_size: int
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int | None = None
    fullatt_block_indexes: tuple[int, ...] = ()
    merger_norm_epsilon: float = 1e-6
    tokens_per_second: int | None = None

    @property
    def merge_unit(self) -> int:
        """Patches merged into one output token."""
        return self.spatial_merge_size**2

    def window_merged_size(self, patch_size: int) -> int | None:
        """A window's side in merged tokens, floored as Hugging Face does (None: no window attention)."""
        if self.window_size is None:
            return None
        return self.window_size // self.spatial_merge_size // patch_size

    def problems(self, patch_size: int, num_layers: int) -> list[str]:
        where = "vision.native_resolution"
        found = []
        for attr in ("out_hidden_size", "temporal_patch_size", "spatial_merge_size"):
            if getattr(self, attr) < 1:
                found.append(f"{where}.{attr} must be >= 1, got {getattr(self, attr)}")
        if found:
            return found
        if self.tokens_per_second is not None and self.tokens_per_second <= 0:
            found.append(f"{where}.tokens_per_second must be > 0, got {self.tokens_per_second}")
        if self.window_size is not None and self.window_merged_size(patch_size) < 1:
            found.append(f"{where}.window_size {self.window_size} must cover at least one merged token "
                         f"(patch_size x spatial_merge_size = {patch_size * self.spatial_merge_size} pixels)")
        outside = [i for i in self.fullatt_block_indexes if not 0 <= i < num_layers]
        if outside:
            found.append(f"{where}.fullatt_block_indexes {outside} out of range for {num_layers} layers")
        if self.tokens_per_second is not None and not self.tokens_per_second > 0:
            found.append(f"{where}.tokens_per_second must be positive (or null), got {self.tokens_per_second}")
        if self.fullatt_block_indexes and self.window_size is None:
            found.append(f"{where}.fullatt_block_indexes needs window_size (without windows every layer is full)")
        return found


@dataclass
class InternViTConfig:
    """What an InternViT tower (InternVL's vision encoder) adds to the ViT layer.

    Each layer scales its attention and MLP outputs by learned per-channel vectors (layer scale,
    `lambda_1` / `lambda_2`, initialized to `layer_scale_init`) before the residual adds; `qk_norm`
    RMS-normalizes the query and key projections over their full width (all heads, before the head
    split, eps `qk_norm_epsilon`); `qkv_bias` is transformers' `attention_bias` (the output projection
    and the MLP always have biases). The tower module is megamm.models.internvit.
    """

    qk_norm: bool = False
    qk_norm_epsilon: float = 1e-6
    qkv_bias: bool = True
    layer_scale_init: float = 0.1

    def problems(self, transformer: TransformerConfig) -> list[str]:
        found = []
        if self.qk_norm_epsilon <= 0:
            found.append(f"vision.intern_vit.qk_norm_epsilon must be > 0, got {self.qk_norm_epsilon}")
        if not transformer.add_bias_linear:
            found.append("vision.transformer.add_bias_linear: an InternViT tower has biases on its output "
                         "projection and MLP (vision.intern_vit.qkv_bias sets the q/k/v ones)")
        if transformer.activation == "swiglu":
            found.append("vision.transformer.activation: an InternViT MLP is fc1 -> activation -> fc2, not swiglu")
        if transformer.hidden_dropout > 0:
            found.append(f"vision.transformer.hidden_dropout {transformer.hidden_dropout}: an InternViT tower "
                         f"runs without hidden dropout")
        if transformer.query_groups != transformer.num_attention_heads or transformer.kv_channels is not None:
            found.append("vision.transformer: an InternViT tower has plain multi-head attention (no GQA, "
                         "no custom head dimension)")
        return found


@dataclass
class VisionConfig:
    """A ViT: CLIP-style (class token, pre-norm) or SigLIP-style (neither, patch bias on).

    `family` (a VISION_TOWERS name) names the conventions around the architecture: the image
    statistics, the Hugging Face form and the defaults an import starts from. The booleans below are
    the architecture itself and stay explicit, so a research tower may differ from its family; a
    Hugging Face export checks that they agree with the family's form. None (a megamm.json written
    before families existed) is derived once, here: CLIP has a class token, SigLIP has none.
    """

    transformer: TransformerConfig
    family: str | None = None
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    class_token: bool = True
    pre_norm: bool = True
    # CLIP's patch convolution has no bias, SigLIP's has one.
    patch_bias: bool = False
    # Which hidden state feeds the projector, counted like Hugging Face's hidden_states tuple:
    # 0 is the embeddings, i is the output of layer i, -1 the last layer, -2 (LLaVA) the one before.
    select_layer: int = -2
    drop_class_token: bool = True
    # Set for the native-resolution (Qwen2-VL) family, whose tower is megamm.models.native_vision;
    # then image_size, class_token, pre_norm, patch_bias, select_layer and drop_class_token are unused.
    native_resolution: NativeResolutionConfig | None = None
    # Set for an InternViT tower (layer scale, optional QK norm; megamm.models.internvit).
    intern_vit: InternViTConfig | None = None

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = "clip" if self.class_token else "siglip"

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def seq_length(self) -> int:
        return self.num_patches + int(self.class_token)

    @property
    def num_layers_used(self) -> int:
        """Layers that run to produce the selected hidden state (the rest are frozen, unused); a
        native-resolution tower has no select_layer: all its layers run."""
        n = self.transformer.num_layers
        if self.native_resolution is not None:
            return n
        return self.select_layer if self.select_layer >= 0 else n + 1 + self.select_layer

    @property
    def output_tokens(self) -> int:
        keep_class = self.class_token and not self.drop_class_token
        return self.num_patches + int(keep_class)

    def problems(self, parallel: ParallelConfig) -> list[str]:
        return gather(lambda: self.transformer.problems(parallel, "vision"), self._own_problems)

    def _own_problems(self) -> list[str]:
        found = []
        if self.family not in VISION_TOWERS:
            found.append(VISION_TOWERS.unknown(self.family, "vision.family"))
        if self.native_resolution is not None:
            return found + self._native_problems(self.native_resolution)
        if self.intern_vit is not None:
            found += self.intern_vit.problems(self.transformer)
        if self.image_size % self.patch_size:
            found.append(f"vision.image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        n = self.transformer.num_layers
        if not -(n + 1) <= self.select_layer <= n:
            found.append(f"vision.select_layer {self.select_layer} out of range for {n} layers")
        if self.transformer.causal:
            found.append("vision.transformer.causal must be False: a vision tower attends bidirectionally")
        if self.transformer.position_embedding != "learned":
            found.append(f"vision.transformer.position_embedding must be 'learned' (the ViT learns a position "
                         f"table), got {self.transformer.position_embedding!r}")
        if self.seq_length > self.transformer.max_position_embeddings:
            found.append(f"vision: {self.seq_length} positions (patches + class token) exceed "
                         f"vision.transformer.max_position_embeddings {self.transformer.max_position_embeddings}")
        return found

    def _native_problems(self, native: NativeResolutionConfig) -> list[str]:
        found = native.problems(self.patch_size, self.transformer.num_layers)
        if self.transformer.causal:
            found.append("vision.transformer.causal must be False: a vision tower attends bidirectionally")
        if self.transformer.position_embedding != "rope":
            found.append(f"vision.transformer.position_embedding must be 'rope' for a native-resolution tower "
                         f"(2D rotary over the patch grid), got {self.transformer.position_embedding!r}")
        elif self.transformer.head_dim % 4:
            found.append(f"vision: the 2D rotary splits each head into height and width halves of rotated "
                         f"pairs, so head_dim must be a multiple of 4, got {self.transformer.head_dim}")
        return found


@dataclass
class ProjectorConfig:
    # A PROJECTORS name: linear, mlp2x_gelu.
    type: str = "mlp2x_gelu"
    # Before any projector: merge each 2x2 block of patches into one token (4x fewer image tokens,
    # 4x wider features). An option rather than a projector of its own, so it composes with each.
    pixel_shuffle: bool = False
    add_bias: bool = True

    @property
    def merged_patches(self) -> int:
        """Vision tokens merged into one image token (and the factor the input width grows by)."""
        return PIXEL_SHUFFLE_BLOCK**2 if self.pixel_shuffle else 1

    def output_tokens(self, vision_tokens: int) -> int:
        """Image tokens per image the projector gives for `vision_tokens` tower outputs."""
        return vision_tokens // self.merged_patches

    def problems(self) -> list[str]:
        return [] if self.type in PROJECTORS else [PROJECTORS.unknown(self.type, "projector.type")]


@dataclass
class LanguageConfig:
    transformer: TransformerConfig
    # A LANGUAGE_MODELS name (llama, mistral, qwen2): the Hugging Face form the decoder converts to
    # and from. Every family runs on the same TransformerLayer, configured by `transformer`.
    family: str = "llama"
    vocab_size: int = 32000
    # The table is padded to a multiple of this times tp (even shards, aligned GEMMs).
    make_vocab_size_divisible_by: int = 128
    tie_word_embeddings: bool = False
    # The id that marks every image-embedding position in input_ids.
    image_token_id: int = 32000 - 1
    # The id that marks every video-embedding position (native-resolution towers, LLaVA-OneVision); None: no videos.
    video_token_id: int | None = None
    # M-RoPE (the Qwen2-VL family): how many rotary pairs of each head turn by the temporal, height
    # and width position, in that order (Qwen2-VL 7B: 16, 24, 24); the sum is head_dim / 2 and the
    # model takes position ids `[3, b, s]` (megamm.data.mrope). None: 1-D rope, position ids `[b, s]`.
    mrope_section: tuple[int, ...] | None = None

    def problems(self, parallel: ParallelConfig) -> list[str]:
        return gather(lambda: self.transformer.problems(parallel, "language"), self._own_problems,
                      lambda: self._context_parallel_problems(parallel))

    def _context_parallel_problems(self, parallel: ParallelConfig) -> list[str]:
        """What ring attention (megamm.transformer.ring_attention) does not do."""
        if parallel.context_parallel_size > 1 and self.transformer.attention_dropout > 0:
            return [(f"language.attention_dropout {self.transformer.attention_dropout}: ring attention "
                     f"(context-parallel size {parallel.context_parallel_size}) has no attention dropout")]
        return []

    def _own_problems(self) -> list[str]:
        found = []
        if self.family not in LANGUAGE_MODELS:
            found.append(LANGUAGE_MODELS.unknown(self.family, "language.family"))
        if self.vocab_size < 1:
            found.append(f"language.vocab_size must be >= 1, got {self.vocab_size}")
        if self.make_vocab_size_divisible_by < 1:
            found.append("language.make_vocab_size_divisible_by must be >= 1")
        if not 0 <= self.image_token_id < self.vocab_size:
            found.append(f"language.image_token_id {self.image_token_id} not in the vocabulary [0, {self.vocab_size})")
        if self.video_token_id is not None:
            if not 0 <= self.video_token_id < self.vocab_size:
                found.append(f"language.video_token_id {self.video_token_id} not in the vocabulary "
                             f"[0, {self.vocab_size})")
            if self.video_token_id == self.image_token_id:
                found.append(f"language.video_token_id {self.video_token_id} equals image_token_id: the model "
                             f"could not tell video positions from image positions")
        if self.mrope_section is not None:
            found += self._mrope_problems(self.mrope_section)
        if not self.transformer.causal:
            found.append("language.transformer.causal must be True for a decoder")
        if self.transformer.position_embedding != "rope":
            found.append(f"language.transformer.position_embedding must be 'rope' (the decoder rotates queries "
                         f"and keys), got {self.transformer.position_embedding!r}")
        return found

    def _mrope_problems(self, section: tuple[int, ...]) -> list[str]:
        pairs = self.transformer.head_dim // 2
        if len(section) != MROPE_AXES or min(section) < 0:
            return [(f"language.mrope_section {list(section)}: expected {MROPE_AXES} counts >= 0 (rotary pairs "
                    f"turned by the temporal, height and width positions)")]
        if sum(section) != pairs:
            return [(f"language.mrope_section {list(section)} sums to {sum(section)}; it splits the "
                    f"{pairs} rotary pairs of a head (head_dim {self.transformer.head_dim} / 2)")]
        return []


@dataclass
class LlavaConfig:
    vision: VisionConfig
    language: LanguageConfig
    # None for a native-resolution tower, whose patch merger is its projector (vision.native_resolution).
    projector: ProjectorConfig | None = field(default_factory=ProjectorConfig)
    # The three LLaVA training stages: stage 1 trains only the projector, stage 2 projector + LM.
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_language: bool = False
    # LLaVA-NeXT any-resolution tiling (megamm.config.anyres, megamm.models.anyres): each image is a
    # base image plus tiles, its features unpadded and given newline embeddings; None: one tile.
    anyres: AnyResConfig | None = None

    @property
    def image_tokens_per_image(self) -> int:
        """Image tokens of every image (a fixed-size tower); a native-resolution tower has no such
        number (an image of grid (t, h, w) gives t * h * w / spatial_merge_size^2), nor has an
        any-resolution model (megamm.config.anyres.image_tokens)."""
        if self.vision.native_resolution is not None or self.projector is None:
            raise ValueError(f"the {self.vision.family} tower gives each image its own number of tokens "
                             f"(t * h * w / spatial_merge_size^2 of its grid), not a fixed one")
        if self.anyres is not None:
            raise ValueError("an any-resolution (anyres) model gives each image its own number of tokens, from its "
                             "size (megamm.config.anyres.image_tokens), not a fixed one")
        return self.projector.output_tokens(self.vision.output_tokens)

    @property
    def tile_tokens(self) -> int:
        """Embeddings one tower input (an image, a tile) yields through the projector."""
        return self.projector.output_tokens(self.vision.output_tokens)

    def problems(self, parallel: ParallelConfig, seq_length: int | None = None) -> list[str]:
        """Every violation; a part that uses a field whose value did not parse is skipped (megamm.config.unparsed)."""
        return gather(
            lambda: self.vision.problems(parallel), lambda: self.language.problems(parallel),
            lambda: [] if self.projector is None else self.projector.problems(), self._vision_problems,
            lambda: self._shape_problems(parallel, seq_length),
            lambda: [] if self.anyres is None else self._anyres_problems(self.anyres),
        )

    def _anyres_problems(self, anyres: AnyResConfig) -> list[str]:
        """What any-resolution tiling asks of the tower and the projector."""
        vision = self.vision
        if vision.native_resolution is not None or self.projector is None:
            return [(f"anyres: the {vision.family} tower takes images at their own resolution; any-resolution "
                     f"tiling is for fixed-size towers")]
        found = anyres.problems(vision.image_size)
        if vision.output_tokens != vision.num_patches:
            found.append("anyres: the tile features are laid out as a patch grid, so the class token must be dropped "
                         "(vision.drop_class_token, Hugging Face's vision_feature_select_strategy 'default')")
        if self.projector.pixel_shuffle:
            found.append("anyres: projector.pixel_shuffle is not combined with any-resolution tiling")
        return found

    def _vision_problems(self) -> list[str]:
        """What the tower kind asks of the projector and the language model."""
        native = self.vision.native_resolution
        if native is None:
            if self.projector is None:
                return [(f"projector: the {self.vision.family} tower needs a projector (only a native-resolution "
                        f"tower merges its patches itself)")]
            return []
        found = []
        if self.projector is not None:
            found.append(f"projector: the {self.vision.family} tower's patch merger is its projector "
                         f"(vision.native_resolution); set projector to null")
        if self.language.mrope_section is None:
            found.append(f"language.mrope_section: the {self.vision.family} tower's tokens are placed by M-RoPE "
                         f"(temporal, height, width positions); set it (Qwen2-VL: [16, 24, 24] for head_dim 128)")
        hidden = self.language.transformer.hidden_size
        if native.out_hidden_size != hidden:
            found.append(f"vision.native_resolution.out_hidden_size {native.out_hidden_size} must equal "
                         f"language.transformer.hidden_size {hidden} (the merger writes language embeddings)")
        return found

    def _shape_problems(self, parallel: ParallelConfig, seq_length: int | None) -> list[str]:
        found = []
        tp = parallel.tensor_model_parallel_size
        if min(tp, parallel.pipeline_model_parallel_size, parallel.context_parallel_size) < 1:
            found.append("parallel sizes must be >= 1")
        if self.projector is not None and self.projector.pixel_shuffle:
            grid = self.vision.grid_size
            if grid % PIXEL_SHUFFLE_BLOCK:
                found.append(f"projector.pixel_shuffle needs a patch grid divisible by {PIXEL_SHUFFLE_BLOCK}, "
                             f"got {grid}x{grid}")
            if self.vision.class_token and not self.vision.drop_class_token:
                found.append("projector.pixel_shuffle needs vision.drop_class_token (the grid must be square)")
        if seq_length is not None:
            found += parallel.sequence_split_problems(seq_length)
        limit = self.language.transformer.max_position_embeddings
        if seq_length is not None and seq_length > limit:
            found.append(f"sequence length {seq_length} exceeds language.transformer.max_position_embeddings {limit}")
        return found

    def for_runtime(
        self, params_dtype: torch.dtype, recompute: Recompute = "none", recompute_num_layers: int | None = None
    ) -> LlavaConfig:
        """This config with the build-time settings of both towers (see TransformerConfig's `set_by`
        fields). `recompute_num_layers` counts each tower's layers; a tower with fewer recomputes all."""

        def transformer(config: TransformerConfig) -> TransformerConfig:
            layers = None if recompute_num_layers is None else min(recompute_num_layers, config.num_layers)
            return dataclasses.replace(
                config, params_dtype=params_dtype, recompute=recompute, recompute_num_layers=layers
            )

        return dataclasses.replace(
            self,
            vision=dataclasses.replace(self.vision, transformer=transformer(self.vision.transformer)),
            language=dataclasses.replace(self.language, transformer=transformer(self.language.transformer)),
        )

    def validate(self, parallel: ParallelConfig, seq_length: int | None = None) -> None:
        """Raise `ConfigError` listing every problem, or return quietly."""
        found = self.problems(parallel, seq_length)
        if found:
            raise ConfigError(found)
