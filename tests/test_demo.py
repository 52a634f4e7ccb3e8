"""The README's main command (`./run demo`) runs end to end."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_both_loaders_agree(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--output", str(tmp_path / "checkpoint")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(16, 64) |             8,192 |" in result.stdout
    assert "sentence-transformers MultiVectorEncoder on the same folder" in result.stdout
