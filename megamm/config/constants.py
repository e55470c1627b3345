"""Constants shared by every layer (the config layer sits below them all)."""

# The label of a position that contributes no loss (prompt turns, image tokens, padding); the value
# Hugging Face and PyTorch's cross entropy use, so labels move between the two unchanged.
IGNORE_INDEX = -100

# The pixel ranges Qwen2-VL's image and video processors resize into (per image; per video frame),
# the defaults of --min-pixels / --max-pixels and --video-min-pixels / --video-max-pixels.
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 28 * 28 * 768
# Qwen2-VL's video processor samples 2 frames per second, at most 768 frames (--video-fps, --video-max-frames).
VIDEO_FPS = 2.0
VIDEO_MAX_FRAMES = 768
# LLaVA-OneVision takes the same number of frames from every video (--video-max-frames); its training
# sampled 32 (frames_upbound).
ONEVISION_VIDEO_FRAMES = 32
