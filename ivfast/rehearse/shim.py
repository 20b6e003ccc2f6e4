"""Build and load ``fake_cuda.cpp``, the stand-in CUDA device the rehearsal runs on.

The library is compiled on first use with the C++ compiler and torch's own headers and
libraries (no build step at install time, so the install never needs torch in its build
environment), and cached per torch version and source: ``$IVFAST_CACHE`` or
``~/.cache/ivfast``. torch fixes its CUDA hooks the first time it asks for them, which happens
while ``import torch`` runs, so the library must be in the process before torch:
:func:`environ` gives the ``LD_PRELOAD`` a rehearsal process is started with.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fake_cuda.cpp")


class ShimError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("IVFAST_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                          "ivfast")
    return Path(root)


def library_path() -> Path:
    key = hashlib.blake2b(SOURCE.read_bytes() + torch.__version__.encode() + sys.executable.encode(),
                          digest_size=8).hexdigest()
    return cache_dir() / f"fake_cuda-{torch.__version__.replace('+', '_')}-{key}.so"


def build(verbose: bool = False) -> Path:
    """The compiled library, compiled now if not cached (about 10 s)."""
    out = library_path()
    if out.exists():
        return out
    from torch.utils import cpp_extension as ce

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise ShimError("the rehearsal builds a small C++ library and needs a C++20 compiler, none was found: "
                        "install g++ (apt-get install g++) or set CXX")
    out.parent.mkdir(parents=True, exist_ok=True)
    libs = ce.library_paths()
    cmd = [cxx, "-O1", "-std=c++20", "-shared", "-fPIC", "-w",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *[f"-I{p}" for p in ce.include_paths()], str(SOURCE), "-o", str(out) + ".tmp",
           *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs], "-lc10", "-ltorch_cpu"]
    try:
        r = subprocess.run(cmd, capture_output=not verbose, text=True)
    except OSError as e:       # CXX names no runnable program
        raise ShimError(f"compiling the rehearsal's stand-in CUDA library failed: cannot run {cxx} ({e.strerror}); "
                        "install g++ (apt-get install g++) or set CXX to a C++20 compiler") from None
    if r.returncode != 0:
        tail = (r.stderr or "").strip().splitlines()[-5:] if not verbose else []
        raise ShimError(f"compiling the rehearsal's stand-in CUDA library failed ({cxx}, rc {r.returncode}):\n"
                        + "\n".join(tail))
    os.replace(str(out) + ".tmp", out)
    return out


def environ(lib: Path) -> dict:
    """The environment of a process that rehearses: the library preloaded, no real GPU visible."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""       # never touch a real GPU from a process with stand-in hooks
    env["IVFAST_REHEARSAL"] = "1"
    return env


def activate() -> None:
    """In a process started with :func:`environ`: check the stand-in hooks are torch's, and put the
    stand-in device guard in place (a CUDA build of torch registered its own after ours)."""
    lib = next((p for p in os.environ.get("LD_PRELOAD", "").split(":") if Path(p).name.startswith("fake_cuda-")), None)
    if lib is None:
        raise ShimError("this process was not started with the rehearsal's library preloaded; run "
                        "`python -m ivfast.train --config X --rehearse`, which starts it")
    h = ctypes.CDLL(lib)
    if not h.ivfast_fake_cuda_hooks_active():
        raise ShimError("torch's CUDA hooks are not the rehearsal's (the library was loaded after torch)")
    h.ivfast_fake_cuda_install_guard()
