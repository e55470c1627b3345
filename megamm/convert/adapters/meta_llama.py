"""Meta-format LLaMA weights (`consolidated.NN.pth` + `params.json`) as a conversion source.

Two differences from the Hugging Face layout are undone here:

- Rotary layout: Meta's q and k projections pair channel 2i with 2i + 1 of each head (the complex
  form); megamm, like Hugging Face, pairs channel i with i + d/2 ("rotate half"). The rows of wq
  (per query head) and wk (per key/value head) are permuted: within a head, row `2i + j` moves to
  `j * d/2 + i`.
- Model-parallel shards: Meta's `consolidated.NN.pth` files are tensor-parallel pieces; column-
  parallel weights (wq, wk, wv, w1, w3, output) are joined along dim 0, row-parallel ones (wo, w2)
  along dim 1, the token embedding along whichever dim its pieces are short of, norms are shared.

Tensors are exposed under canonical names (megamm.convert.hf_keys), so the adapter's key map is the
identity.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from megamm.config import LanguageConfig, TransformerConfig
from megamm.convert import ConversionError
from megamm.convert.adapters.base import Adapter
from megamm.convert.hf_config import HfExtras
from megamm.convert.readers import TensorInfo, read_json

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_TOP_NAMES = {"norm.weight": ("text.norm.weight", None), "output.weight": ("text.lm_head.weight", 0),
              "tok_embeddings.weight": ("text.embed_tokens.weight", "embedding")}
IGNORED = ("rope.freqs",)


def meta_to_rotate_half(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """`[heads * d, in]` rows in Meta's interleaved rotary order -> rotate-half order."""
    rows, columns = weight.shape
    return weight.view(heads, rows // heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def rotate_half_to_meta(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `meta_to_rotate_half` (used by tests to write Meta-format weights)."""
    rows, columns = weight.shape
    return weight.view(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


class MetaLlamaFiles:
    """Canonical-name access to a Meta checkpoint: `names`, `info(name)`, `get(name)`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.params = read_json(self.directory / "params.json")
        paths = sorted(self.directory.glob("consolidated.*.pth"))
        if not paths:
            raise ConversionError(f"{self.directory}: no consolidated.*.pth files (Meta-format LLaMA weights)")
        self.shards = []
        for path in paths:
            try:
                self.shards.append(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
            except Exception as error:  # torch.load raises many types; all mean "unreadable"
                raise ConversionError(f"{path}: cannot be read as a weights-only PyTorch file: {error}") from error
        missing = {"dim", "n_layers", "n_heads"} - set(self.params)
        if missing:
            raise ConversionError(f"{self.directory / 'params.json'}: missing {', '.join(sorted(missing))}")
        if self.params.get("use_scaled_rope"):
            raise ConversionError(f"{self.directory / 'params.json'}: use_scaled_rope (LLaMA 3.1 rope scaling) is not "
                                  f"implemented by megamm's rotary embedding")
        self.heads = self.params["n_heads"]
        self.kv_heads = self.params.get("n_kv_heads") or self.heads
        self._names: dict[str, tuple[str, object]] = {}
        self.ignored: list[str] = []
        for key in self.shards[0]:
            name = self._canonical(key)
            if name is None:
                if key not in IGNORED:
                    raise ConversionError(f"{paths[0]}: tensor {key} is not part of a LLaMA model")
                self.ignored.append(key)
        self._infos = {name: self._info(name) for name in self._names}

    def _canonical(self, key: str) -> str | None:
        match = _LAYER.match(key)
        if match and match.group(2) in _LAYER_NAMES:
            suffix, dim = _LAYER_NAMES[match.group(2)]
            name = f"text.layers.{match.group(1)}.{suffix}"
        elif key in _TOP_NAMES:
            name, dim = _TOP_NAMES[key]
        else:
            return None
        self._names[name] = (key, dim)
        return name

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def _dim(self, name: str) -> int | None:
        key, dim = self._names[name]
        if dim != "embedding":
            return dim
        pieces = [shard[key].shape for shard in self.shards]
        vocab = self.params.get("vocab_size", -1)
        # LLaMA 1/2 split the table over the embedding width, LLaMA 3 over the vocabulary.
        return 0 if vocab > 0 and pieces[0][0] != vocab else (1 if len(pieces) > 1 else None)

    def _info(self, name: str) -> TensorInfo:
        key, _ = self._names[name]
        first = self.shards[0][key]
        shape = list(first.shape)
        dim = self._dim(name)
        if dim is not None and len(self.shards) > 1:
            shape[dim] = sum(shard[key].shape[dim] for shard in self.shards)
        return TensorInfo(self.directory, tuple(shape), first.dtype)

    def get(self, name: str) -> torch.Tensor:
        key, _ = self._names[name]
        dim = self._dim(name)
        if dim is None or len(self.shards) == 1:
            tensor = self.shards[0][key].clone()
        else:
            tensor = torch.cat([shard[key] for shard in self.shards], dim=dim)
        if name.endswith("q_proj.weight"):
            tensor = meta_to_rotate_half(tensor, self.heads)
        elif name.endswith("k_proj.weight"):
            tensor = meta_to_rotate_half(tensor, self.kv_heads)
        return tensor

    def language_config(self, max_position_embeddings: int) -> tuple[LanguageConfig, HfExtras]:
        p = self.params
        vocab, _ = self.info("text.embed_tokens.weight").shape
        if p.get("vocab_size", -1) > 0 and p["vocab_size"] != vocab:
            raise ConversionError(f"{self.directory / 'params.json'}: vocab_size {p['vocab_size']} but tok_embeddings "
                                  f"has {vocab} rows (mismatched vocab)")
        transformer = TransformerConfig(
            hidden_size=p["dim"], num_layers=p["n_layers"], num_attention_heads=self.heads,
            num_query_groups=self.kv_heads, ffn_hidden_size=self.info("text.layers.0.mlp.gate_proj.weight").shape[0],
            normalization="rmsnorm", norm_epsilon=float(p.get("norm_eps", 1e-5)), activation="swiglu",
            position_embedding="rope", rotary_base=float(p.get("rope_theta", 10000.0)),
            max_position_embeddings=max_position_embeddings, causal=True,
        )
        return LanguageConfig(transformer=transformer, vocab_size=vocab, image_token_id=0), HfExtras()


class MetaLlamaAdapter(Adapter):
    name = "meta-llama"

    def canonical_name(self, key: str) -> str | None:
        return key

    @staticmethod
    def holds(directory: Path) -> bool:
        """Whether `directory` holds Meta-format weights (params.json and consolidated.*.pth)."""
        return (directory / "params.json").is_file() and any(directory.glob("consolidated.*.pth"))


ADAPTER = MetaLlamaAdapter()
