"""The Meta-format rotary permutation, checked against Meta's own rotary embedding.

Meta's original LLaMA code (llama/model.py: `precompute_freqs_cis`, `apply_rotary_emb`) views each
head's q and k as d/2 complex numbers made of channels (2i, 2i + 1) and multiplies pair i at
position t by `exp(i t theta_i)`, `theta_i = base^(-2i/d)`. megamm (megamm/transformer/rope.py) uses
the Hugging Face "rotate half" form: channel j is rotated together with channel j + d/2 by
`theta_j`. The Meta importer (megamm/convert/adapters/meta_llama.py, `MetaLlamaFiles.get`) therefore permutes
the rows of wq and wk so that the two give the same attention.

The fixture is a small Meta checkpoint written from random weights, with no help from megamm (in
particular not from its inverse permutation `rotate_half_to_meta`): params.json plus two
model-parallel `consolidated.NN.pth` shards, GQA (4 query heads, 2 key/value heads). The test
implements Meta's complex rotation itself and checks, for positions 0..6 and 40..46:

- the attention scores q_t . k_u of every head (what the model consumes; independent of the channel
  order within a head) are the same for Meta's q, k and megamm's rotary on the converted weights;
- the rotated q and k themselves are the same under the Hugging Face layout: rotate-half channel j
  holds the real part and channel j + d/2 the imaginary part of Meta's complex pair j. That layout
  is forced: `rope.py` gives channels j and j + d/2 the frequency theta_j, and its rotation
  (x_j cos - x_{j+d/2} sin, x_{j+d/2} cos + x_j sin) is (a + ib) e^{i phi} with a = x_j, b = x_{j+d/2}.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megamm.convert.adapters.meta_llama import MetaLlamaFiles
from megamm.transformer.rope import RotaryEmbedding, apply_rotary

DIM, HEADS, KV_HEADS, FFN, VOCAB = 32, 4, 2, 48, 20
HEAD_DIM = DIM // HEADS
THETA = 500.0
SHARDS = 2


def _meta_weights() -> dict[str, torch.Tensor]:
    """Random full (unsharded) Meta-format weights of a 1-layer LLaMA."""
    generator = torch.Generator().manual_seed(21)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) / DIM**0.5

    return {
        "tok_embeddings.weight": randn(VOCAB, DIM),
        "norm.weight": torch.ones(DIM),
        "output.weight": randn(VOCAB, DIM),
        "layers.0.attention.wq.weight": randn(HEADS * HEAD_DIM, DIM),
        "layers.0.attention.wk.weight": randn(KV_HEADS * HEAD_DIM, DIM),
        "layers.0.attention.wv.weight": randn(KV_HEADS * HEAD_DIM, DIM),
        "layers.0.attention.wo.weight": randn(DIM, HEADS * HEAD_DIM),
        "layers.0.feed_forward.w1.weight": randn(FFN, DIM),
        "layers.0.feed_forward.w3.weight": randn(FFN, DIM),
        "layers.0.feed_forward.w2.weight": randn(DIM, FFN),
        "layers.0.attention_norm.weight": torch.ones(DIM),
        "layers.0.ffn_norm.weight": torch.ones(DIM),
    }


# Meta's model-parallel split: column-parallel weights along dim 0 (whole heads per shard), row-parallel
# ones along dim 1, the LLaMA 1/2 embedding along its width, norms replicated.
_SPLIT_DIM = {"tok_embeddings.weight": 1, "output.weight": 0, "layers.0.attention.wq.weight": 0,
              "layers.0.attention.wk.weight": 0, "layers.0.attention.wv.weight": 0,
              "layers.0.attention.wo.weight": 1, "layers.0.feed_forward.w1.weight": 0,
              "layers.0.feed_forward.w3.weight": 0, "layers.0.feed_forward.w2.weight": 1}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], Path]:
    directory = tmp_path_factory.mktemp("meta-llama")
    weights = _meta_weights()
    params = {"dim": DIM, "n_layers": 1, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "vocab_size": VOCAB,
              "norm_eps": 1e-5, "rope_theta": THETA, "multiple_of": 16}
    (directory / "params.json").write_text(json.dumps(params))
    for shard in range(SHARDS):
        piece = {key: (t if key not in _SPLIT_DIM else t.chunk(SHARDS, dim=_SPLIT_DIM[key])[shard]).clone()
                 for key, t in weights.items()}
        torch.save(piece, directory / f"consolidated.{shard:02d}.pth")
    return weights, directory


def meta_apply_rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Meta's rotary, written after llama/model.py: x `[b, s, heads, d]`, positions `[b, s]`; pairs
    (2i, 2i + 1) as complex numbers times polar(1, t * theta^(-2i/d)). Computed in float64."""
    d = x.shape[-1]
    freqs = 1.0 / (THETA ** (torch.arange(0, d, 2, dtype=torch.float64)[: d // 2] / d))
    angles = positions.to(torch.float64).unsqueeze(-1) * freqs  # [b, s, d/2]
    freqs_cis = torch.polar(torch.ones_like(angles), angles).unsqueeze(2)  # [b, s, 1, d/2]
    pairs = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(pairs * freqs_cis).flatten(3)


def megamm_rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """megamm's rotary on x `[b, s, heads, d]` (rope.py works on `[s, b, heads, d]`), same layout back."""
    cos, sin = RotaryEmbedding(x.shape[-1], THETA)(positions)
    return apply_rotary(x.transpose(0, 1), cos, sin).transpose(0, 1)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, DIM, generator=generator)
    positions = torch.stack([torch.arange(7), torch.arange(40, 47)])
    return x, positions


def _project(x: torch.Tensor, weight: torch.Tensor, heads: int) -> torch.Tensor:
    return (x @ weight.T).view(*x.shape[:-1], heads, HEAD_DIM)


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`[b, heads, s, s]` q_t . k_u, each query head against its GQA key/value head."""
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=2)
    return torch.einsum("bthd,buhd->bhtu", q.double(), k.double())


def _rotated(checkpoint) -> dict[str, torch.Tensor]:
    """Meta's rotated q, k from the Meta weights and megamm's from the imported weights."""
    weights, directory = checkpoint
    files = MetaLlamaFiles(directory)
    x, positions = _inputs()
    wq = files.get("text.layers.0.self_attn.q_proj.weight")
    wk = files.get("text.layers.0.self_attn.k_proj.weight")
    meta_wq, meta_wk = weights["layers.0.attention.wq.weight"], weights["layers.0.attention.wk.weight"]
    return {
        "meta_q": meta_apply_rotary(_project(x, meta_wq, HEADS), positions),
        "meta_k": meta_apply_rotary(_project(x, meta_wk, KV_HEADS), positions),
        "ours_q": megamm_rotary(_project(x, wq, HEADS), positions),
        "ours_k": megamm_rotary(_project(x, wk, KV_HEADS), positions),
    }


def test_imported_weights_are_a_row_permutation_of_metas(checkpoint) -> None:
    """The importer joins the two shards and only reorders rows within heads (v is untouched)."""
    weights, directory = checkpoint
    files = MetaLlamaFiles(directory)
    for name, key, heads in (("q_proj", "wq", HEADS), ("k_proj", "wk", KV_HEADS)):
        ours = files.get(f"text.layers.0.self_attn.{name}.weight").view(heads, HEAD_DIM, DIM)
        meta = weights[f"layers.0.attention.{key}.weight"].view(heads, HEAD_DIM, DIM)
        assert not torch.equal(ours, meta)
        for head in range(heads):
            assert sorted(map(tuple, ours[head].tolist())) == sorted(map(tuple, meta[head].tolist()))
    wv = files.get("text.layers.0.self_attn.v_proj.weight")
    assert torch.equal(wv, weights["layers.0.attention.wv.weight"])


def test_attention_scores_match_metas_rotary(checkpoint) -> None:
    """Every head's q . k over all position pairs: Meta's rotary on Meta's weights == megamm's rotary on
    the imported weights (fp32 rounding of the projections; the scores are O(1))."""
    r = _rotated(checkpoint)
    expected = _scores(r["meta_q"], r["meta_k"])
    torch.testing.assert_close(_scores(r["ours_q"], r["ours_k"]), expected, rtol=1e-5, atol=1e-5)
    # Rotary does something here: the scores are not those without position information.
    weights, _ = checkpoint
    x, _ = _inputs()
    plain = _scores(_project(x, weights["layers.0.attention.wq.weight"], HEADS),
                    _project(x, weights["layers.0.attention.wk.weight"], KV_HEADS))
    assert (plain - expected).abs().max() > 0.1


def test_rotated_q_and_k_in_hugging_face_layout(checkpoint) -> None:
    """Rotate-half channel j is the real part, j + d/2 the imaginary part, of Meta's pair j."""
    r = _rotated(checkpoint)
    for name in ("q", "k"):
        meta = r[f"meta_{name}"]
        pairs = meta.reshape(*meta.shape[:-1], HEAD_DIM // 2, 2)
        as_rotate_half = torch.cat([pairs[..., 0], pairs[..., 1]], dim=-1)
        torch.testing.assert_close(r[f"ours_{name}"].double(), as_rotate_half, rtol=1e-5, atol=1e-5)
