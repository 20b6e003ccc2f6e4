"""A short run of the decoder fuzz campaign (bench/fuzz_decoders.py): every mutated video ends
as good, bad with a reason, or a named crash / time-out, and the loader accounts for all."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("av")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "fuzz_decoders.py"


@pytest.mark.slow
def test_mutated_videos_all_end_accounted(tmp_path):
    out = tmp_path / "fuzz"
    res = subprocess.run([sys.executable, str(SCRIPT), str(out), "--inputs", "40", "--seed", "7",
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    outcomes = r["inspect"]["outcomes"]
    assert sum(outcomes.values()) == 40
    assert all(k == "good" or k.split(":")[0] in ("bad", "crash", "timeout") for k in outcomes), outcomes
    assert "good" in outcomes and any(k.startswith("bad:") for k in outcomes), "the mutations must reach both"
    assert not any(k.startswith("exception") for k in outcomes), r["found"]
    loader = r["loader"]
    assert loader["files"] == 80 and loader["accounted"] == loader["files"], loader
