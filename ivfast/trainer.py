"""The Trainer: set-up (distributed, data, model, optimiser, schedule, resume), then steps of
gradient accumulation -> clip -> optimiser, with metrics, checkpoints, an nsys/torch profiler
window and pre-emption handling. The command line and the demo live in :mod:`ivfast.train`.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ivfast import checkpoint as ckpt
from ivfast.config import Config, dump
from ivfast.data import DataError, build_loader
from ivfast.eval.recon import log_recon
from ivfast.masking import stream_key
from ivfast.metrics import MetricsLogger, PhaseTimer, device_peak_flops
from ivfast.models.attention import set_dense_fallback, used_backends
from ivfast.models.epd import build_model, param_groups, purpose_seed
from ivfast.models.flops import flops_per_clip
from ivfast.watchdog import RankWatchdog

# The training log's one name, whichever module writes to it (the watchdog uses it too).
log = logging.getLogger("ivfast.train")


class NonFiniteLossError(RuntimeError):
    pass


# --------------------------------------------------------------------------- set-up helpers
def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; one process when absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.runtime.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device=cuda but no CUDA device is visible; use runtime.device=cpu or auto")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda and not torch.cuda.is_initialized():
        # Stage 2's shapes change every batch (visible count K): growable segments instead of
        # fixed blocks avoid fragmentation OOMs near the 80 GB limit. Read at CUDA init, so set
        # here, before the first allocation; a value the user set wins.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        t = cfg.runtime.collective_timeout_s
        timeout = datetime.timedelta(seconds=t) if t > 0 else None
        kw = {}
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restart > 0:
            # torchrun's static rendezvous (--master-port) keeps one store across restarts: the
            # dead group's addresses are still in it, and a new rank could read a peer's old
            # one (seen: gloo "Connection refused", or a connect waiting out the timeout). Keys
            # of this attempt live under their own prefix.
            store, _, _ = next(dist.rendezvous("env://", timeout=timeout or datetime.timedelta(minutes=30)))
            kw = {"store": dist.PrefixStore(f"ivfast/restart_{restart}/", store), "rank": rank, "world_size": world}
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                                timeout=timeout, **kw)
    return rank, world, device


def lr_at(step: int, peak: float, floor: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0, then cosine from ``peak`` down to ``floor`` at ``total``."""
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device):
    o = cfg.optim
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, o.weight_decay)]
    if o.optimizer == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError as e:
            raise RuntimeError("optim.optimizer=apex needs NVIDIA apex (apex.optimizers.FusedAdam) "
                               "importable; note PyPI's 'apex' is an unrelated package. Use adamw.") from e
        return FusedAdam(groups, lr=o.base_lr, betas=tuple(o.betas), eps=o.eps, adam_w_mode=True)
    # Fused AdamW (CUDA, and CPU since torch 2.4) honours ``optimizer.found_inf`` on the device,
    # the path GradScaler uses: that is what makes the step free of host syncs (train_step).
    try:
        return torch.optim.AdamW(groups, lr=o.base_lr, betas=tuple(o.betas), eps=o.eps, fused=True)
    except RuntimeError:   # an old torch without the CPU fused kernel: the host-checked path
        return torch.optim.AdamW(groups, lr=o.base_lr, betas=tuple(o.betas), eps=o.eps)


def compile_enabled(cfg: Config, device: torch.device) -> bool:
    """``runtime.compile``: "auto" compiles on CUDA (the eager student costs ~150 ms/step in stage 2,
    predicted) and stays eager on CPU, where compile time dominates tiny runs."""
    c = cfg.runtime.compile
    return device.type == "cuda" if c == "auto" else bool(c)


