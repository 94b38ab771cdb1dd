"""tools/plot_training.py draws one or several runs from their history.json."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plot_training_compares_runs(tmp_path):
    for name, slope in (("a", 1.0), ("b", 0.5)):
        run = tmp_path / name
        run.mkdir()
        history = [{"step": 100 * i, "val_usdr": slope * i, "train_loss": 1.0 / i, "minutes": i} for i in (1, 2, 3)]
        (run / "history.json").write_text(json.dumps(history))
    out = tmp_path / "curves.png"
    subprocess.run([sys.executable, str(ROOT / "tools/plot_training.py"), str(tmp_path / "a"),
                    str(tmp_path / "b"), "--out", str(out), "--x", "minutes"], check=True, capture_output=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([sys.executable, str(ROOT / "tools/plot_training.py"), str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "history.json not found" in missing.stderr
