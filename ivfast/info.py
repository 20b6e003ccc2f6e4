"""``python -m ivfast.info``: versions and usable accelerators, in the spirit of collect_env."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
import sys


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


def main() -> int:
    info = collect()
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}} : {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
