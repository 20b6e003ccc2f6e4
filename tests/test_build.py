"""The package installs the way the README says: extension built, kernels under ivfast."""
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import ivfast

ROOT = Path(__file__).resolve().parents[1]


def test_extension_and_kernels_import():
    import ivfast._C
    import ivfast.kernels

    assert ivfast._C.__file__.endswith((".so", ".pyd"))
    assert Path(ivfast.kernels.__file__).parent.name == "kernels"
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "ivfast" not in str(spec.origin), "ivfast must not install a top-level 'kernels'"


def test_info_reports_versions():
    out = subprocess.run([sys.executable, "-m", "ivfast.info"], capture_output=True, text=True, check=True).stdout
    for key in ("torch", "triton", "transformers", "nvidia-dali", "PyAV", "flash-attn", "xformers",
                "Triton interpreter", "ivfast._C"):
        assert key in out
    assert ivfast.__version__ in out


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    """`pip wheel .` builds the C++ extension through CMake in an isolated env (no torch pulled)."""
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = tmp_path.glob("ivfast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("ivfast/_C") and n.endswith(".so") for n in names)
    assert "ivfast/kernels/__init__.py" in names
    assert "ivfast/configs/demo.yaml" in names and "ivfast/configs/stage2_vitl.yaml" in names
    assert not any(n.startswith("kernels/") for n in names)


def test_build_requirements_exclude_torch():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any(r.lower().startswith("torch") for r in meta["build-system"]["requires"])
    deps = meta["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("torch>=") for d in deps), "torch must be a range, not a pin"
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


def test_missing_cmake_is_a_clear_error(tmp_path):
    """Without cmake on PATH the build stops with a message saying what to install."""
    empty = tmp_path / "bin"
    empty.mkdir()
    res = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "t"),
                          "--build-lib", str(tmp_path / "l")], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": str(empty), "HOME": str(tmp_path)})
    assert res.returncode != 0
    assert "needs cmake" in res.stderr + res.stdout and "pip install cmake" in res.stderr + res.stdout