def wrap_model(cfg: Config, model: torch.nn.Module, device: torch.device, world: int):
    """torch.compile per trainable module (keys unchanged), then DDP or FSDP2 across ranks."""
    trainable = [m for m in (getattr(model, n, None) for n in ("encoder", "predictor", "decoder")) if m is not None]
    if compile_enabled(cfg, device):
        for m in trainable:
            if hasattr(m, "layers_forward"):
                # The predictor layer by layer: stage 2 calls predictor.run(), not forward(), so a
                # module-level compile would leave its layers (65 % of stage-2 FLOPs) eager.
                for layer in m.layers:
                    layer.compile()
            else:
                m.compile()
    if world == 1:
        return model
    if cfg.runtime.distributed == "fsdp":
        # Shard the trained parts block by block, then the root (heads, tables) so that every
        # trainable parameter is managed; the frozen teacher stays replicated, outside FSDP.
        for m in trainable:
            for block in getattr(m, "blocks", getattr(m, "layers", [])):
                fully_shard(block)
            fully_shard(m)
        fully_shard(model, ignored_params={p for p in model.parameters() if not p.requires_grad})
        return model
    # No buffer broadcast: buffers (the frozen teacher's, fixed position tables) never change,
    # and broadcasting them would copy megabytes from rank 0 before every forward.
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=False, broadcast_buffers=False)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Every random draw of a micro-step derives from this, so a resumed run repeats it exactly."""
    return stream_key(stream_key(stream_key(seed, step), micro), rank) >> 1


def rng_state() -> dict:
    """Every RNG's state as tensors, lists and numbers: loadable with ``torch.load(weights_only=True)``."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    s = {"torch": torch.get_rng_state(),
         "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
         "python": {"version": version, "state": list(py_state), "gauss": py_gauss}}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    """The states of :func:`rng_state`, or the tuples that checkpoints of older ivfast versions hold."""
    torch.set_rng_state(s["torch"])
    n, p = s["numpy"], s["python"]
    if isinstance(n, dict):
        n = (n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)
    if isinstance(p, dict):
        p = (p["version"], tuple(p["state"]), p["gauss"])
    random.setstate(p)
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, saves and exits 0."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = None
        self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}

    def _handler(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class ProfileWindow:
    """``runtime.profile_steps=A:B``: cudaProfilerStart/Stop for ``nsys --capture-range=cudaProfilerApi``
    and, unless nsys is attached, a torch.profiler trace in OUTPUT/profile/."""

    def __init__(self, spec: str, out_dir: Path, device: torch.device):
        self.start, self.stop = (int(x) for x in spec.split(":")) if spec else (-1, -1)
        self.out_dir, self.device, self.prof = out_dir, device, None
        self.under_nsys = any(k.startswith("NSYS_") for k in os.environ)

    def step(self, step: int) -> float:
        """Open or close the window at ``step``; returns the seconds spent writing the trace."""
        if step == self.start:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStart()
            if not self.under_nsys:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if self.device.type == "cuda":
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=acts, record_shapes=False)
                self.prof.__enter__()
        elif step == self.stop:
            t0 = time.perf_counter()
            self.close()
            return time.perf_counter() - t0
        return 0.0

    def close(self) -> None:
        if self.start < 0:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(self.out_dir / f"trace_steps_{self.start}_{self.stop}.json"))
            sort = "cuda_time_total" if self.device.type == "cuda" else "cpu_time_total"
            (self.out_dir / "top_ops.txt").write_text(self.prof.key_averages().table(sort_by=sort, row_limit=30))
            self.prof = None
        self.start = -1


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def full_model_state(model: torch.nn.Module) -> dict:
    """Full (unsharded) state dict on every rank's CPU, for DDP, FSDP2 and plain modules alike."""
    return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class NonFiniteSteps:
    """Steps whose loss or gradient was not finite. Counted on the device, so that a step makes no
    host sync; read (one sync) at logging and checkpoint steps. ``in_row`` and ``total`` are the
    values of the latest read; ``total`` includes the steps of the run this one resumed."""

    def __init__(self, device: torch.device, total_before: int = 0):
        self._counts = torch.zeros(3, device=device)
        # views of _counts: updated in place on the device, read together by one tolist()
        self._in_row, self._run_total, self._longest = self._counts.unbind()
        self.total_before = total_before
        self.in_row, self.total = 0, total_before

    def add(self, bad: torch.Tensor) -> None:
        """Count one step; ``bad`` is its 0-d bool tensor (no host sync)."""
        self._in_row.add_(1).mul_(bad)
        self._run_total.add_(bad)
        torch.maximum(self._longest, self._in_row, out=self._longest)

    def read(self) -> tuple[int, int]:
        """(bad steps since the last read, the longest run of bad steps in a row so far)."""
        in_row, run_total, longest = (int(x) for x in self._counts.tolist())
        new = self.total_before + run_total - self.total
        self.in_row, self.total = in_row, self.total_before + run_total
        return new, longest


