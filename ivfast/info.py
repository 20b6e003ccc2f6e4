"""``python -m ivfast.info``: versions and usable accelerators, in the spirit of collect_env."""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import platform
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _dali_version() -> str:
    for dist in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"):
        v = _version(dist)
        if v != "not installed":
            return f"{v} ({dist})"
    return "not installed"


def _usable(module: str, attr: str | None = None) -> str:
    """Imports the module for real: an installed but broken accelerator shows its error."""
    try:
        mod = importlib.import_module(module)
        if attr is not None:
            getattr(mod, attr)
        return "usable"
    except Exception as e:  # noqa: BLE001 - report whatever stops it
        return f"not usable ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"


def collect() -> dict[str, str]:
    import torch

    info = {
        "python": sys.version.split()[0] + f" ({platform.platform()})",
        "ivfast": _version("ivfast"),
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)"),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "nvidia-dali": _dali_version(),
        "PyAV": _version("av"),
        "safetensors": _version("safetensors"),
        "numpy": _version("numpy"),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info[f"GPU {i}"] = f"{p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB"
    else:
        info["GPU"] = "none visible (torch.cuda.is_available() is False)"
    info["ivfast._C (C++ samplers)"] = _usable("ivfast._C", "tube_mask")
    info["flash-attn"] = _usable("flash_attn", "flash_attn_func")
    info["xformers"] = _usable("xformers.ops", "memory_efficient_attention")
    info["NVIDIA apex (FusedAdam)"] = _usable("apex.optimizers", "FusedAdam")
    interp = os.environ.get("TRITON_INTERPRET", "") == "1"
    info["Triton interpreter"] = "on (TRITON_INTERPRET=1)" if interp else "off (set TRITON_INTERPRET=1 to run kernels on CPU)"
    info["Triton kernels on GPU"] = ("usable" if torch.cuda.is_available() and _version("triton") != "not installed"
                                     else "no (needs CUDA and triton)")
    return info


def locked_versions(lock_text: str) -> dict[str, str]:
    """The pins of a requirements lock whose platform markers hold here, by normalised name."""
    pins = {}
    for line in lock_text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate():
                pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return pins


def installed_closure(root: str = "ivfast", extras: tuple = ("dev",)) -> dict[str, str]:
    """Installed version (public part: torch's '+cpu' dropped) of every distribution that
    ``root[extras]`` needs here, following each requirement whose marker holds."""
    seen, todo, found = set(), [(root, tuple(extras))], {}
    while todo:
        name, ext = todo.pop()
        key = (canonicalize_name(name), ext)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            found[key[0]] = "not installed"
            continue
        if key[0] != canonicalize_name(root):
            found[key[0]] = Version(dist.version).public
        envs = [{"extra": e} for e in ext] or [{"extra": ""}]
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, tuple(sorted(req.extras))))
    return found


def lock_drift(lock_text: str) -> dict[str, tuple[str | None, str]]:
    """{name: (locked, installed)} for each package of ivfast[dev]'s closure that the lock does
    not pin at the installed version (locked is None when the lock lacks it)."""
    pins = locked_versions(lock_text)
    return {n: (pins.get(n), v) for n, v in sorted(installed_closure().items()) if pins.get(n) != v}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ivfast.info", description="Versions and usable accelerators.")
    ap.add_argument("--lock", metavar="FILE", help="instead: list the packages of ivfast[dev]'s closure whose "
                    "installed version differs from FILE's pin (exit 1 if any)")
    ap.add_argument("--json", action="store_true", help="with --lock: one JSON object {name: [locked, installed]}")
    args = ap.parse_args(argv)
    if args.lock:
        with open(args.lock) as f:
            drift = lock_drift(f.read())
        if args.json:
            print(json.dumps(drift))
        for name, (locked, now) in drift.items() if not args.json else ():
            print(f"{name:28s} {locked or '(not in lock)':>14s} -> {now}")
        return 1 if drift else 0
    info = collect()
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}} : {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
