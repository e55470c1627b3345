"""A LLaMA/Mistral-style decoder: vocab-parallel embedding, layers, final RMSNorm, output layer.

Split for pipelining: `pre_process` (this stage embeds tokens) and `post_process` (this stage
holds the final norm, the output layer and the loss); the layers held are given by number.
Logits stay split over the vocabulary across tp, straight into the vocab-parallel loss.

With labels (training, evaluation) the output layer and the loss run only at the positions whose
target is not ignored: image tokens, prompt tokens and padding contribute nothing to the loss, yet
the output layer `[h, V]` over every position is often the largest GEMM of the step. The per-token
loss `[b, s]` (zero where ignored) and every gradient are those of the full computation; the full
logits are still computed when asked for (`return_logits`) or without labels.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from megamm.config import LanguageConfig
from megamm.config.constants import IGNORE_INDEX
from megamm.kernels.cross_entropy import vocab_parallel_cross_entropy
from megamm.parallel.context import split_sequence
from megamm.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, pad_vocab_size
from megamm.parallel.mappings import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region
from megamm.parallel.params import TiedEmbedding
from megamm.parallel.sharding import normal_init
from megamm.parallel.state import ParallelState
from megamm.transformer.kv_cache import KVCache
from megamm.transformer.layer import TransformerBlock
from megamm.transformer.norm import build_norm
from megamm.transformer.rope import MultimodalRotaryEmbedding, RotaryEmbedding
from megamm.transformer.segments import PackedRows


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """`[b, s]` labels aligned with input_ids -> next-token targets `[b, s]` (last one ignored)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def loss_positions(labels: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """The positions with a loss among this rank's: labels `[b, s]` (aligned with input_ids, the
    whole sequence) -> int64 indices `[n]` into this cp rank's `[s/cp, b]` positions flattened
    sequence-first, the row order of the last stage's `[s/cp, b, h]` hidden states.

    The training step builds it on the host, where the labels are, so that selecting the rows costs
    the device no synchronization (a `nonzero` on device labels waits for the device)."""
    return _flat_positions(split_sequence(shift_labels(labels), state))


def _flat_positions(targets: torch.Tensor) -> torch.Tensor:
    """Targets `[b, s]` -> indices `[n]` of the non-ignored ones in `[s, b]` (sequence-first) order."""
    return (targets.t() != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)


class LanguageModel(nn.Module):
    def __init__(
        self,
        config: LanguageConfig,
        state: ParallelState,
        sequence_parallel: bool,
        pre_process: bool = True,
        post_process: bool = True,
        layer_numbers: Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        tcfg = config.transformer
        if tcfg.position_embedding != "rope":
            raise ValueError("the language model supports rope position embeddings only")
        self.config = config
        self.state = state
        self.pre_process = pre_process
        self.post_process = post_process
        self.sequence_parallel = sequence_parallel
        self.padded_vocab_size = pad_vocab_size(
            config.vocab_size, config.make_vocab_size_divisible_by, state.tp_size
        )
        std, dtype = tcfg.init_method_std, tcfg.params_dtype
        tied_output = post_process and config.tie_word_embeddings
        if pre_process or tied_output:
            # With tied embeddings on a last stage that does not embed, this is its own copy of the
            # table for the output layer, initialized identically (same global name) and kept equal
            # by syncing its gradient with the first stage's (see megamm.training.step).
            tied = None
            if config.tie_word_embeddings:
                tied = TiedEmbedding.TABLE if pre_process else TiedEmbedding.OUTPUT_COPY
            self.embedding = VocabParallelEmbedding(
                config.vocab_size, self.padded_vocab_size, tcfg.hidden_size,
                state=state, init=normal_init(std), dtype=dtype, tied=tied,
            )
        self.rotary: RotaryEmbedding | MultimodalRotaryEmbedding
        if config.mrope_section is None:
            self.rotary = RotaryEmbedding(tcfg.head_dim, tcfg.rotary_base)
        else:
            self.rotary = MultimodalRotaryEmbedding(tcfg.head_dim, tcfg.rotary_base, config.mrope_section)
        numbers = range(tcfg.num_layers) if layer_numbers is None else layer_numbers
        self.decoder = TransformerBlock(tcfg, state, sequence_parallel, numbers)
        if post_process:
            self.final_norm = build_norm(tcfg, state, sequence_parallel)
            # Tied: the output layer multiplies by the embedding table instead of its own weight. Its
            # input is always replicated over tp: under sequence parallelism `forward` gathers the
            # sequence first, so the loss positions can be picked from the whole sequence.
            self.output_layer = ColumnParallelLinear(
                tcfg.hidden_size, config.vocab_size, state=state, init=normal_init(std), bias=False,
                padded_out_features=self.padded_vocab_size,
                skip_weight=config.tie_word_embeddings, dtype=dtype,
            )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[b, s]` token ids -> `[b, s, h]` embeddings, replicated across tp."""
        return self.embedding(input_ids)

    @property
    def position_axes(self) -> int:
        """Position ids per token: 3 with M-RoPE (temporal, height, width), else 1."""
        return 1 if self.config.mrope_section is None else len(self.config.mrope_section)

    def _packed_rows(self, segment_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     seq: int) -> torch.Tensor | PackedRows:
        """The decoder's form of packed rows given as segment ids `[b, s]`: the same-segment mask
        `[b, 1, s, s]` at cp = 1 (the attention core adds causality), `PackedRows` under cp."""
        if attention_mask is not None:
            raise ValueError("give packed rows as attention_mask or as segment_ids, not both")
        if segment_ids.dim() != 2 or segment_ids.shape[1] != seq:
            raise ValueError(f"segment_ids must be [batch, {seq}] (the whole sequence), got {tuple(segment_ids.shape)}")
        rows = PackedRows(segment_ids)
        return rows if self.state.cp_size > 1 else rows.allowed(slice(None), slice(None))

    def rotary_tables(self, position_ids: torch.Tensor | None, start: int, seq: int, batch: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) `[s, b, 1, d]` for position ids `[b, s]` (1-D rope) or `[3, b, s]` (M-RoPE);
        None: the text positions start .. start + s - 1 (on every axis)."""
        axes = self.position_axes
        if position_ids is None:
            position_ids = torch.arange(start, start + seq, device=device).expand(batch, seq)
            if axes > 1:
                position_ids = position_ids.expand(axes, batch, seq)
        expected = (batch, seq) if axes == 1 else (axes, batch, seq)
        if tuple(position_ids.shape) != expected:
            form = "[b, s]" if axes == 1 else f"[{axes}, b, s] (language.mrope_section is set: M-RoPE)"
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; this language model takes "
                             f"{form}, here {list(expected)}")
        return self.rotary(position_ids)

    def forward(
        self,
        hidden_states: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool = False,
        kv_cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        loss_positions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run this stage's part of the decoder.

        hidden_states: `[s, b, h]` embeddings on the first stage (split here under SP), or the
            previous stage's output `[s/tp, b, h]` (SP) / `[s, b, h]` on later stages; with context
            parallelism s is this rank's share s/cp (megamm.parallel.context), while labels,
            position_ids (any `[..., b, s]` the rotary takes) and attention_mask cover the whole
            sequence and are split here.
        labels: `[b, s]` aligned with the input ids (Hugging Face convention, -100 = ignore); the
            loss at position i is for predicting labels[i + 1].
        segment_ids: packed rows in O(s), `[b, s]` int64 (megamm.data.packing.segment_ids), instead of
            a dense attention_mask: a token attends the earlier tokens of its own segment. At cp = 1
            the stage builds the `[b, 1, s, s]` mask once from them; under context parallelism ring
            attention derives each block's mask from them (no `[s, s]` mask is built).
        Returns {"hidden_states"} on non-last stages; on the last stage {"loss": `[b, s]` fp32
        per-token loss, zero where ignored, "loss_mask": `[b, s]` bool} (this rank's s/cp positions)
        and "logits" `[s, b, V_pad/tp]` when `return_logits` or without labels: the output layer
        then runs at every position, otherwise at the loss positions only.
        loss_positions: `loss_positions(labels, state)` built ahead (the training step does, on the
            host); None derives it here from the labels.
        kv_cache (generation, no sequence parallelism): the s positions continue the cached ones
            (default position_ids: offset .. offset + s - 1) and are appended to the cache; the
            last stage returns the logits of the last position only, `[1, b, V_pad/tp]`, the one
            the next token is drawn from (a prompt's logits over the vocabulary would be the
            largest tensor of the step).
        """
        if kv_cache is not None:
            if segment_ids is not None:
                raise ValueError("generation takes a dense attention_mask, not segment_ids")
            return self._generation_step(hidden_states, position_ids, attention_mask, kv_cache)
        if self.pre_process and self.sequence_parallel:
            hidden_states = scatter_to_sequence_parallel_region(hidden_states, self.state.tp_group)
        batch = hidden_states.shape[1]
        seq = hidden_states.shape[0] * (self.state.tp_size if self.sequence_parallel else 1) * self.state.cp_size
        # Context parallelism: the per-token inputs cover the whole sequence; this rank keeps the rotary
        # tables of its positions (whatever their form, 1-D or M-RoPE) and, for ring attention, the
        # mask's query rows over every key column.
        cos, sin = self.rotary_tables(position_ids, 0, seq, batch, hidden_states.device)
        rotary = (split_sequence(cos, self.state, dim=0), split_sequence(sin, self.state, dim=0))
        if segment_ids is not None:
            attention_mask = self._packed_rows(segment_ids, attention_mask, seq)
        elif attention_mask is not None:
            attention_mask = split_sequence(attention_mask, self.state, dim=-2)
        hidden_states = self.decoder(hidden_states, rotary, attention_mask)
        if not self.post_process:
            return {"hidden_states": hidden_states}
        hidden_states = self.final_norm(hidden_states)
        if self.sequence_parallel:
            # The output layer is column-parallel and takes a replicated input: its backward sums the
            # input grad over tp, so the gather's backward only splits.
            hidden_states = gather_from_sequence_parallel_region(hidden_states, self.state.tp_group,
                                                                 grad_is_partial=False)
        out: dict[str, torch.Tensor] = {}
        targets = None
        if labels is not None:
            # Shifted on the whole sequence, then split: a chunk's last target is the next chunk's
            # first token.
            targets = split_sequence(shift_labels(labels), self.state)  # [b, s/cp]
            out["loss_mask"] = targets != IGNORE_INDEX
            if not return_logits:
                out["loss"] = self._loss_at_positions(hidden_states, targets, loss_positions)
                return out
        logits = self._output(hidden_states)
        out["logits"] = logits
        if targets is not None:
            out["loss"] = vocab_parallel_cross_entropy(
                logits, targets.t(), self.config.vocab_size, self.state.tp_group
            ).t()
        return out

    def _output(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Replicated `[..., h]` -> vocab-split logits `[..., V_pad/tp]` (tied: by the embedding table)."""
        tied_weight = self.embedding.weight if self.config.tie_word_embeddings else None
        return self.output_layer(hidden_states, weight=tied_weight)

    def _loss_at_positions(self, hidden_states: torch.Tensor, targets: torch.Tensor,
                           positions: torch.Tensor | None) -> torch.Tensor:
        """Per-token loss `[b, s]` (zero where ignored) from replicated hidden states `[s, b, h]` and
        targets `[b, s]`, with the output layer and the cross entropy at `positions` `[n]` only (see
        `loss_positions`). Every tp rank holds the same targets, so all pick the same rows and the
        vocab-parallel reductions match; the rows left out would get a zero loss and zero gradients.
        """
        if positions is None:
            positions = _flat_positions(targets)
        elif positions.dim() != 1 or positions.dtype != torch.int64:
            raise ValueError(f"loss_positions must be int64 indices [n] (megamm.models.language.loss_positions), "
                             f"got {positions.dtype} of shape {tuple(positions.shape)}")
        seq, batch = hidden_states.shape[:2]
        positions = positions.to(hidden_states.device)
        rows = hidden_states.flatten(0, 1).index_select(0, positions)  # [n, h]
        picked = targets.t().reshape(-1).index_select(0, positions)  # [n]
        loss = vocab_parallel_cross_entropy(self._output(rows), picked, self.config.vocab_size, self.state.tp_group)
        return loss.new_zeros(seq * batch).index_copy(0, positions, loss).view(seq, batch).t()

    def _generation_step(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        kv_cache: KVCache,
    ) -> dict[str, torch.Tensor]:
        """`forward` with a KV cache: `[s, b, h]` new positions in, last-position logits out."""
        if self.sequence_parallel:
            raise ValueError("generation with a KV cache needs a model built without sequence parallelism")
        if self.state.cp_size > 1:
            raise ValueError("generation with a KV cache needs context-parallel size 1")
        seq, batch = hidden_states.shape[:2]
        rotary = self.rotary_tables(position_ids, kv_cache.length, seq, batch, hidden_states.device)
        hidden_states = self.decoder(hidden_states, rotary, attention_mask, kv_cache=kv_cache)
        kv_cache.advance(seq)
        if not self.post_process:
            return {"hidden_states": hidden_states}
        return {"logits": self._output(self.final_norm(hidden_states[-1:]))}
