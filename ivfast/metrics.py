"""What a run reports: phase timers with NVTX ranges, MFU, JSON lines and TensorBoard."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; MFU is model FLOPs / this.
BF16_PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "B100": 1750.0, "A100": 312.0, "A800": 312.0,
    "L40S": 362.0, "L40": 181.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "V100": 125.0,
}


def device_peak_flops(device: torch.device) -> float | None:
    """bf16 peak in FLOP/s of a CUDA device, or None where unknown (CPU: MFU not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for frag, tflops in BF16_PEAK_TFLOPS.items():
        if frag in name:
            return tflops * 1e12
    return None


class PhaseTimer:
    """Wall time per phase of a step (data wait / forward / backward / optimiser), NVTX-ranged.

    On CUDA, GPU phases are timed with CUDA events so that no phase forces a host sync (the
    times are read once per logging interval); ``host=True`` phases (waiting for data) are
    wall-clock time on the host, which is what they cost.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[str, object, object]] = []
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str, host: bool = False):
        events = self.cuda and not host
        if self.cuda:
            torch.cuda.nvtx.range_push(name)
        if events:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        try:
            yield
        finally:
            if events:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._pending.append((name, start, end))
            else:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
            if self.cuda:
                torch.cuda.nvtx.range_pop()

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last call (synchronises CUDA events once)."""
        for name, start, end in self._pending:
            end.synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + start.elapsed_time(end) / 1e3
        self._pending.clear()
        out, self.totals = self.totals, {}
        return out


class MetricsLogger:
    """JSON lines (``metrics.jsonl``) and TensorBoard scalars, rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
