"""bench/gpu_check.sh --dry-run: every part of the GPU check runs (tiny shapes, CPU) and leaves its
figures in the JSON; a part killed by its timeout keeps what it measured."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check as G  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check_dry.json"
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHON": sys.executable})     # the python that runs the tests
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout, out.with_suffix(".log").read_text()


def test_dry_run_writes_every_part(dry_run):
    data, stdout, log = dry_run
    assert data["meta"]["dry_run"] is True
    for name in G.PARTS:
        rec = data["parts"].get(name)
        assert rec is not None, f"part {name} missing"
        assert rec["status"] == "ok", f"{name}: {rec.get('error')}\n{log[-3000:]}"
        assert rec["seconds"] <= rec["budget_s"]
    p = data["parts"]
    assert "ivfast.masking" in p["preflight"]["imports"] and p["preflight"]["torch"]
    assert p["dtypes"]["attention_entry"] and any(k.startswith("mm(") or k.startswith("addmm(")
                                                  for k in p["dtypes"]["aten_ops"])
    backends = {r["backend"] for r in p["attention"]["results"]}
    assert {"ivfast:auto", "sdpa:FLASH_ATTENTION", "flex", "sdpa_band:EFFICIENT_ATTENTION"} <= backends
    assert any("fwd_bwd_ms" in r for r in p["attention"]["results"])
    assert p["decoder"]["gemm_floor_fp32"]["ms"] > 0
    assert [(r["impl"], r["dtype"]) for r in p["decoder"]["results"]] == [("eager", "fp32")]
    assert p["decoder"]["results"][0]["median_ms"] > 0 and "pct_of_gemm_floor" in p["decoder"]["results"][0]
    for st in ("stage1", "stage2"):
        res = p[st]["result"]
        assert res["step_ms"] > 0 and res["clips_per_s"] > 0 and res["tflop_per_clip"] >= 0
        assert p[st]["attention_backends"] and p[st]["top_kernels"]
    assert p["tokens"]["copy_gb_s"] > 0
    assert {r["op"] for r in p["tokens"]["tokens"]} >= {"gather+pos", "assemble"}
    assert all(r["impl"] == "eager" and r["median_ms"] > 0 for r in p["tokens"]["tokens"])
    from ivfast.data.dali import dali_status
    if dali_status()[0]:                         # DALI's CPU decoder stands in for NVDEC in the dry run
        res = p["nvdec"]["results"][0]
        assert res["clips_per_s"] > 0 and (res["psnr_vs_pyav_db"] == "identical" or res["psnr_vs_pyav_db"] >= 45)
    else:
        assert "DALI" in p["nvdec"]["skipped"] or "dali" in p["nvdec"]["skipped"]
    for name in G.PARTS:                         # the closing table names every part
        assert f"\n{name} " in stdout


def test_timed_out_part_keeps_its_figures(tmp_path):
    out = tmp_path / "g.json"
    G.main(["--init", "--dry-run", "--out", str(out)])
    p = G.H.Record(out, "attention", budget_s=10)
    p.add("results", {"shape": "x", "fwd_ms": 1.0})
    # the shell's timeout killed the process here: status is still "running" -> marked timeout
    G.main(["--mark", "attention", "timeout", "--out", str(out)])
    rec = json.loads(out.read_text())["parts"]["attention"]
    assert rec["status"] == "timeout" and rec["results"] == [{"shape": "x", "fwd_ms": 1.0}]
    p2 = G.H.Record(out, "decoder", budget_s=10)
    p2.set("status", "ok")
    G.main(["--mark", "decoder", "timeout", "--out", str(out)])     # never overrides a finished part
    assert json.loads(out.read_text())["parts"]["decoder"]["status"] == "ok"
    assert "timeout" in G.table(json.loads(out.read_text()))


def test_part_budgets_fit_twelve_minutes():
    """The whole run stops giving time at TOTAL_S after the start (setup included), which is
    12 minutes less the last part's kill grace and the table; the parts fit beside a 1-minute
    setup. The shell sets no budget of its own: it reads gpu_check.py's."""
    assert set(G.BUDGET_S) == set(G.PARTS)
    assert G.SETUP_S <= 120 and sum(G.BUDGET_S.values()) + 60 <= G.TOTAL_S <= 12 * 60 - 20
    assert G.RESERVE_S < min(G.BUDGET_S.values()) and G.DRY_RESERVE_S < G.DRY_BUDGET_S
    sh = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "gpu_check.py --budgets" in sh and "BUDGET=(" not in sh and "TOTAL=" not in sh
    r = subprocess.run(["bash", "-c", f'eval "$({sys.executable} bench/gpu_check.py --budgets)"; '
                        'echo "$TOTAL ${BUDGET[decoder]} $PARTS"'], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.split() == [str(G.TOTAL_S), str(G.BUDGET_S["decoder"]), *G.PARTS], r.stderr


def test_train_step_part_runs_without_pyav_and_dali(tmp_path):
    """The step timer feeds the Trainer device clips: the stage parts need no video decoder, which
    the bare GPU machine lacks; the nvdec part says why it measured nothing."""
    # as not installed: importlib.util.find_spec (what transformers asks) answers None, import fails
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "for name in ('av', 'decord', 'flash_attn', 'nvidia.dali'):\n"
        "    sys.modules[name] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "g.json"
    for part in ("stage1", "nvdec"):
        r = subprocess.run([sys.executable, "bench/gpu_check.py", "--part", part, "--dry-run", "--out", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    parts = json.loads(out.read_text())["parts"]
    assert parts["stage1"]["status"] == "ok" and parts["stage1"]["result"]["step_ms"] > 0
    assert parts["nvdec"]["status"] == "ok" and parts["nvdec"]["skipped"].startswith("needs PyAV")


def test_gpu_tests_collect_without_pyav_and_dali(tmp_path):
    """`pytest -m gpu --collect-only` on the bare GPU machine (no PyAV, DALI, decord, flash-attn)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('av', 'decord', 'flash_attn') or name.startswith('nvidia.dali'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (hidden for the test)')\n"
        "sys.meta_path.insert(0, _Block())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
                        str(ROOT / "tests")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    assert "error" not in text.lower(), text[-3000:]
    assert "test_gpu_vit_block_under_bf16_autocast" in text and " collected" in text


def test_bare_tree_setup_maps_kernels_and_masks_without_C(tmp_path):
    """The GPU machine's copy of the tree: nothing pip-installed, _C never built. Simulated here: a
    copy of the tree, ivfast's editable-install finder removed, and a python whose `pip install` and
    `setup.py build_ext` fail (as when cmake cannot build). The setup must map kernels/ as
    ivfast.kernels (symlink, removed again at exit) and the check must still import ivfast.masking."""
    import shutil
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    tree = tmp_path / "tree"
    for f in files:
        src = ROOT / f
        if src.is_file() and not f.startswith(("runs/", "bench/results/")):
            (tree / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / f)
    assert not (tree / "ivfast" / "kernels").exists() and not list((tree / "ivfast").glob("_C*.so"))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n")
    fake = tmp_path / "python"
    fake.write_text(f"#!/usr/bin/env bash\n"
                    f"case \" $* \" in *' -m pip '*|*' setup.py '*) echo 'simulated build failure' >&2; exit 1;; esac\n"
                    f"exec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    out = tmp_path / "g.json"
    env = {**os.environ, "PYTHON": str(fake), "PYTHONPATH": str(site), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--parts", "preflight", "--out", str(out)], cwd=tree,
                       env=env, capture_output=True, text=True, timeout=240)
    assert "pip install failed" in r.stdout and "symlink" in r.stdout, r.stdout + r.stderr
    imports = json.loads(out.read_text())["parts"]["preflight"]["imports"]
    assert imports["ivfast.kernels"].startswith("ok") and imports["ivfast.masking"].startswith("ok"), imports
    assert not imports["ivfast._C"].startswith("ok"), imports
    assert not (tree / "ivfast" / "kernels").exists(), "the symlink made for the check is removed at exit"


def test_the_step_part_finds_the_rehearsals_peak_for_the_same_preset_and_batch():
    """On a GPU, each preset's real peak memory is recorded next to the rehearsal's (committed
    JSON), when the step runs the rehearsal's preset at its batch."""
    import bench_train_step as T
    rehearsed = json.loads(T.REHEARSAL.read_text())["presets"]["stage2_vitb"]
    assert T.rehearsal_peak("stage2_vitb", rehearsed["batch"]) == round(rehearsed["peak_gib"], 2)
    assert T.rehearsal_peak("stage2_vitb", rehearsed["batch"] // 2) is None
    assert T.rehearsal_peak("no_such_preset", 16) is None
