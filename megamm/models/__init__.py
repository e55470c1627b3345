"""The vision tower, the projector, the language model and the LLaVA model that joins them."""