class StepWindow:
    """The steps and wall time since the last log record: its throughput's denominator."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """One stage's training run: ``Trainer(cfg, resume).fit()``; ``resume`` is "auto" (the newest
    valid checkpoint in the output directory), a checkpoint path, or "" (start afresh)."""

    def __init__(self, cfg: Config, resume: str = "", loader=None):
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed(cfg)
        self.is_main = self.rank == 0
        self.out = Path(cfg.runtime.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        # The same initial weights on every rank (FSDP2 does not broadcast them); per-rank
        # randomness comes later from step_seed().
        torch.manual_seed(cfg.runtime.seed)

        # ``loader``: any iterable of batches in the loader's output contract, for runs that read
        # no files (the step benchmark, the GPU-free rehearsal); None builds it from cfg.data
        self.loader = loader if loader is not None else build_loader(cfg, rank=self.rank, world_size=self.world,
                                                                     device=self.device)
        self.model = build_model(cfg).to(self.device)
        set_dense_fallback(cfg.model.attn_allow_dense_fallback)   # a silent 32-64x slower local attention is an error
        self.flops_per_clip = flops_per_clip(cfg)["total"]
        self.tokens_per_clip = math.prod(self.model.grid)
        self.model = wrap_model(cfg, self.model, self.device, self.world)
        self.optimizer = build_optimizer(cfg, unwrap(self.model), self.device)
        self._set_schedule()

        self.step = 0
        # Sync-free step (see train_step): non-finite steps are counted on the device and read
        # at logging steps; the optimiser skips them itself through ``found_inf``.
        self._sync_free = bool(getattr(self.optimizer, "defaults", {}).get("fused"))
        self.nonfinite = NonFiniteSteps(self.device)
        self._stop_flag = self._stop_host = self._stop_event = None
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._reported_attention = False
        self._last_video = None          # runtime.recon_every: up to 8 clips of the latest batch
        self._saved_step = -1          # the step of the last checkpoint, known on every rank
        self._it = None
        self.watchdog = None           # started by fit(): names a rank the others wait for
        self.preempted = None          # set by fit(): the signal that stopped it
        if resume:
            self._resume(resume)
        self.metrics = MetricsLogger(self.out, enabled=self.is_main)
        self.timer = PhaseTimer(self.device)
        self.profile = ProfileWindow(cfg.runtime.profile_steps, self.out / "profile", self.device)
        self.peak_flops = device_peak_flops(self.device)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump(cfg))
            self._log_start()
            self._check_free_space()

    def _set_schedule(self) -> None:
        """Accumulation, global batch, steps and the lr schedule from the optim config and the world size."""
        o = self.cfg.optim
        per_micro = o.batch_per_gpu * self.world
        self.accum = max(1, round(o.global_batch / per_micro))
        self.global_batch = self.accum * per_micro
        self.steps_per_epoch = len(self.loader) // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"one optimiser step needs {self.accum} batches of {per_micro} clips per rank set, "
                             f"but an epoch has only {len(self.loader)}: add data or lower optim.global_batch")
        self.total_steps = int(o.epochs * self.steps_per_epoch)        # the lr schedule's length
        self.stop_step = min(self.total_steps, self.cfg.runtime.max_steps or self.total_steps)
        self.warmup = int(o.warmup_epochs * self.steps_per_epoch)
        self.lr_scale = self.global_batch / 256   # the recipe's lr is per 256 clips
        self.peak_lr, self.min_lr = o.base_lr * self.lr_scale, o.min_lr * self.lr_scale
        self.autocast_dtype = {"bf16": torch.bfloat16}.get(self.cfg.runtime.dtype)
        if self.device.type != "cuda":
            self.autocast_dtype = None   # CPU runs fp32

    def _log_start(self) -> None:
        o, scale = self.cfg.optim, self.lr_scale
        log.info("stage %d on %s x%d | %d steps (%d per epoch), global batch %d (%d per rank x %d accum) | "
                 "lr %.3g -> %.3g, warm-up %d", self.cfg.stage, self.device.type, self.world,
                 self.total_steps, self.steps_per_epoch, self.global_batch, o.batch_per_gpu, self.accum,
                 self.peak_lr, self.min_lr, self.warmup)
        log.info("global batch %d = %d per GPU x %d GPUs x %d accumulation (asked %d) | lr x %.4g "
                 "(global batch / 256): peak %.3g = %.3g x %.4g", self.global_batch, o.batch_per_gpu,
                 self.world, self.accum, o.global_batch, scale, self.peak_lr, o.base_lr, scale)
        if self.global_batch != o.global_batch:
            log.warning("optim.global_batch=%d is not a multiple of batch_per_gpu x world = %d: "
                        "using %d clips per step", o.global_batch, o.batch_per_gpu * self.world, self.global_batch)

    # ---- checkpoints
    def _next_save_bytes(self) -> int:
        """About what the next checkpoint writes: the newest one's size, else the model's tensors
        plus AdamW's two moments per trainable value."""
        saved = ckpt.list_checkpoints(self.ckpt_dir)
        if saved:
            return sum(f.stat().st_size for f in saved[-1].iterdir())
        model = unwrap(self.model)
        moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return ckpt.state_bytes(model.state_dict()) + moments

    def _check_free_space(self) -> None:
        """Said at start-up: a save that cannot fit would end the run at its first checkpoint."""
        need, free = self._next_save_bytes(), ckpt.free_bytes(self.ckpt_dir)
        if free < need:
            log.warning("only %d bytes are free for %s; the next checkpoint needs about %d (%.2f GiB): free "
                        "space or point runtime.output_dir at a larger disk", free, self.ckpt_dir, need, need / 2**30)

    def _resume(self, resume: str) -> None:
        if resume == "auto":
            found = ckpt.load_latest(self.ckpt_dir)    # damaged ones skipped with a warning
            if found is None:
                log.info("--resume auto: no checkpoint in %s, starting from scratch", self.ckpt_dir)
                return
            path, model_state, state = found
        else:
            path = Path(resume)
            model_state, state = ckpt.load_checkpoint(path)
        opts = StateDictOptions(full_state_dict=True, strict=True)
        set_model_state_dict(unwrap(self.model), model_state, options=opts)
        set_optimizer_state_dict(unwrap(self.model), self.optimizer, state["optimizer"], options=opts)
        saved_world = len(state["data"]) if isinstance(state["data"], list) else 1
        if saved_world != self.world:
            raise ckpt.CheckpointError(f"{path} was written by {saved_world} ranks, this run has {self.world}: "
                                       "resume with the same number of processes")
        sched = state.get("scheduler", {})
        mine = {"total": self.total_steps, "warmup": self.warmup, "peak_lr": self.peak_lr}
        if any(sched.get(k) != v for k, v in mine.items()):
            log.warning("the lr schedule differs from the checkpoint's (%s now, %s then): epochs, batch or "
                        "lr settings changed", mine, {k: sched.get(k) for k in mine})
        self.step = state["step"]
        self._saved_step = self.step
        self.nonfinite = NonFiniteSteps(self.device, total_before=state.get("nonfinite_total", 0))
        self.loader.load_state_dict(state["data"][self.rank] if isinstance(state["data"], list) else state["data"])
        set_rng_state(state["rng"][self.rank] if isinstance(state["rng"], list) else state["rng"])
        log.info("resumed from %s at step %d", path, self.step)

    def _at(self, phase: str, step: int, micro: int = 0) -> None:
        if self.watchdog is not None:
            self.watchdog.enter(phase, step, micro)

    def save(self) -> Path | None:
        self._at("checkpoint", self.step - 1, self.accum - 1)
        self._check_nonfinite()
        model_state = full_model_state(self.model)
        optim_state = get_optimizer_state_dict(unwrap(self.model), self.optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        data_state, rng = self.loader.state_dict(), rng_state()
        if self.world > 1:   # every rank's data position and RNG, saved by rank 0
            data_all, rng_all = [None] * self.world, [None] * self.world
            dist.all_gather_object(data_all, data_state)
            dist.all_gather_object(rng_all, rng)
            data_state, rng = data_all, rng_all
        path = None
        if self.is_main:
            state = {"optimizer": optim_state, "step": self.step, "data": data_state, "rng": rng,
                     "scheduler": {"step": self.step, "peak_lr": self.peak_lr, "min_lr": self.min_lr,
                                   "warmup": self.warmup, "total": self.total_steps},
                     "nonfinite_total": self.nonfinite.total}
            path = ckpt.save_checkpoint(self.ckpt_dir, self.step, model_state, state, self.cfg,
                                        keep_last=self.cfg.runtime.keep_last)
        if self.world > 1:
            self._at("after checkpoint", self.step - 1, self.accum - 1)    # waiting for rank 0's write
            dist.barrier()
        self._saved_step = self.step
        return path

    # ---- one optimiser step
    def _next_batch(self):
        if self._it is not None:
            try:
                return next(self._it)
            except StopIteration:
                pass
        # The loader moves on to its next epoch by itself. A run resumed from a checkpoint taken
        # at the very end of an epoch first gets that epoch's (empty) remainder: try once more.
        for _ in range(2):
            self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                continue
        raise DataError("the data loader yields no batches in two epochs running; check data.train_list")

    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        lr = lr_at(self.step, self.peak_lr, self.min_lr, self.warmup, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        parts: dict[str, torch.Tensor] = {}
        for micro in range(self.accum):
            self._at("data", self.step, micro)
            with self.timer.phase("data", host=True):
                batch = self._upload_next_batch()
            seed = step_seed(cfg.runtime.seed, self.step, micro, self.rank)
            # drop path's stream; the model derives the masks' and the diffusion's own streams
            # from the same step seed (ivfast.models.epd.purpose_seed), so none re-uses another's
            torch.manual_seed(purpose_seed(seed, "drop_path"))
            last = micro == self.accum - 1
            sync = model.no_sync() if (self.world > 1 and not last and hasattr(model, "no_sync")) \
                else contextlib.nullcontext()
            with sync:
                self._at("forward", self.step, micro)
                with self.timer.phase("forward"), torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                                                 enabled=self.autocast_dtype is not None):
                    out = model(batch["video"], seed)
                self._at("backward", self.step, micro)
                with self.timer.phase("backward"):
                    (out["loss"] / self.accum).backward()
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    parts[k] = parts.get(k, 0.0) + v.detach().float() / self.accum
        self._at("optimizer", self.step, self.accum - 1)
        with self.timer.phase("optimizer"):
            params = [p for p in model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else 1e30)
            if hasattr(grad_norm, "full_tensor"):   # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            bad = ~(torch.isfinite(grad_norm) & torch.isfinite(parts["loss"]))
            if self._sync_free:
                # No host decision: fused AdamW leaves params, moments and step count untouched
                # where found_inf == 1. The counters stay on the device until a logging step.
                self.optimizer.found_inf = bad.float().reshape(())
                self.optimizer.step()
            elif not bool(bad):     # optimisers without found_inf (apex): one host sync per step decides
                self.optimizer.step()
            self.nonfinite.add(bad)
            self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": grad_norm.detach(), "skipped": bad.float(), **parts}

    def _log_recon(self) -> None:
        """Stage-1 reconstruction grid to TensorBoard (``runtime.recon_every``; rank 0, DDP only:
        FSDP shards would need every rank in the forward)."""
        if self.cfg.runtime.distributed == "fsdp" and self.world > 1:
            log.warning("runtime.recon_every: skipped under FSDP (sharded forward needs every rank)")
            return
        if self.metrics.tb is None:
            return
        log_recon(unwrap(self.model), self._last_video, self.metrics.tb, self.step)

    def _upload_next_batch(self) -> dict:
        """The next batch; on CUDA its host->device copies run on a side stream, overlapping the
        compute still queued (the host runs ahead of the GPU), and the compute stream waits only
        for them. The loader pins its clip buffers, so non_blocking copies are real async copies."""
        if self._copy_stream is None:
            batch = self._next_batch()
        else:
            with torch.cuda.stream(self._copy_stream):
                batch = self._next_batch()
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self._copy_stream)
            for v in batch.values():
                if torch.is_tensor(v) and v.is_cuda:
                    v.record_stream(compute)     # the copy stream's allocation is used on compute
        if self.cfg.runtime.recon_every:        # clips for the reconstruction grid and the decoder's
            self._last_video = batch["video"][:8]   # condition check (stage 1, off by default)
        return batch

    def _check_nonfinite(self) -> None:
        """Read the device's non-finite counters (one sync; logging and checkpoint steps only) and
        stop when ``runtime.max_nonfinite`` steps in a row were skipped. The check is up to
        ``runtime.log_every`` steps late, which costs compute only: those updates were skipped."""
        new, worst = self.nonfinite.read()
        if new:
            log.warning("step %d: %d step(s) since the last log had a non-finite loss or gradient: updates "
                        "skipped (%d in a row now)", self.step, new, self.nonfinite.in_row)
        limit = self.cfg.runtime.max_nonfinite
        if worst >= limit:
            raise NonFiniteLossError(
                f"{worst} steps in a row had a non-finite loss or gradient (by step {self.step}); "
                f"stopping. Lower optim.base_lr, check the data (python -m ivfast.data inspect), or resume from "
                f"the last checkpoint in {self.ckpt_dir} (runtime.max_nonfinite={limit})")

    # ---- the loop
    def _stop_requested(self, stop: "Preemption") -> str | None:
        """Whether any rank got a pre-emption signal: all ranks must stop after the same step."""
        if self.world == 1:
            return stop.requested
        # Read one step late: this step's all-reduce is queued on the stream and copied to pinned
        # host memory; the previous step's result is read after waiting for that copy only, so the
        # host never drains the queue. Every rank reads the same value at the same step.
        cuda = self.device.type == "cuda"
        if self._stop_flag is None:
            self._stop_flag = torch.zeros(1, device=self.device)
            self._stop_host = torch.zeros(1, pin_memory=cuda)
        prev = None
        if self._stop_event is not None:
            if cuda:
                self._stop_event.synchronize()
            prev = float(self._stop_host.numpy()[0])
        self._stop_flag.fill_(1.0 if stop.requested else 0.0)
        dist.all_reduce(self._stop_flag, op=dist.ReduceOp.MAX)
        self._stop_host.copy_(self._stop_flag, non_blocking=cuda)
        self._stop_event = torch.cuda.Event() if cuda else True
        if cuda:
            self._stop_event.record()
        return (stop.requested or "signal on another rank") if prev else None

    def _global_mean(self, rec: dict) -> dict:
        """Loss parts averaged over ranks (logged values are the whole step's, not rank 0's)."""
        keys = [k for k, v in rec.items() if torch.is_tensor(v) and v.numel() == 1]
        if self.world > 1 and keys:
            vals = torch.stack([rec[k].float().reshape(()) for k in keys])
            dist.all_reduce(vals, op=dist.ReduceOp.AVG if self.device.type == "cuda" else dist.ReduceOp.SUM)
            if self.device.type != "cuda":   # gloo has no AVG
                vals = vals / self.world
            rec = dict(rec, **dict(zip(keys, vals)))
        # One device read for all scalars (a logging step's only sync besides the phase timer's).
        scalars = torch.stack([rec[k].float().reshape(()) for k in keys]).tolist() if keys else []
        return {**rec, **dict(zip(keys, scalars))}

    def _check_bad_data(self) -> None:
        """Bad videos met while decoding, counted over all ranks, against data.max_bad_fraction.

        Each rank's loader only sees its own shard; summed here, every rank takes the same
        decision (a rank that stopped alone would leave the others waiting in a collective).
        """
        s = self.loader.bad_summary()
        decode_bad = float(s["decode_bad_files"])
        if self.world > 1:
            t = torch.tensor([decode_bad], device=self.device)
            dist.all_reduce(t)
            decode_bad = t.item()
        bad = sum(s["index"].values()) + decode_bad
        if bad / max(1, s["files"]) > self.cfg.data.max_bad_fraction:
            raise DataError(f"{int(bad)} of {s['files']} videos are bad over all ranks ({bad / s['files']:.1%} > "
                            f"data.max_bad_fraction={self.cfg.data.max_bad_fraction}); e.g. {s['examples']}. "
                            "Fix or remove them (python -m ivfast.data inspect LIST) or raise data.max_bad_fraction")

    def fit(self) -> Path:
        """Train to ``stop_step`` or a pre-emption signal, save, and return the last checkpoint's path."""
        stop, bar = Preemption(), self._progress_bar()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        window = StepWindow()
        self.model.train()
        self.watchdog = RankWatchdog.for_run(self.rank, self.world, self.cfg.runtime.collective_timeout_s)
        try:
            while self.step < self.stop_step:
                window.start += self.profile.step(self.step)   # trace export time is not step time
                res = self.train_step()
                self.step += 1
                window.steps += 1
                self._report_attention_once()
                if bar is not None:
                    bar.update(1)
                self._at("sync", self.step - 1, self.accum - 1)      # the collectives closing the step
                if self.step % self.cfg.runtime.log_every == 0 or self.step == self.stop_step:
                    self._log_step(res, window, bar)
                self._maybe_log_recon()
                if self.step % self.cfg.runtime.ckpt_every == 0:
                    self.save()
                if self._preempted(stop):
                    break
        except BaseException:
            if self.watchdog is not None:      # an error of this rank is no hang of another
                self.watchdog.stop()
            raise
        finally:
            stop.restore()
            self.profile.close()
            if bar is not None:
                bar.close()
            self.metrics.close()
        self._save_last()
        return self.ckpt_dir / f"step_{self.step:08d}"

    # ---- fit()'s parts, in the order it calls them
    def _progress_bar(self):
        """A tqdm bar on rank 0, None on the others."""
        if not self.is_main:
            return None
        return tqdm(total=self.stop_step, initial=self.step, desc=f"stage {self.cfg.stage}", unit="step",
                    dynamic_ncols=True, file=sys.stderr)

    def _report_attention_once(self) -> None:
        """After the first step: which attention backends it chose (rank 0, once per trainer)."""
        if self.is_main and not self._reported_attention:
            log.info("attention backends used: %s", used_backends())
            self._reported_attention = True

    def _log_step(self, res: dict, window: StepWindow, bar) -> None:
        """A logging step: the run's checks (non-finite steps, bad videos), then one metrics record."""
        self._check_nonfinite()
        self._check_bad_data()
        rec = self._log_record(res, self.timer.collect(), window)
        self.metrics.log(self.step, rec)
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                            clips_s=f"{rec['clips_per_s_per_gpu']:.1f}")
        window.restart()

    def _log_record(self, res: dict, phases: dict, window: StepWindow) -> dict:
        """The step's loss parts averaged over ranks, with phase times, throughput, MFU and memory."""
        dt = time.perf_counter() - window.start
        clips_s = self.global_batch / self.world * window.steps / dt
        rec = self._global_mean(res)
        rec.update({f"time/{k}": v / window.steps for k, v in phases.items()})
        rec.update({"epoch": self.step / self.steps_per_epoch, "step_time": dt / window.steps,
                    "clips_per_s_per_gpu": clips_s, "tokens_per_s_per_gpu": clips_s * self.tokens_per_clip,
                    "nonfinite_total": self.nonfinite.total})
        if self.peak_flops:
            rec["mfu"] = clips_s * self.flops_per_clip / self.peak_flops
        if self.device.type == "cuda":
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        rec["attention_backends"] = used_backends()   # compiled calls included
        return rec

    def _maybe_log_recon(self) -> None:
        r = self.cfg.runtime
        if (r.recon_every and self.cfg.stage == 1 and self.is_main and self._last_video is not None
                and self.step % r.recon_every == 0):
            self._log_recon()

    def _preempted(self, stop: Preemption) -> bool:
        """Whether a pre-emption signal (on any rank) ends the loop after this step."""
        self.preempted = self._stop_requested(stop)
        if self.preempted:
            log.warning("%s received: saving at step %d and exiting", self.preempted, self.step)
        return bool(self.preempted)

    def _save_last(self) -> None:
        """The final checkpoint unless this step's is saved already; then the run's bad-video summary."""
        try:
            if self._saved_step != self.step:      # the same decision on every rank
                self.save()
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
        if self.is_main:
            summary = self.loader.bad_summary()
            if summary["bad_files"]:
                log.warning("bad videos this run: %s", {k: summary[k] for k in ("index", "decode", "examples")})
