"""What every benchmark in bench/ shares: timing, the device and version stamp, JSON recording.

    from harness import Record, stamp, time_ms
    rec = Record(path)                 # or Record() in memory; rec.left(): seconds of budget left
    rec.add("results", {"ms": time_ms(fn, dev)})

Timing: CUDA events on a GPU, ``time.perf_counter`` on the CPU, warm-up calls first, the median
of the timed calls. Peak FLOP/s come from ``ivfast.metrics`` (the one table). A ``Record`` bound
to a file rewrites it atomically after every figure, so a benchmark killed by its timeout keeps
what it measured.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:        # a bare source tree: ivfast importable without pip install
    sys.path.insert(0, str(ROOT))

from ivfast import __version__  # noqa: E402
from ivfast.metrics import device_peak_flops  # noqa: E402


def device(cpu: bool) -> torch.device:
    """The CPU for a dry run, else the GPU (an error that says what to do when none is visible)."""
    if cpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible (torch.cuda.is_available() is False); "
                         "use --dry-run to check the benchmark on a CPU")
    return torch.device("cuda")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, dev: torch.device, warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_flops(dev: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of ``dev`` (None on a CPU or an unknown GPU)."""
    return device_peak_flops(dev)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()})"


def result_tag(dev: torch.device, dry: bool) -> str:
    """The file-name tag of a benchmark's result: the device's name, or ``dryrun_cpu``."""
    return "dryrun_cpu" if dry else device_name(dev).replace(" ", "_").replace("/", "_")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def stamp(dev: torch.device) -> dict:
    """Where and with what a result was measured."""
    try:      # imported here: a CPU run of a Triton kernel must set TRITON_INTERPRET before triton loads
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    peak = peak_flops(dev)
    return {"device": device_name(dev), "ivfast": __version__, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version, "python": platform.python_version(),
            "host": platform.node(), "date": now(), "peak_bf16_tflops": peak / 1e12 if peak else None}


def err(e: BaseException) -> str:
    """One line naming an exception (what a result records instead of a figure)."""
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:300] if s else ''}"


def load(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"meta": {}, "parts": {}}


def save(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)          # atomic: a kill mid-write never leaves half a file


class Record:
    """One benchmark's figures: ``set`` a key, ``add`` to a list. Bound to ``path`` (a file holding
    ``{"meta": ..., "parts": {name: record}}``) every figure is written at once; without a path
    the figures stay in ``self.data``. ``left()`` is the seconds left of ``budget_s``."""

    def __init__(self, path: Path | None = None, name: str = "run", budget_s: float = math.inf):
        self.path, self.name, self.budget_s = (Path(path) if path else None), name, budget_s
        self.t0 = time.monotonic()
        self.data = {"status": "running", "started": now(), "budget_s": budget_s}
        if self.path is not None:
            doc = load(self.path)
            doc["parts"][name] = self.data
            save(self.path, doc)

    def _write(self) -> None:
        self.data["seconds"] = round(time.monotonic() - self.t0, 1)
        if self.path is not None:
            doc = load(self.path)
            doc["parts"][self.name] = self.data
            save(self.path, doc)

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self._write()

    def add(self, key: str, item) -> None:
        self.data.setdefault(key, []).append(item)
        self._write()

    def left(self) -> float:
        """Seconds left of the budget (a caller's timeout kills the process at 0)."""
        return self.budget_s - (time.monotonic() - self.t0)


def write_result(path: Path, meta: dict, rows: list) -> Path:
    """A standalone benchmark's result file: ``{"meta": stamp and settings, "rows": [...]}``."""
    path = Path(path)
    save(path, {"meta": meta, "rows": rows})
    return path


def top_kernels(fn, dev: torch.device, top: int = 30) -> list[dict]:
    """The top CUDA kernels (CPU ops on a CPU) of one call of ``fn`` by self device time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(dev)

    def dev_us(e):
        t = getattr(e, "self_device_time_total", None)
        return t if t is not None else getattr(e, "self_cuda_time_total", 0)
    rows = []
    for e in prof.key_averages():
        is_kernel = dev.type == "cuda" and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
        t_us = dev_us(e) if dev.type == "cuda" else e.self_cpu_time_total
        if (dev.type == "cuda" and not is_kernel) or t_us <= 0:
            continue
        rows.append({"name": e.key[:120], "calls": e.count, "ms": round(t_us / 1e3, 3)})
    if not rows and dev.type == "cuda":     # no kernel-level rows in this torch: ops by device time
        rows = [{"name": e.key[:120], "calls": e.count, "ms": round(dev_us(e) / 1e3, 3)}
                for e in prof.key_averages() if dev_us(e) > 0]
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows) or 1.0
    for r in rows:
        r["pct"] = round(100 * r["ms"] / total, 1)
    return rows[:top]
