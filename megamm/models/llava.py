"""LlavaModel: vision tower -> projector -> image embeddings written into the token sequence ->
language model -> per-token loss.

`input_ids` already hold one image-token id per image embedding (the data pipeline expands each
image placeholder), so sequence lengths are fixed before the model runs and pipeline stages can
exchange fixed shapes. Images are consumed in batch order: all of sample 0's images, then sample
1's, and so on; within the sequence they fill the image-token positions left to right.

Two tower kinds. A fixed-size tower (CLIP, SigLIP: megamm.models.vision) takes images
`[n, C, H, W]` of one size, each giving `image_tokens_per_image` tokens through the projector. A
native-resolution tower (the Qwen2-VL family: megamm.models.native_vision) takes every image's
flattened patches `[patches, C*T*P*P]` with a `(t, h, w)` grid each, and videos likewise; its patch
merger is the projector (no `projector` module), an image gives `t * h * w / merge^2` tokens, and
the language model places them with M-RoPE position ids `[3, b, s]` (megamm.data.mrope). Videos
fill the `video_token_id` positions as images fill the image ones.

Pipeline split: `pre_process` stages hold the vision tower, the projector and the embedding;
`post_process` stages hold the final norm, the output layer and the loss. Position ids and the
attention mask go to every stage (each stage rotates its own layers' queries and keys).

Any-resolution (LLaVA-NeXT, `config.anyres`): a fixed-size tower encodes every image's base image
and tiles `[tiles, C, H, W]`; with each image's original size `image_sizes [n, 2]` the tile
features are unpadded and given newline embeddings (megamm.models.anyres), so an image gives a
number of tokens that depends on its size.

Context parallelism (either tower kind): every cp rank gets the whole microbatch, embeds only its own
positions (megamm.parallel.context) and encodes only its share of the images and videos
(megamm.models.image_shares: equal shares of fixed-size images, native-resolution items balanced by
patches); the position ids, M-RoPE's included, are split with the tokens by the language model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from megamm.config import LlavaConfig, ParallelConfig
from megamm.models.anyres import AnyResLayout, size_list
from megamm.models.image_shares import VisionShares, local_vision_embeddings
from megamm.models.language import LanguageModel
from megamm.models.native_vision import NativeResolutionTower
from megamm.models.projectors import build_projector
from megamm.models.vision import VisionTower
from megamm.models.vision_tokens import (
    PerSample,
    check_fixed_tokens,
    check_vision_tokens,
    native_token_counts,
)
from megamm.parallel.context import split_sequence
from megamm.parallel.params import initialize_parameters
from megamm.parallel.state import ParallelState


class NativePart(NamedTuple):
    """One kind (images or videos) of a native-resolution microbatch, checked: positions `[b, s]` bool
    (its placeholder tokens), patches `[p, C*T*P*P]`, grids `[n, 3]`, tokens per item."""

    positions: torch.Tensor
    patches: torch.Tensor
    grids: torch.Tensor
    tokens: list[int]


class LlavaModel(nn.Module):
    def __init__(
        self,
        config: LlavaConfig,
        state: ParallelState,
        sequence_parallel: bool = False,
        pre_process: bool = True,
        post_process: bool = True,
        language_layers: Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        parallel = ParallelConfig(
            tensor_model_parallel_size=state.tp_size,
            pipeline_model_parallel_size=state.pp_size,
            context_parallel_size=state.cp_size,
            sequence_parallel=sequence_parallel,
        )
        config.validate(parallel)
        # Sequence parallelism splits over tp ranks: with one rank there is nothing to split.
        sequence_parallel = parallel.sequence_parallel_in_effect
        self.config = config
        self.state = state
        self.pre_process = pre_process
        self.post_process = post_process
        vision_t, language_t = config.vision.transformer, config.language.transformer
        self.native = config.vision.native_resolution is not None
        self.vision: VisionTower | NativeResolutionTower
        # The any-resolution layout (its newline embedding) of a first stage with config.anyres.
        self.anyres: AnyResLayout | None = None
        # A tower encodes whole images (this cp rank's share of them): its attention spans one
        # image (frame), so it runs without context parallelism.
        if pre_process and self.native:
            self.vision = NativeResolutionTower(config.vision, state.without_context_parallel(), sequence_parallel)
        elif pre_process:
            self.vision = VisionTower(config.vision, state.without_context_parallel(), sequence_parallel)
            self.projector = build_projector(
                config.projector,
                vision_t.hidden_size,
                language_t.hidden_size,
                config.vision.grid_size,
                state,
                language_t.init_method_std,
                language_t.params_dtype,
            )
            if config.anyres is not None:
                self.anyres = AnyResLayout(config, state)
        self.language = LanguageModel(
            config.language, state, sequence_parallel, pre_process, post_process, language_layers
        )
        self.apply_freeze()

    def apply_freeze(self) -> None:
        """Turn off gradients for the frozen parts (the LLaVA training stages). A native-resolution
        tower's patch merger is its projector: freeze_vision leaves it trainable and
        freeze_projector freezes it, as Hugging Face fine-tuning recipes for Qwen2-VL do."""
        cfg = self.config
        if self.pre_process:
            if cfg.freeze_vision:
                self.vision.requires_grad_(False)
                if self.native:
                    self.vision.merger.requires_grad_(not cfg.freeze_projector)
            if cfg.freeze_projector:
                self._projector_module().requires_grad_(False)
                if self.anyres is not None:
                    self.anyres.requires_grad_(False)
        if cfg.freeze_language:
            self.language.requires_grad_(False)

    def _projector_module(self) -> nn.Module:
        return self.vision.merger if self.native else self.projector

    def _vision_modules(self) -> tuple[nn.Module, ...]:
        """The modules of the image path (the merger is inside a native tower; the newline
        embedding of an any-resolution model is on it)."""
        if self.native:
            return (self.vision,)
        return (self.vision, self.projector) + ((self.anyres,) if self.anyres is not None else ())

    def initialize(self, seed: int) -> None:
        """Deterministic init from (seed, global parameter name), independent of the layout."""
        initialize_parameters(self, seed, self.state.tp_group)

    @property
    def image_tokens_per_image(self) -> int:
        """Tokens of every image of a fixed-size tower (ValueError for a native-resolution one)."""
        return self.config.image_tokens_per_image

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[n, C, H, W]` -> `[n, tokens_per_image, h_language]` image embeddings."""
        grad_vision = any(p.requires_grad for p in self.vision.parameters())
        grad_projector = any(p.requires_grad for p in self.projector.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and grad_vision):
            features = self.vision(pixel_values)
        with torch.set_grad_enabled(torch.is_grad_enabled() and (grad_vision or grad_projector)):
            embeddings = self.projector(features)
        return embeddings.transpose(0, 1)

    def encode_native(self, patches: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """Native-resolution tower: patches `[p, C*T*P*P]` + grids `[n, 3]` -> `[p / merge^2, h_language]`
        merged embeddings, image after image (videos likewise)."""
        trainable = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            return self.vision(patches, grids)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        images_per_sample: PerSample = None,
        *,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        videos_per_sample: PerSample = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image (and video) embeddings written into their token positions.

        input_ids `[b, s]`. Fixed-size tower: pixel_values `[n, C, H, W]` or None. Native-resolution
        tower: pixel_values `[image patches, C*T*P*P]` with image_grid_thw `[n, 3]`, and
        pixel_values_videos / video_grid_thw for videos. Any-resolution: pixel_values `[tiles, C, H, W]`
        (each image's base image and tiles) with image_sizes `[n, 2]` (height, width).
        images_per_sample / videos_per_sample `[b]` (optional) enable the per-sample count check.
        Returns `[s, b, h]`, replicated across tp; with context parallelism `[s/cp, b, h]`, this rank's
        positions, of which it encoded only its share of the images and videos (the embeddings of the
        others come from their cp ranks; any-resolution models refuse cp > 1).
        """
        language = self.config.language
        image_positions = input_ids == language.image_token_id
        embeddings = self.language.embed(split_sequence(input_ids, self.state))  # [b, s/cp, h]
        if self.native:
            parts = [("image", image_positions, pixel_values, image_grid_thw, images_per_sample)]
            videos_given = (pixel_values_videos is not None or video_grid_thw is not None
                            or (videos_per_sample is not None and sum(int(n) for n in videos_per_sample) > 0))
            if videos_given and language.video_token_id is None:
                raise ValueError("the batch holds videos but language.video_token_id is not set")
            if language.video_token_id is not None:
                parts.append(("video", input_ids == language.video_token_id, pixel_values_videos, video_grid_thw,
                              videos_per_sample))
            given = [part for part in (self._native_part(*part) for part in parts) if part is not None]
            encoded = bool(given)
            if given:
                embeddings = self._scatter_native(embeddings, given)
        elif self.anyres is not None:
            self._refuse_native_inputs(image_grid_thw, pixel_values_videos, video_grid_thw, videos_per_sample)
            values = self._anyres_embeddings(image_positions, pixel_values, image_sizes, images_per_sample)
            encoded = values is not None
            if values is not None:
                embeddings = embeddings.masked_scatter(image_positions.unsqueeze(-1), values.to(embeddings.dtype))
        else:
            self._refuse_native_inputs(image_grid_thw, pixel_values_videos, video_grid_thw, videos_per_sample)
            if image_sizes is not None:
                raise ValueError("image_sizes is an input of an any-resolution model (config.anyres); this model "
                                 "takes images of one size")
            num_images = 0 if pixel_values is None else pixel_values.shape[0]
            check_fixed_tokens(image_positions, num_images, self.image_tokens_per_image, images_per_sample)
            encoded = bool(num_images)
            if num_images:
                shares = VisionShares.balanced([1] * num_images, [self.image_tokens_per_image] * num_images,
                                               self.state.cp_size)
                mine = pixel_values if self.state.cp_size == 1 else pixel_values[shares.items_of(self.state.cp_rank)]
                rows = self._encode_share(mine, embeddings).flatten(0, 1)  # [m * tokens, h]
                rows = local_vision_embeddings(rows, shares, [image_positions], self.state)
                local_positions = split_sequence(image_positions, self.state).unsqueeze(-1)
                embeddings = embeddings.masked_scatter(local_positions, rows)
        if not encoded and torch.is_grad_enabled():
            embeddings = embeddings + self._zero_from_image_path(embeddings)
        return embeddings.transpose(0, 1).contiguous()

    def _native_part(self, kind: str, positions: torch.Tensor, patches: torch.Tensor | None,
                     grids: torch.Tensor | None, per_sample: PerSample) -> NativePart | None:
        """Check one kind's (image or video) inputs and token counts (None: none given)."""
        name = "pixel_values" if kind == "image" else "pixel_values_videos"
        if (patches is None) != (grids is None):
            given, missing = (name, f"{kind}_grid_thw") if grids is None else (f"{kind}_grid_thw", name)
            raise ValueError(f"{given} given without {missing}: the {self.config.vision.family} tower needs "
                             f"both (patches and their (t, h, w) grids)")
        merge = self.config.vision.native_resolution.spatial_merge_size
        tokens = [] if grids is None else native_token_counts(grids, merge)
        check_vision_tokens(kind, positions, tokens, per_sample,
                            f"give (t * h * w / {merge * merge} tokens each, per {kind}: {tokens})")
        if not tokens:
            return None
        self.vision.check(patches, grids)
        return NativePart(positions, patches, grids, tokens)

    def _scatter_native(self, embeddings: torch.Tensor, parts: list[NativePart]) -> torch.Tensor:
        """Encode this cp rank's share of the parts' items (images, then videos; balanced by patches)
        and write every vision token among its positions into `embeddings` `[b, s/cp, h]`."""
        state = self.state
        pieces, costs, tokens = [], [], []
        for part in parts:
            sizes = [t * h * w for t, h, w in part.grids.tolist()]
            pieces += part.patches.split(sizes)
            costs += sizes
            tokens += part.tokens
        grids = torch.cat([part.grids for part in parts])
        shares = VisionShares.balanced(costs, tokens, state.cp_size)
        mine = shares.items_of(state.cp_rank)
        if mine:
            rows = self.encode_native(torch.cat([pieces[i] for i in mine]), grids[mine]).to(embeddings.dtype)
        else:
            rows = embeddings.new_zeros(0, embeddings.shape[-1])
            if torch.is_grad_enabled():
                rows = rows + self._zero_from_image_path(embeddings)
        rows = local_vision_embeddings(rows, shares, [part.positions for part in parts], state)
        local = [split_sequence(part.positions, state) for part in parts]
        for positions, part_rows in zip(local, rows.split([int(p.sum()) for p in local])):
            embeddings = embeddings.masked_scatter(positions.unsqueeze(-1), part_rows)
        return embeddings

    def _anyres_embeddings(self, positions: torch.Tensor, pixel_values: torch.Tensor | None,
                           image_sizes: torch.Tensor | None, per_sample: PerSample) -> torch.Tensor | None:
        """Check the image-token counts (from each image's size) and the tiles, encode the tiles and lay
        them out (None: no image)."""
        if (pixel_values is None) != (image_sizes is None):
            given, missing = ("pixel_values", "image_sizes") if image_sizes is None else ("image_sizes", "pixel_values")
            raise ValueError(f"{given} given without {missing}: an any-resolution model needs both (each image's "
                             f"tiles and its original size)")
        sizes = [] if image_sizes is None else size_list(image_sizes)
        tokens = self.anyres.token_counts(sizes)
        check_vision_tokens("image", positions, tokens, per_sample,
                            f"give (base tile + unpadded tiles + a newline per row, per image: {tokens})")
        if not tokens:
            return None
        tiles = self.anyres.tile_counts(sizes)
        if sum(tiles) != pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} tower inputs, but the image_sizes {sizes} "
                             f"give {sum(tiles)} (base image + tiles each: {tiles})")
        return self.anyres(self.encode_images(pixel_values), sizes)

    def _refuse_native_inputs(self, *inputs: object) -> None:
        if any(value is not None for value in inputs):
            raise ValueError(f"image_grid_thw, pixel_values_videos, video_grid_thw and videos_per_sample are "
                             f"inputs of a native-resolution tower; the {self.config.vision.family} tower takes "
                             f"images [n, C, H, W] only")

    def _encode_share(self, share: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`[m, C, H, W]` this rank's images -> `[m, tokens_per_image, h]` in `like`'s dtype.

        A cp rank with no image of its own (fewer images than cp ranks) returns an empty tensor
        that still depends on the trainable image path, so every rank's all-gather of the shares
        is differentiable alike (their backward collectives must match) and those parameters get
        their gradient, zero from this rank.
        """
        if share.shape[0]:
            return self.encode_images(share).to(like.dtype)
        empty = like.new_zeros(0, self.image_tokens_per_image, like.shape[-1])
        return empty + self._zero_from_image_path(like) if torch.is_grad_enabled() else empty

    def _zero_from_image_path(self, like: torch.Tensor) -> torch.Tensor:
        """A zero that depends on every trainable vision/projector parameter.

        With no image in the batch these parameters would otherwise get no gradient at all, and a
        data-parallel gradient sync waiting for them would hang; this gives them exact zeros.
        """
        trainable = [p for m in self._vision_modules() for p in m.parameters() if p.requires_grad]
        zero = like.new_zeros(())
        for param in trainable:
            zero = zero + param.sum().to(like.dtype) * 0.0
        return zero

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        images_per_sample: PerSample = None,
        position_ids: torch.Tensor | None = None,
        decoder_input: torch.Tensor | None = None,
        return_logits: bool = False,
        attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        videos_per_sample: PerSample = None,
        image_sizes: torch.Tensor | None = None,
        loss_positions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One stage's forward.

        First stage: input_ids `[b, s]` and pixel_values `[n, C, H, W]` (or None); a native-resolution
        tower takes pixel_values `[image patches, C*T*P*P]` + image_grid_thw `[n, 3]` and
        pixel_values_videos + video_grid_thw; an any-resolution model tiles `[tiles, C, H, W]` + image_sizes
        `[n, 2]` (see `embed`).
        Later stages: decoder_input, the previous stage's hidden states.
        Every stage: position_ids `[b, s]` (`[3, b, s]` with M-RoPE) and attention_mask `[b, 1, s, s]`
        (bool, True = may attend, combined with causality) for packed rows; None gives 0..s-1 (on
        every axis) and plain causal attention.
        Last stage: labels `[b, s]` aligned with input_ids, -100 where ignored. Returns
        {"loss": `[b, s]`, "loss_mask": `[b, s]`, optionally "logits"}; see LanguageModel.forward.
        loss_positions (last stage, optional): `megamm.models.language.loss_positions(labels, state)`,
        the positions the output layer and the loss run at, built ahead on the host.
        """
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            decoder_input = self.embed(
                input_ids, pixel_values, images_per_sample, image_grid_thw=image_grid_thw,
                pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                videos_per_sample=videos_per_sample, image_sizes=image_sizes,
            )
        elif decoder_input is None:
            raise ValueError("a non-first pipeline stage needs decoder_input")
        return self.language(
            decoder_input, labels, position_ids, attention_mask=attention_mask, return_logits=return_logits,
            loss_positions=loss_positions,
        )


def average_loss(output: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean loss over the non-ignored tokens of one batch (tests and single-batch use)."""
    return output["loss"].sum() / output["loss_mask"].sum().clamp(min=1)
