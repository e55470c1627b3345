"""Conversion between megamm checkpoints and Hugging Face (and original LLaVA / Meta LLaMA) weights.

readers.py      weight files of a source directory, read one tensor at a time
hf_config.py    Hugging Face config.json <-> LlavaConfig
hf_keys.py      source key spellings -> canonical names, and megamm parameter <-> canonical tensors
meta_llama.py   Meta-format LLaMA weights (consolidated.*.pth + params.json) as a source
writer.py       a megamm checkpoint written by one process, streaming tensor by tensor
importer.py     sources -> megamm checkpoint
exporter.py     megamm checkpoint -> Hugging Face LLaVA directory
"""


class ConversionError(Exception):
    """A conversion that cannot be done faithfully; the message says what and why."""
