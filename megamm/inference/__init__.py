"""Generation with a KV cache, tensor-parallel aware.

kv_cache (per-layer key/value buffers), logits (vocab-parallel logits -> full vocabulary), sampling
(greedy, temperature, top-k, top-p), generation (the batched loop over a LlavaModel), session
(a checkpoint, its tokenizer, template and image settings: questions in, answers out), vqa (exact-match
scoring of LLaVA-format question files), cli (what the two tools share). See docs/generation.md. This package file imports nothing, so the transformer
layers can import the cache type without pulling in the rest.
"""
