"""LlavaModel: vision tower -> projector -> image embeddings written into the token sequence ->
language model -> per-token loss.

`input_ids` already hold one image-token id per image embedding (the data pipeline expands each
image placeholder), so sequence lengths are fixed before the model runs and pipeline stages can
exchange fixed shapes. Images are consumed in batch order: all of sample 0's images, then sample
1's, and so on; within the sequence they fill the image-token positions left to right.

Pipeline split: `pre_process` stages hold the vision tower, the projector and the embedding;
`post_process` stages hold the final norm, the output layer and the loss.

Context parallelism: every cp rank gets the whole microbatch, embeds only its own positions
(megamm.parallel.context) and encodes only its share of the images (megamm.models.image_shares).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from megamm.config import LlavaConfig, ParallelConfig
from megamm.models.image_shares import image_share, local_image_embeddings
from megamm.models.language import LanguageModel
from megamm.models.projectors import build_projector
from megamm.models.vision import VisionTower
from megamm.parallel.context import split_sequence
from megamm.parallel.params import initialize_parameters
from megamm.parallel.state import ParallelState


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
        if pre_process:
            # The tower encodes whole images (this cp rank's share of them): its attention spans
            # one image, so it runs without context parallelism.
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
        self.language = LanguageModel(
            config.language, state, sequence_parallel, pre_process, post_process, language_layers
        )
        self.apply_freeze()

    def apply_freeze(self) -> None:
        """Turn off gradients for the frozen parts (the LLaVA training stages)."""
        cfg = self.config
        if self.pre_process:
            if cfg.freeze_vision:
                self.vision.requires_grad_(False)
            if cfg.freeze_projector:
                self.projector.requires_grad_(False)
        if cfg.freeze_language:
            self.language.requires_grad_(False)

    def initialize(self, seed: int) -> None:
        """Deterministic init from (seed, global parameter name), independent of the layout."""
        initialize_parameters(self, seed, self.state.tp_group)

    @property
    def image_tokens_per_image(self) -> int:
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

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        images_per_sample: torch.Tensor | list[int] | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image embeddings written into the image-token positions.

        input_ids `[b, s]`; pixel_values `[n, C, H, W]` or None; images_per_sample `[b]` (optional,
        enables a per-sample check). Returns `[s, b, h]`, replicated across tp; with context
        parallelism `[s/cp, b, h]`, this rank's positions, of which it encoded only its share of the
        images (the embeddings of the others come from their cp ranks).
        """
        image_positions = input_ids == self.config.language.image_token_id
        self._check_image_tokens(image_positions, pixel_values, images_per_sample)
        embeddings = self.language.embed(split_sequence(input_ids, self.state))  # [b, s/cp, h]
        if pixel_values is not None and pixel_values.shape[0] > 0:
            encoded = self._encode_share(image_share(pixel_values, self.state), embeddings)
            image_embeddings = local_image_embeddings(encoded, pixel_values.shape[0], image_positions, self.state)
            local_positions = split_sequence(image_positions, self.state).unsqueeze(-1)
            embeddings = embeddings.masked_scatter(local_positions, image_embeddings)
        elif torch.is_grad_enabled():
            embeddings = embeddings + self._zero_from_image_path(embeddings)
        return embeddings.transpose(0, 1).contiguous()

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
        trainable = [p for m in (self.vision, self.projector) for p in m.parameters() if p.requires_grad]
        zero = like.new_zeros(())
        for param in trainable:
            zero = zero + param.sum().to(like.dtype) * 0.0
        return zero

    def _check_image_tokens(
        self,
        image_positions: torch.Tensor,
        pixel_values: torch.Tensor | None,
        images_per_sample: torch.Tensor | list[int] | None,
    ) -> None:
        per_image = self.image_tokens_per_image
        counts = image_positions.sum(dim=1).tolist()
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if images_per_sample is not None:
            images = [int(n) for n in images_per_sample]
            if len(images) != len(counts):
                raise ValueError(f"images_per_sample has {len(images)} entries for a batch of {len(counts)}")
            if sum(images) != num_images:
                raise ValueError(f"images_per_sample adds up to {sum(images)} but pixel_values holds {num_images} images")
            for sample, (found, n) in enumerate(zip(counts, images)):
                if found != n * per_image:
                    raise ValueError(
                        f"sample {sample}: {found} image-token positions, but its {n} image(s) x "
                        f"{per_image} tokens per image = {n * per_image}"
                    )
            return
        for sample, found in enumerate(counts):
            if found % per_image:
                raise ValueError(
                    f"sample {sample}: {found} image-token positions is not a multiple of the "
                    f"{per_image} tokens per image"
                )
        if sum(counts) != num_images * per_image:
            raise ValueError(
                f"the batch has {sum(counts)} image-token positions (per sample: {counts}), but "
                f"{num_images} image(s) x {per_image} tokens per image = {num_images * per_image}"
            )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        images_per_sample: torch.Tensor | list[int] | None = None,
        position_ids: torch.Tensor | None = None,
        decoder_input: torch.Tensor | None = None,
        return_logits: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One stage's forward.

        First stage: input_ids `[b, s]` and pixel_values `[n, C, H, W]` (or None).
        Later stages: decoder_input, the previous stage's hidden states.
        Every stage: position_ids `[b, s]` and attention_mask `[b, 1, s, s]` (bool, True = may attend,
        combined with causality) for packed rows; None gives 0..s-1 and plain causal attention.
        Last stage: labels `[b, s]` aligned with input_ids, -100 where ignored. Returns
        {"loss": `[b, s]`, "loss_mask": `[b, s]`, optionally "logits"}; see LanguageModel.forward.
        """
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            decoder_input = self.embed(input_ids, pixel_values, images_per_sample)
        elif decoder_input is None:
            raise ValueError("a non-first pipeline stage needs decoder_input")
        return self.language(
            decoder_input, labels, position_ids, attention_mask=attention_mask, return_logits=return_logits
        )


def average_loss(output: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean loss over the non-ignored tokens of one batch (tests and single-batch use)."""
    return output["loss"].sum() / output["loss_mask"].sum().clamp(min=1)
