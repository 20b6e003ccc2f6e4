"""The GPU-free rehearsal (``python -m ivfast.train --config X --rehearse``): the real training
step of a preset on a simulated GPU (fake tensors on cuda:0), in its own process with the
stand-in CUDA library preloaded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ivfast.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def rehearse(tmp_path, config, *args, check=True):
    out = tmp_path / f"{config}.json"
    r = subprocess.run([sys.executable, "-m", "ivfast.train", "--config", config, "--rehearse",
                        "--rehearse-json", str(out), *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=1500)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, (json.loads(out.read_text()) if out.exists() else None)


def decoder_ops(rep):
    return [row for rows in rep["gemms"].values() for row in rows
            if row["op"].startswith(("ivfast.decoder_linear", "ivfast.adaln_trunk"))]


def check_common(rep):
    assert rep["off_device"] == []                        # every GEMM / attention input on cuda
    # no attention call falls back to the math kernel where a fused one takes the inputs
    assert not [s for s in rep["sdpa"] if s["kernel"] == "math" and s["head_dim"] % 8 == 0], rep["sdpa"]
    for mod in ("encoder", "predictor"):                  # trained under bf16 autocast
        assert {row["dtypes"] for row in rep["gemms"][mod]} == {"bfloat16"}, rep["gemms"][mod]


def check_flops(rep):
    """Model FLOPs (measured less what fused attention and checkpointing recompute) within 5 % of
    ivfast.models.flops; each module's forward within 1 %."""
    m, a = rep["tflop_measured"], rep["tflop_analytic"]
    assert abs(m["total"] - m["recomputed"] - a["total"]) <= 0.05 * a["total"], (m, a)
    for k, v in a["forward"].items():
        assert abs(m[k] - v) <= 0.01 * v, (k, m, a)


def test_demo_rehearses_and_reports(tmp_path):
    r, rep = rehearse(tmp_path, "demo")
    assert "fits: yes" in r.stdout and rep["fits"]
    check_common(rep)
    check_flops(rep)
    assert rep["peak_gib"] > 0 and rep["weights_gib"] > 0 and rep["optimizer_gib"] > 0


def test_a_step_that_does_not_fit_fails_with_one_line(tmp_path):
    r, rep = rehearse(tmp_path, "demo", "--gpu-mem", "0.0001", check=False)
    assert r.returncode == 3 and not rep["fits"]
    err = [line for line in r.stderr.splitlines() if line.startswith("ivfast rehearse:")]
    assert len(err) == 1 and "optim.batch_per_gpu" in err[0]


def test_a_missing_compiler_is_one_clear_line(tmp_path):
    env = dict(os.environ, IVFAST_CACHE=str(tmp_path / "cache"), CXX=str(tmp_path / "no-such-c++"))
    r = subprocess.run([sys.executable, "-m", "ivfast.rehearse", "--config", "demo"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "compiling the rehearsal's stand-in CUDA library failed" in r.stderr


@pytest.mark.slow
def test_stage1_vitb_at_full_size(tmp_path):
    """16 clips of 16 x 224^2 per GPU, SigLIP2-giant teacher, D6W1536 decoder in fp32."""
    _, rep = rehearse(tmp_path, "stage1_vitb")
    check_common(rep)
    assert rep["fits"] and rep["peak_gib"] < 70
    # the fp32 decoder runs all its GEMMs, forward and backward, in IEEE fp32 (no TF32)
    dec = decoder_ops(rep)
    assert {row["op"] for row in dec} >= {"ivfast.decoder_linear", "ivfast.decoder_linear_backward",
                                          "ivfast.adaln_trunk", "ivfast.adaln_trunk_backward"}
    assert {row["fp32_precision"] for row in dec} == {"ieee"} and {row["dtypes"] for row in dec} == {"float32"}
    check_flops(rep)


@pytest.mark.slow
def test_stage2_vitb_at_full_size_fits_under_70_gib(tmp_path):
    """14 clips per GPU with the preset's own checkpointing: under 70 GiB allocated."""
    cfg = load_config("stage2_vitb")
    assert cfg.optim.batch_per_gpu == 14
    _, rep = rehearse(tmp_path, "stage2_vitb")
    check_common(rep)
    assert rep["peak_gib"] < 70, rep["peak_gib"]
    check_flops(rep)
