"""Conversion between megamm checkpoints and Hugging Face (and original LLaVA / Meta LLaMA) weights.

readers.py      weight files of a source directory, read one tensor at a time
hf_config.py    reading config.json through transformers; the Hugging Face fields an export gives back
hf_keys.py      canonical tensor names; megamm parameters <-> canonical tensors (from the families)
adapters/       one adapter per checkpoint layout (llava-hf, original LLaVA, vision tower, causal LM,
                Meta LLaMA): key spelling, config mapping, refusal rules
writer.py       a megamm checkpoint written by one process, streaming tensor by tensor
importer.py     sources -> megamm checkpoint
exporter.py     megamm checkpoint -> Hugging Face LLaVA directory (through an export adapter)
"""


class ConversionError(Exception):
    """A conversion that cannot be done faithfully; the message says what and why."""
