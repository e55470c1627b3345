"""Sources -> a megamm checkpoint, on one process, streaming tensor by tensor.

Four kinds of input, each directory read through its adapter (megamm.convert.adapters):
- a llava-hf directory (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration or
  LlavaOnevisionForConditionalGeneration: config.json + weights, either key spelling);
- a Qwen2-VL or Qwen2.5-VL directory (Qwen2VLForConditionalGeneration /
  Qwen2_5_VLForConditionalGeneration, either key spelling);
- an original LLaVA directory (LlavaLlamaForCausalLM with `model.mm_projector`) plus the CLIP
  directory its `mm_vision_tower` names;
- a CLIP/SigLIP directory plus a causal LM directory of a language-model family (LLaMA, Mistral,
  Qwen2; Hugging Face format, or Meta format for LLaMA): the projector is left out of the
  checkpoint, and a training run that loads it initializes the projector from its --seed
  (megamm.checkpoint.checkpointer accepts exactly that gap).

The checkpoint is layout independent (master tensors); `tensor_parallel` / `pipeline_parallel`
only decide which layout the model config is validated for and recorded with.

When the text model has no image token (original LLaVA and separate towers), rows are appended to
the embedding and output tables for the image token and, if asked, a pad token; the vocabulary is
then padded to a multiple (llava-hf uses 64). The new rows are the mean of the existing rows (a
neutral start that keeps logits of the new tokens at the average, as Hugging Face does when
resizing). Every source tensor is either used, kept aside (`hf_extra/`, given back on export), or
named as not part of a LLaVA model; anything else stops the conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from megamm.checkpoint import format
from megamm.config import ConfigError, LanguageConfig, LlavaConfig, ParallelConfig, ProjectorConfig
from megamm.config.layout import layout_problems
from megamm.config.parsing import run_config_to_dict
from megamm.config.precision import dtype_named
from megamm.config.registry import HF_ARCHITECTURES
from megamm.config.run import RunConfig
from megamm.convert import ConversionError
from megamm.convert.adapters.base import Adapter
from megamm.convert.adapters.causal_lm import language_config_from_hf
from megamm.convert.adapters.meta_llama import MetaLlamaFiles
from megamm.convert.adapters.vision_tower import vision_config_from_hf
from megamm.convert.hf_config import HfExtras
from megamm.convert.hf_keys import derived, kept_aside, model_entries
from megamm.convert.readers import TensorInfo, WeightFiles, read_json
from megamm.convert.writer import LazyTensor, write_checkpoint
from megamm.models.keymap import Entry
from megamm.models.llava import LlavaModel
from megamm.parallel.params import param_specs
from megamm.parallel.state import ParallelState


class TensorFiles(Protocol):
    names: list[str]

    def info(self, name: str) -> TensorInfo: ...

    def get(self, name: str) -> torch.Tensor: ...


@dataclass
class Summary:
    """What an import did, for the tool's report."""

    path: Path
    config: LlavaConfig
    tensors: int = 0
    parameters: int = 0
    kept_aside: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    added_tokens: dict[str, int] = field(default_factory=dict)
    fresh_projector: bool = False


class CanonicalTensors:
    """Canonical name -> (file reader, key) over one or more source directories."""

    def __init__(self) -> None:
        self.where: dict[str, tuple[TensorFiles, str]] = {}
        self.skipped: list[str] = []

    def add(self, files: TensorFiles, adapter: Adapter, directory: Path) -> None:
        """Every tensor of `files`, named by the adapter of the directory's layout."""
        unknown = []
        for key in files.names:
            name = adapter.canonical_name(key)
            if name is None:
                if adapter.not_llava(key):
                    self.skipped.append(f"{directory.name}/{key}")
                    continue
                unknown.append(key)
                continue
            if name in self.where:
                raise ConversionError(f"{directory}: {key} duplicates {name}, already read from another file")
            self.where[name] = (files, key)
        if unknown:
            raise ConversionError(f"{directory}: tensors with no place in a LLaVA model ({adapter.name} layout): "
                                  + ", ".join(sorted(unknown)[:20]) + (" ..." if len(unknown) > 20 else ""))

    def info(self, name: str) -> TensorInfo:
        files, key = self.where[name]
        return files.info(key)

    def get(self, name: str) -> torch.Tensor:
        files, key = self.where[name]
        return files.get(key)


@dataclass(frozen=True)
class VocabExtension:
    """Rows appended to the embedding and output tables: `rows` new ones, filled with the mean."""

    rows: int


