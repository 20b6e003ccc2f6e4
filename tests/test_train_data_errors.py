"""Data problems found by the training entry point end with one clear line and exit 2."""
import subprocess
import sys


def _train(tmp_path, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "ivfast.train", "--config", "demo",
         f"runtime.output_dir={tmp_path / 'run'}", "demo=false", *overrides],
        capture_output=True, text=True, timeout=300)


def test_missing_train_list_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "no_such_list.csv"
    r = _train(tmp_path, f"data.train_list={missing}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    err_lines = [l for l in r.stderr.splitlines() if l.startswith("ivfast.train: data error:")]
    assert len(err_lines) == 1 and "no_such_list.csv" in err_lines[0], r.stderr[-2000:]
