"""Constants shared by every layer (the config layer sits below them all)."""

# The label of a position that contributes no loss (prompt turns, image tokens, padding); the value
# Hugging Face and PyTorch's cross entropy use, so labels move between the two unchanged.
IGNORE_INDEX = -100
