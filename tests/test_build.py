"""The package installs the way the README says: extension built, kernels under ivfast."""
import os
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


def _run_at_root(code: str, *flags: str, env: dict | None = None, timeout: int = 300):
    """``python [flags] -c code`` with the repository root as working directory, so the root is
    first on sys.path, as for a user who runs ``python -m ivfast.train`` there."""
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_import_kernels_at_repo_root_is_the_installed_package(tmp_path):
    """A top-level package named ``kernels`` later on sys.path (Hugging Face's, which transformers
    imports) is what ``import kernels`` gives at the repository root; ivfast.kernels still works
    beside it. A stand-in package makes this independent of which kernels release is installed."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'installed'\nfrom kernels.sub import X\n")
    (site / "kernels" / "sub.py").write_text("X = 1\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import sys, kernels, ivfast.kernels, ivfast.kernels.tokens\n"
            "assert kernels.WHO == 'installed' and kernels.X == 1, kernels.__file__\n"
            "assert sys.modules['kernels'] is kernels and kernels.__spec__.origin == kernels.__file__\n"
            "assert ivfast.kernels is not kernels and ivfast.kernels.__name__ == 'ivfast.kernels'\n"
            "print(kernels.__file__)")
    r = _run_at_root(code, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip()) == site / "kernels" / "__init__.py"


def test_import_kernels_with_a_second_checkout_on_the_path(tmp_path):
    """A second ivfast checkout on sys.path (another clone or worktree) also holds a hand-over
    ``kernels/``; the two must not hand the import to each other forever."""
    site, other = tmp_path / "site", tmp_path / "other_clone"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'installed'\n")
    (other / "kernels").mkdir(parents=True)
    (other / "kernels" / "__init__.py").write_text((ROOT / "kernels" / "__init__.py").read_text())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(other), str(site)])}
    r = _run_at_root("import kernels\nassert kernels.WHO == 'installed'\nprint(kernels.__file__)", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip()) == site / "kernels" / "__init__.py"


def test_import_kernels_at_repo_root_without_one_installed_fails():
    """With no other ``kernels`` on sys.path (-S: no site-packages) the import fails as if the
    folder were not there, and leaves no half-made module behind."""
    code = ("import sys\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
            "    assert e.name == 'kernels' and 'kernels' not in sys.modules, e\n    print('refused')\n")
    r = _run_at_root(code, "-S")
    assert r.returncode == 0 and r.stdout.strip() == "refused", r.stdout + r.stderr[-3000:]


def test_real_kernels_and_transformers_models_at_repo_root():
    """The installed Hugging Face ``kernels`` (a transformers dependency) imports at the root, and
    transformers builds a SigLIP and a ModernBERT model there (each imports ``kernels``)."""
    code = ("import importlib.metadata as md, kernels, transformers\n"
            "assert 'site-packages' in kernels.__file__, kernels.__file__\n"
            "s = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(hidden_size=16, "
            "intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16))\n"
            "m = transformers.ModernBertModel(transformers.ModernBertConfig(hidden_size=16, intermediate_size=32, "
            "num_hidden_layers=1, num_attention_heads=2, vocab_size=32, pad_token_id=0))\n"
            "print(md.version('kernels'), transformers.__version__)")
    r = _run_at_root(code)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_demo_step_at_repo_root(tmp_path):
    """`python -m ivfast.train runtime.max_steps=1` from the repository root, as the README runs it."""
    r = subprocess.run([sys.executable, "-m", "ivfast.train", "runtime.max_steps=1",
                        f"runtime.output_dir={tmp_path / 'demo'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ivfast.train: done" in r.stdout + r.stderr


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


def test_lock_inputs_cover_the_build():
    """tools/lock.in names every build requirement of pyproject, so the lock pins the build too."""
    import tomllib

    from packaging.requirements import Requirement

    build = {Requirement(r).name for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]}
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "tools" / "lock.in").read_text().splitlines()]
    inputs = {Requirement(ln).name for ln in lines if ln}
    assert build | {"pip"} <= inputs, f"add {sorted(build | {'pip'} - inputs)} to tools/lock.in and rerun tools/lock"


def test_installed_versions_match_the_lock():
    """Every package that ivfast[dev] needs on this machine is pinned by requirements.lock at the
    version installed here: the README's set-up and CI install exactly what the lock says, and a
    dependency added to pyproject without `tools/lock` shows up here."""
    from ivfast.info import installed_closure, lock_drift, locked_versions

    lock = (ROOT / "requirements.lock").read_text()
    assert {"torch", "transformers", "kernels", "av", "pytest"} <= set(locked_versions(lock))
    assert len(installed_closure()) > 20
    drift = lock_drift(lock)
    assert not drift, ("installed versions differ from requirements.lock (name: locked -> installed): "
                       f"{drift}; install with the README's command, or run tools/lock after tools/check-latest")


def test_missing_cmake_is_a_clear_error(tmp_path):
    """Without cmake on PATH the build stops with a message saying what to install."""
    empty = tmp_path / "bin"
    empty.mkdir()
    res = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "t"),
                          "--build-lib", str(tmp_path / "l")], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": str(empty), "HOME": str(tmp_path)})
    assert res.returncode != 0
    assert "needs cmake" in res.stderr + res.stdout and "pip install cmake" in res.stderr + res.stdout
