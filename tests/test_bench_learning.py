"""bench/bench_learning.py end to end at toy size (--quick): every arm, protocol and class group
gets a gain with a CI, an ablated arm is compared with the plain one, the decoder diagnostic and
the targets are recorded."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_learning_quick_writes_gains_with_cis(tmp_path):
    out = tmp_path / "learning.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_learning.py"), "--quick", "--work",
                        str(tmp_path / "work"), "--out", str(out), "--ablate", "model.diffusion_loss_weight=0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    ablated = "stage1[model.diffusion_loss_weight=0]"
    assert set(res["gains"]) == {"stage1", "stage2_lowest", "stage2_random", ablated}
    # the ablated arm against the plain one, per protocol and group
    by = res["ablations"]["model.diffusion_loss_weight=0"]
    assert set(by) == {"linear", "knn", "ivnext"} and set(by["linear"]) == {"all", "motion", "appearance"}
    for arm in res["gains"].values():
        assert set(arm) == {"linear", "knn", "ivnext"}
        for by_group in arm.values():
            assert set(by_group) == {"all", "motion", "appearance"}
            for g in by_group.values():
                assert g["ci"][0] <= g["gain"] <= g["ci"][1]
    (diag,) = res["decoder_condition"]
    assert {"mse_true", "mse_shuffled", "mse_zero", "gap", "gap_ci95"} <= set(diag)
    assert res["meta"]["quick"] is True and res["runtime_s"]["total"] > 0
    assert any(k.startswith("stage1 linear") for k in res["targets"])
