"""`make demo`'s driver on a reduced schedule: the model trained through phase 0 and the two LLaVA
stages (tensor parallel, packed rows, sharded checkpoints) answers held-out questions it can only
answer by looking, well above the same model given a blank image; a LoRA stage 2 from the same
stage-1 checkpoint (`--lora`: trained through `megamm.train` at tp=2 with sequence parallelism on a
`--pretrained-checkpoint`, merged by tools/merge_lora.py) comes close to the full stage 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# How far below the full stage 2's held-out accuracy the LoRA stage 2 may land (absolute).
LORA_GAP = 0.1


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the demo and its LoRA stage 2: ~2 minutes quiet, 10+ on a crowded 2-core machine
def test_quick_demo_learns_to_see(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "demo.py"), "--out", str(out), "--quick", "--lora"],
        cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    seeing, blank = results["with_image"]["by_type"], results["blank_image"]["by_type"]
    # Counting needs the image; without it the model can only guess (a third of the answers).
    assert seeing["count"]["accuracy"] >= blank["count"]["accuracy"] + 0.3, (seeing, blank)
    assert results["with_image"]["accuracy"] > results["blank_image"]["accuracy"] + 0.1
    for phase in ("phase0", "stage1", "stage2", "stage2_lora", "stage2_lora_merged"):
        assert (out / "checkpoints" / phase / "latest").is_file()
    lora = results["lora_with_image"]
    assert lora["accuracy"] >= results["with_image"]["accuracy"] - LORA_GAP, (lora, results["with_image"])
    assert lora["by_type"]["count"]["accuracy"] >= blank["count"]["accuracy"] + 0.3, (lora, blank)
    assert "Held-out accuracy" in done.stdout and "checkpoints:" in done.stdout

