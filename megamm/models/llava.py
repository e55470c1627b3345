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
number of tokens that depends on its size. Under LLaVA-OneVision's multi-image rule
(`AnyResConfig.single_tile_multi_image`) each image of a sample holding several is one tower input
(`g*g` features and a newline), decided from the images of each sample (`batch_num_images`, or
`images_per_sample` when its rows are the samples). LLaVA-OneVision's videos `[videos, frames, C, H, W]` fill
the `video_token_id` positions: every frame one tower input, its features pooled 2x bilinearly,
one newline embedding per video.

Context parallelism (every tower kind): every cp rank gets the whole microbatch, embeds only its own
positions (megamm.parallel.context) and encodes only its share of the images and videos
(megamm.models.image_shares: equal shares of fixed-size images, any-resolution images with all their
tiles balanced by tower inputs, native-resolution items balanced by patches); the position ids,
M-RoPE's included, are split with the tokens by the language model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
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

# The inputs the model reads on the host: token ids (where the vision tokens are, which cp rank
# needs which embedding rows), grids, image sizes and per-sample counts (how many patches, tiles and
# tokens each item has, which cp rank encodes it). The training step leaves them where the loader
# built them, on the CPU, so planning a microbatch's vision work costs no device-to-host
# synchronization; the model copies to the device what runs there (ids for the embedding lookup, the
# positions a cp rank writes its embedding rows to).
HOST_INPUTS = ("input_ids", "image_grid_thw", "video_grid_thw", "image_sizes", "images_per_sample",
               "videos_per_sample", "batch_num_images")


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
        batch_num_images: PerSample = None,
    ) -> torch.Tensor:
        """Token embeddings with image (and video) embeddings written into their token positions.

        input_ids `[b, s]`. Fixed-size tower: pixel_values `[n, C, H, W]` or None. Native-resolution
        tower: pixel_values `[image patches, C*T*P*P]` with image_grid_thw `[n, 3]`, and
        pixel_values_videos / video_grid_thw for videos. Any-resolution: pixel_values `[tiles, C, H, W]`
        (each image's base image and tiles) with image_sizes `[n, 2]` (height, width), and with
        `language.video_token_id` (LLaVA-OneVision) pixel_values_videos `[videos, frames, C, H, W]`.
        images_per_sample / videos_per_sample `[b]` (optional) enable the per-sample count check.
        batch_num_images (any-resolution, optional): the images of each sample, samples in batch order,
        for `AnyResConfig.single_tile_multi_image` (which images are tiled); needed where a row packs
        several samples, otherwise images_per_sample gives it (rows are samples); with neither every
        image is tiled.
        `HOST_INPUTS` may be on the CPU with the rest on the device (what the training step passes),
        so that the counts, checks and cp shares read host memory.
        Returns `[s, b, h]`, replicated across tp; with context parallelism `[s/cp, b, h]`, this rank's
        positions, of which it encoded only its share of the images and videos (the embeddings of the
        others come from their cp ranks).
        """
        language = self.config.language
        image_positions = input_ids == language.image_token_id
        device = self.state.device
        embeddings = self.language.embed(split_sequence(input_ids, self.state).to(device))  # [b, s/cp, h]
        if batch_num_images is not None and self.anyres is None:
            raise ValueError("batch_num_images is an input of an any-resolution model (config.anyres): which "
                             "images are tiled")
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
            self._refuse_native_inputs(image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw)
            images = self._anyres_images(image_positions, pixel_values, image_sizes, images_per_sample,
                                         batch_num_images)
            if images is not None:
                embeddings = self._scatter_anyres(embeddings, image_positions, pixel_values, *images)
            videos = self._anyres_videos(input_ids, pixel_values_videos, videos_per_sample)
            if videos is not None:
                embeddings = self._scatter_anyres_videos(embeddings, pixel_values_videos, *videos)
            encoded = images is not None or videos is not None
        else:
            self._refuse_native_inputs(image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                                       video_grid_thw=video_grid_thw, videos_per_sample=videos_per_sample)
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
                embeddings = embeddings.masked_scatter(local_positions.to(embeddings.device), rows)
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
            embeddings = embeddings.masked_scatter(positions.unsqueeze(-1).to(embeddings.device), part_rows)
        return embeddings

    def _anyres_images(self, positions: torch.Tensor, pixel_values: torch.Tensor | None,
                       image_sizes: torch.Tensor | None, per_sample: PerSample, batch_num_images: PerSample
                       ) -> tuple[list, list[int], list[int], list[bool]] | None:
        """Check the image-token counts (from each image's size and whether it is tiled) and the tiles:
        (sizes, tokens, tower inputs, tiled) per image, or None for no image."""
        if (pixel_values is None) != (image_sizes is None):
            given, missing = ("pixel_values", "image_sizes") if image_sizes is None else ("image_sizes", "pixel_values")
            raise ValueError(f"{given} given without {missing}: an any-resolution model needs both (each image's "
                             f"tiles and its original size)")
        sizes = [] if image_sizes is None else size_list(image_sizes)
        tiled = self._tiled_images(len(sizes), per_sample, batch_num_images)
        tokens = self.anyres.token_counts(sizes, tiled)
        check_vision_tokens("image", positions, tokens, per_sample,
                            f"give (base tile + unpadded tiles + a newline per row, or one tile + a newline "
                            f"for an image of a multi-image sample; per image: {tokens})")
        if not tokens:
            return None
        tiles = self.anyres.tile_counts(sizes, tiled)
        if sum(tiles) != pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} tower inputs, but the image_sizes {sizes} "
                             f"give {sum(tiles)} (base image + tiles each: {tiles})")
        return sizes, tokens, tiles, tiled

    def _tiled_images(self, images: int, per_sample: PerSample, batch_num_images: PerSample) -> list[bool]:
        """Whether each of the batch's `images` any-resolution images is tiled (`AnyResLayout.tiled_images`),
        from batch_num_images, else from images_per_sample (rows are then the samples)."""
        counts, name = ((batch_num_images, "batch_num_images") if batch_num_images is not None
                        else (per_sample, "images_per_sample"))
        if counts is not None and sum(int(n) for n in counts) != images:
            raise ValueError(f"{name} adds up to {sum(int(n) for n in counts)} but the batch holds {images} "
                             f"image(s) (image_sizes)")
        return self.anyres.tiled_images(images, counts)

    def _scatter_anyres(self, embeddings: torch.Tensor, positions: torch.Tensor, pixel_values: torch.Tensor,
                        sizes: list, tokens: list[int], tiles: list[int], tiled: list[bool]) -> torch.Tensor:
        """Encode this cp rank's share of the images (each with its base image and tiles, balanced by
        tower inputs), lay them out, and write every image token among its positions into
        `embeddings` `[b, s/cp, h]`. An image's tiles stay together: the layout joins them into one
        grid (and the unpad and newlines depend on the whole image); an image that is not tiled costs
        its one tower input."""
        starts = [0, *itertools.accumulate(tiles)]

        def encode(mine: list[int]) -> torch.Tensor:
            inputs = pixel_values if self.state.cp_size == 1 else pixel_values[
                torch.cat([torch.arange(starts[i], starts[i + 1]) for i in mine]).to(pixel_values.device)]
            return self.anyres(self.encode_images(inputs), [sizes[i] for i in mine], [tiled[i] for i in mine])

        return self._scatter_share(embeddings, positions, VisionShares.balanced(tiles, tokens, self.state.cp_size),
                                   encode)

    def _scatter_anyres_videos(self, embeddings: torch.Tensor, videos: torch.Tensor, positions: torch.Tensor,
                               tokens: list[int]) -> torch.Tensor:
        """Encode this cp rank's share of the videos `[videos, frames, C, H, W]` (whole videos, the
        pooling and newline being per video), and write every video token among its positions into
        `embeddings` `[b, s/cp, h]`."""
        frames = videos.shape[1]

        def encode(mine: list[int]) -> torch.Tensor:
            share = videos if self.state.cp_size == 1 else videos[torch.tensor(mine, device=videos.device)]
            return self.anyres.pool_video(self.encode_images(share.flatten(0, 1)), frames)

        shares = VisionShares.balanced([frames] * len(tokens), tokens, self.state.cp_size)
        return self._scatter_share(embeddings, positions, shares, encode)

    def _scatter_share(self, embeddings: torch.Tensor, positions: torch.Tensor, shares: VisionShares,
                       encode: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """`encode(this rank's items)` -> their rows `[rows, h]`; each rank's vision-token positions
        (`positions` `[b, s]`, over the whole sequence) get their rows from the ranks that encoded them.
        A rank with no item of its own still sends rows that depend on the image path, so every
        rank's exchange is differentiable alike."""
        mine = shares.items_of(self.state.cp_rank)
        if mine:
            rows = encode(mine).to(embeddings.dtype)
        else:
            rows = embeddings.new_zeros(0, embeddings.shape[-1])
            if torch.is_grad_enabled():
                rows = rows + self._zero_from_image_path(embeddings)
        rows = local_vision_embeddings(rows, shares, [positions], self.state)
        return embeddings.masked_scatter(split_sequence(positions, self.state).unsqueeze(-1).to(embeddings.device),
                                         rows)

    def _anyres_videos(self, input_ids: torch.Tensor, videos: torch.Tensor | None,
                       per_sample: PerSample) -> tuple[torch.Tensor, list[int]] | None:
        """LLaVA-OneVision's videos: `[videos, frames, C, H, W]` (one frame count per microbatch, as
        transformers takes them) -> (the video-token positions `[b, s]`, the tokens per video), or None
        without videos; the counts checked per sample."""
        video_token = self.config.language.video_token_id
        given = videos is not None or (per_sample is not None and sum(int(n) for n in per_sample) > 0)
        if video_token is None:
            if given:
                raise ValueError("the batch holds videos but language.video_token_id is not set")
            return None
        positions = input_ids == video_token
        if videos is not None and videos.dim() != 5:
            raise ValueError(f"pixel_values_videos of an any-resolution model: [videos, frames, C, H, W] (each frame "
                             f"one tower input), got shape {tuple(videos.shape)}")
        count, frames = (0, 0) if videos is None else videos.shape[:2]
        tokens = self.anyres.video_token_counts(count, frames)
        check_vision_tokens("video", positions, tokens, per_sample,
                            f"give (frames x pooled grid + a newline, per video: {tokens})")
        return (positions, tokens) if tokens else None

    def _check_packed_image_counts(self, image_sizes: torch.Tensor | None, batch_num_images: PerSample,
                                   segment_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        """Under LLaVA-OneVision's multi-image rule, packed rows (segment ids or a mask given) need
        batch_num_images: a row's images_per_sample counts the images of several samples, which would
        tile none of them (the packed batches carry it, megamm.data.batching)."""
        rule = self.anyres is not None and self.config.anyres.single_tile_multi_image
        packed = segment_ids is not None or attention_mask is not None
        if rule and packed and image_sizes is not None and batch_num_images is None:
            raise ValueError("packed rows of an any-resolution model with anyres.single_tile_multi_image need "
                             "batch_num_images (the images of each sample): images_per_sample counts a row's")

    def _refuse_native_inputs(self, **inputs: object) -> None:
        given = [name for name, value in inputs.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: inputs of a native-resolution tower; the "
                             f"{self.config.vision.family} tower takes images [n, C, H, W]"
                             + (" and videos [videos, frames, C, H, W]" if self.anyres is not None else " only"))

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
        segment_ids: torch.Tensor | None = None,
        loss_positions: torch.Tensor | None = None,
        batch_num_images: PerSample = None,
    ) -> dict[str, torch.Tensor]:
        """One stage's forward.

        First stage: input_ids `[b, s]` and pixel_values `[n, C, H, W]` (or None); a native-resolution
        tower takes pixel_values `[image patches, C*T*P*P]` + image_grid_thw `[n, 3]` and
        pixel_values_videos + video_grid_thw; an any-resolution model tiles `[tiles, C, H, W]` + image_sizes
        `[n, 2]` and, for packed rows under LLaVA-OneVision's multi-image rule, batch_num_images (see `embed`).
        Later stages: decoder_input, the previous stage's hidden states.
        Every stage: position_ids `[b, s]` (`[3, b, s]` with M-RoPE) and attention_mask `[b, 1, s, s]`
        (bool, True = may attend, combined with causality) for packed rows, or instead segment_ids
        `[b, s]` (their O(s) form, megamm.data.packing.segment_ids); None gives 0..s-1 (on every axis)
        and plain causal attention.
        Last stage: labels `[b, s]` aligned with input_ids, -100 where ignored. Returns
        {"loss": `[b, s]`, "loss_mask": `[b, s]`, optionally "logits"}; see LanguageModel.forward.
        loss_positions (last stage, optional): `megamm.models.language.loss_positions(labels, state)`,
        the positions the output layer and the loss run at, built ahead on the host.
        """
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            self._check_packed_image_counts(image_sizes, batch_num_images, segment_ids, attention_mask)
            decoder_input = self.embed(
                input_ids, pixel_values, images_per_sample, image_grid_thw=image_grid_thw,
                pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                videos_per_sample=videos_per_sample, image_sizes=image_sizes, batch_num_images=batch_num_images,
            )
        elif decoder_input is None:
            raise ValueError("a non-first pipeline stage needs decoder_input")
        return self.language(
            decoder_input, labels, position_ids, attention_mask=attention_mask, return_logits=return_logits,
            segment_ids=segment_ids,
            loss_positions=loss_positions,
        )


def average_loss(output: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean loss over the non-ignored tokens of one batch (tests and single-batch use)."""
    return output["loss"].sum() / output["loss_mask"].sum().clamp(min=1)
