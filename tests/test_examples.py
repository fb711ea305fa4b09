"""Every script in examples/ runs (on tiny settings, in a fresh process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> lines its output must contain
EXPECTED = {
    "compile_with_klseg.py": ["mean_iou:", "pixel_accuracy:", "class names: ['sky'"],
    "finetune_from_python.py": ["source_mean_iou:", "target_mean_iou:", "forgetting:"],
    "serve_export.py": ["30x30 image:", "27x30 image:"],
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--tiny"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for line in EXPECTED[script]:
        assert line in result.stdout, result.stdout