def _master_shapes(config: LlavaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's master shape, from a model built on the meta device (no memory)."""
    model = LlavaModel(config, ParallelState.single("meta"))
    return {name: tuple(spec.layout.master_shape) for name, spec in param_specs(model).items()}


def _check_layout(config: LlavaConfig, tp: int, pp: int) -> None:
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    problems = config.problems(parallel)
    problems += layout_problems(config.language.transformer.num_layers, pp)
    if problems:
        raise ConversionError(f"the converted model does not fit tensor parallel {tp} x pipeline parallel {pp}:\n  - "
                              + "\n  - ".join(problems))


def _loader(source: CanonicalTensors, entry: Entry, dtype: torch.dtype, extension: VocabExtension | None
            ) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        parts = [source.get(name) for name in entry.parts]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if extension is not None and extension.rows:
            mean = tensor.float().mean(dim=0, keepdim=True).expand(extension.rows, -1)
            tensor = torch.cat([tensor, mean.to(tensor.dtype)], dim=0)
        return tensor.to(dtype)

    return load


def build_tensors(config: LlavaConfig, source: CanonicalTensors, with_projector: bool, dtype: torch.dtype | None,
                  extension: VocabExtension | None, summary: Summary) -> dict[str, LazyTensor]:
    """The checkpoint's lazy tensors; raises listing every missing, misshapen or unplaced tensor."""
    expected = _master_shapes(config)
    entries = model_entries(config, with_projector)
    problems, out = [], {}
    used = set()
    uncovered = set(expected) - {e.megamm for e in entries}
    if not with_projector:
        uncovered = {name for name in uncovered if not name.startswith("projector.")}
    if uncovered:
        raise ConversionError(f"internal: no source mapping for megamm parameters {sorted(uncovered)}")
    for entry in entries:
        absent = [name for name in entry.parts if name not in source.where]
        if absent:
            problems.append(f"{entry.megamm}: missing {', '.join(absent)}")
            continue
        infos = [source.info(name) for name in entry.parts]
        rows = sum(info.shape[0] for info in infos)
        vocab_table = entry.megamm in ("language.embedding.weight", "language.output_layer.weight")
        grow = extension if vocab_table else None
        shape = (rows + (grow.rows if grow else 0), *infos[0].shape[1:])
        if any(info.shape[1:] != infos[0].shape[1:] for info in infos) or shape != expected[entry.megamm]:
            found = " + ".join(f"{name} {list(info.shape)}" for name, info in zip(entry.parts, infos))
            hint = " (mismatched vocab: the tables' rows differ from the config's vocab_size)" if vocab_table else ""
            problems.append(f"{entry.megamm}: expected {list(expected[entry.megamm])}, source has {found}{hint}")
            continue
        used.update(entry.parts)
        out[entry.megamm] = LazyTensor(shape, dtype or infos[0].dtype, _loader(source, entry, dtype or infos[0].dtype, grow))
    if config.language.tie_word_embeddings and "text.lm_head.weight" in source.where:
        used.add("text.lm_head.weight")  # a tied table saved twice: the embedding is the one kept
        summary.skipped.append("text.lm_head.weight (tied to the embedding)")
    leftover = sorted(set(source.where) - used)
    for name in leftover:
        if kept_aside(config, name):
            info = source.info(name)
            out[format.HF_EXTRA + name] = LazyTensor(info.shape, info.dtype, lambda n=name: source.get(n))
            summary.kept_aside.append(name)
        elif derived(config, name):
            summary.skipped.append(name)
        elif name.startswith("projector.") and not with_projector:
            problems.append(f"{name}: the text model directory holds projector weights; import it as a LLaVA model")
        else:
            problems.append(f"{name}: no megamm parameter takes it")
    if problems:
        raise ConversionError("the source weights do not fit the model their config describes:\n  - "
                              + "\n  - ".join(problems))
    summary.tensors = len(out)
    summary.parameters = sum(t.shape.numel() for k, t in out.items() if not k.startswith(format.HF_EXTRA))
    summary.skipped = source.skipped + summary.skipped
    return out


def _save(config: LlavaConfig, extras: HfExtras, tensors: dict[str, LazyTensor], save: str | Path, tp: int, pp: int,
          sources: dict[str, str], summary: Summary) -> Summary:
    run = RunConfig(model=config, parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    layout = format.layout_signature(tp, pp, dp=1, virtual_stages=1, sequence_parallel=False)
    summary.path = write_checkpoint(save, tensors, layout, run_config_to_dict(run), converted_from=sources,
                                    hf=extras.to_dict())
    return summary


def _finish(config: LlavaConfig, extras: HfExtras, source: CanonicalTensors, save: str | Path, tp: int, pp: int,
            dtype: str | None, sources: dict[str, str], with_projector: bool = True,
            extension: VocabExtension | None = None, added: dict[str, int] | None = None) -> Summary:
    try:
        config.validate(ParallelConfig())
    except ConfigError as error:
        raise ConversionError(f"the mapped model config is not valid: {error}") from error
    _check_layout(config, tp, pp)
    summary = Summary(Path(save), config, added_tokens=added or {}, fresh_projector=not with_projector)
    tensors = build_tensors(config, source, with_projector, dtype_named(dtype, "--dtype") if dtype else None, extension, summary)
    return _save(config, extras, tensors, save, tp, pp, sources, summary)


LLAVA_ADAPTERS = ("llava-hf", "llava-next-hf", "llava-onevision-hf")


def import_llava_hf(directory: str | Path, save: str | Path, tp: int = 1, pp: int = 1, dtype: str | None = None
                    ) -> Summary:
    """A llava-hf LlavaForConditionalGeneration, LlavaNextForConditionalGeneration or
    LlavaOnevisionForConditionalGeneration directory -> megamm checkpoint (the architecture is read
    from config.json's model_type)."""
    directory = Path(directory)
    tree = read_json(directory / "config.json")
    adapters = {adapter.model_type: adapter for adapter in map(HF_ARCHITECTURES.get, LLAVA_ADAPTERS)}
    adapter = adapters.get(tree.get("model_type"))
    if adapter is None:
        raise ConversionError(f"{directory / 'config.json'}: model_type {tree.get('model_type')!r} is not one of "
                              f"{', '.join(sorted(adapters))} (LlavaForConditionalGeneration / "
                              f"LlavaNextForConditionalGeneration / LlavaOnevisionForConditionalGeneration)")
    config, extras = adapter.config_from_hf(tree, str(directory / "config.json"))
    source = CanonicalTensors()
    source.add(WeightFiles(directory), adapter, directory)
    return _finish(config, extras, source, save, tp, pp, dtype, {adapter.name: str(directory)})


def import_internvl_hf(directory: str | Path, save: str | Path, tp: int = 1, pp: int = 1, dtype: str | None = None
                       ) -> Summary:
    """An InternVLForConditionalGeneration directory -> megamm checkpoint."""
    directory = Path(directory)
    adapter = HF_ARCHITECTURES.get("internvl-hf")
    config, extras = adapter.config_from_hf(read_json(directory / "config.json"), str(directory / "config.json"))
    source = CanonicalTensors()
    source.add(WeightFiles(directory), adapter, directory)
    return _finish(config, extras, source, save, tp, pp, dtype, {adapter.name: str(directory)})


QWEN2_VL_ADAPTERS = ("qwen2-vl-hf", "qwen2.5-vl-hf")
# The layouts megamm writes as well as reads (export-hf, and the PEFT adapters of their models).
EXPORT_ARCHITECTURES = (*LLAVA_ADAPTERS, *QWEN2_VL_ADAPTERS, "internvl-hf")


def import_qwen2_vl_hf(directory: str | Path, save: str | Path, tp: int = 1, pp: int = 1, dtype: str | None = None
                       ) -> Summary:
    """A Qwen2VLForConditionalGeneration or Qwen2_5_VLForConditionalGeneration directory -> megamm
    checkpoint (the architecture is read from config.json's model_type)."""
    directory = Path(directory)
    tree = read_json(directory / "config.json")
    adapters = {adapter.model_type: adapter for adapter in map(HF_ARCHITECTURES.get, QWEN2_VL_ADAPTERS)}
    adapter = adapters.get(tree.get("model_type"))
    if adapter is None:
        raise ConversionError(f"{directory / 'config.json'}: model_type {tree.get('model_type')!r} is not one of "
                              f"{', '.join(sorted(adapters))} (Qwen2-VL / Qwen2.5-VL)")
    config, extras = adapter.config_from_hf(tree, str(directory / "config.json"))
    source = CanonicalTensors()
    source.add(WeightFiles(directory), adapter, directory)
    return _finish(config, extras, source, save, tp, pp, dtype, {adapter.name: str(directory)})


def extend_vocab(language: LanguageConfig, image_token_id: int | None, pad_token_id: int | None, multiple: int
                  ) -> tuple[VocabExtension, dict[str, int]]:
    """Place the image (and pad) token after the text vocabulary and pad it to `multiple`."""
    base = language.vocab_size
    image = base if image_token_id is None else image_token_id
    added = {"image": image}
    if pad_token_id is not None:
        added["pad"] = pad_token_id
    for token, index in added.items():
        if index < base:
            raise ConversionError(f"--{token}-token-id {index} would reuse a text token (the vocabulary has {base}); "
                                  f"new tokens take ids >= {base}")
    if len(set(added.values())) != len(added):
        raise ConversionError("--image-token-id and --pad-token-id must differ")
    size = max(added.values()) + 1
    size = -(-size // multiple) * multiple
    language.vocab_size = size
    language.image_token_id = image
    return VocabExtension(size - base), added


def _text_source(text_dir: Path, max_positions: int) -> tuple[TensorFiles, Adapter, LanguageConfig, HfExtras]:
    """The text tower's files, adapter, config and extras: Meta format, or a Hugging Face causal LM."""
    meta = HF_ARCHITECTURES.get("meta-llama")
    if meta.holds(text_dir):
        files = MetaLlamaFiles(text_dir)
        language, extras = files.language_config(max_positions)
        return files, meta, language, extras
    language, extras = language_config_from_hf(read_json(text_dir / "config.json"), str(text_dir / "config.json"))
    return WeightFiles(text_dir), HF_ARCHITECTURES.get("causal-lm"), language, extras


def import_towers(vision_dir: str | Path, text_dir: str | Path, save: str | Path, tp: int = 1, pp: int = 1,
                  projector: ProjectorConfig | None = None, select_layer: int = -2, keep_class_token: bool = False,
                  image_token_id: int | None = None, pad_token_id: int | None = None, vocab_multiple: int = 64,
                  max_position_embeddings: int = 4096, dtype: str | None = None) -> Summary:
    """A CLIP/SigLIP directory + a causal LM directory (LLaMA, Mistral, Qwen2; HF, or Meta for
    LLaMA) -> megamm checkpoint without a projector (a stage-1 run initializes it)."""
    vision_dir, text_dir = Path(vision_dir), Path(text_dir)
    vision = vision_config_from_hf(read_json(vision_dir / "config.json"), select_layer, keep_class_token,
                                   str(vision_dir / "config.json"))
    text_files, text_adapter, language, extras = _text_source(text_dir, max_position_embeddings)
    extension, added = extend_vocab(language, image_token_id, pad_token_id, vocab_multiple)
    extras.pad_token_id = added.get("pad", extras.pad_token_id)
    config = LlavaConfig(vision=vision, language=language, projector=projector or ProjectorConfig())
    source = CanonicalTensors()
    source.add(WeightFiles(vision_dir), HF_ARCHITECTURES.get("vision-tower"), vision_dir)
    source.add(text_files, text_adapter, text_dir)
    sources = {"vision": str(vision_dir), "text": str(text_dir)}
    return _finish(config, extras, source, save, tp, pp, dtype, sources, with_projector=False,
                   extension=extension, added=added)


def import_original_llava(llava_dir: str | Path, vision_dir: str | Path, save: str | Path, tp: int = 1, pp: int = 1,
                          image_token_id: int | None = None, pad_token_id: int | None = None, vocab_multiple: int = 64,
                          dtype: str | None = None) -> Summary:
    """An original LLaVA directory (+ its CLIP tower's directory) -> megamm checkpoint."""
    llava_dir, vision_dir = Path(llava_dir), Path(vision_dir)
    tree = read_json(llava_dir / "config.json")
    adapter = HF_ARCHITECTURES.get("original-llava")
    original = adapter.config_from_hf(tree, str(llava_dir / "config.json"))
    vision = vision_config_from_hf(read_json(vision_dir / "config.json"), original.select_layer,
                                   original.keep_class_token, str(vision_dir / "config.json"))
    if tree.get("mm_hidden_size") not in (None, vision.transformer.hidden_size):
        raise ConversionError(f"{llava_dir}/config.json: mm_hidden_size {tree['mm_hidden_size']} but the vision tower "
                              f"in {vision_dir} has hidden size {vision.transformer.hidden_size}")
    language, extras = original.language, original.extras
    extension, added = extend_vocab(language, image_token_id, pad_token_id, vocab_multiple)
    extras.pad_token_id = added.get("pad", extras.pad_token_id)
    config = LlavaConfig(vision=vision, language=language, projector=original.projector)
    source = CanonicalTensors()
    source.add(WeightFiles(llava_dir), adapter, llava_dir)
    if not any(name.startswith("vision.") for name in source.where):
        source.add(WeightFiles(vision_dir), HF_ARCHITECTURES.get("vision-tower"), vision_dir)
    return _finish(config, extras, source, save, tp, pp, dtype, {"original-llava": str(llava_dir),
                                                                 "vision": str(vision_dir)},
                   extension=extension, added=added)

