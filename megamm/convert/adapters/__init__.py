"""One adapter per checkpoint layout megamm converts from or to (registered in
megamm.config.registry.HF_ARCHITECTURES), after torchtitan's per-model state-dict adapters.

An adapter holds its layout's key spelling (`canonical_name`), its config mapping and its refusal
rules; it composes the component families (megamm.models.towers, megamm.models.decoders,
megamm.models.projectors), which hold the component-level mapping. The importer and the exporter
are loops over adapters and never name a layout's keys or fields themselves.

    llava-hf         LlavaForConditionalGeneration (both key spellings); import and export
    llava-next-hf    LlavaNextForConditionalGeneration (llava-hf's layout + image_newline); import and export
    llava-onevision-hf  LlavaOnevisionForConditionalGeneration (LLaVA-NeXT's + anyres_max_N); import and export
    original-llava   LLaVA's own LlavaLlamaForCausalLM (model.mm_projector); import
    vision-tower     a CLIP / SigLIP directory (vision model or full model); import
    causal-lm        a LLaMA / Mistral / Qwen2 causal LM directory; import
    meta-llama       Meta-format LLaMA (consolidated.*.pth + params.json); import
    qwen2-vl-hf      Qwen2VLForConditionalGeneration (both key spellings); import and export
    qwen2.5-vl-hf    Qwen2_5_VLForConditionalGeneration (the same layout, its own tower); import and export
"""
