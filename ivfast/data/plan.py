"""The plan step of ``python -m ivfast.data prepare``: which encoding feeds the GPUs at the least disk.

All-intra files decode fastest but take the most disk; a larger GOP, or the sources kept as
they are, take less disk and decode slower. Training needs only enough clips per second per
GPU, so the plan measures the candidates on a sample of the list and picks the smallest
output that is fast enough:

* a sample of ``files`` entries (spread over the list by a fixed seed), each cut to its first
  ``seconds`` seconds (long sources then cost no more than Kinetics-length clips);
* each candidate GOP encoded by :func:`ivfast.data.prepare.prepare_one` with the run's
  settings, and ``keep`` (no re-encode, the sources as they are) when every sampled source
  is small already (no downscale, no frame dropped);
* per candidate: size against the sources (the sources' bytes pro rata for a cut file),
  clips per CPU-second of the training loader at the config's frames and crop with one
  decoder thread (:func:`clips_per_cpu_second`; the sources for ``keep``, whole files), and
  the predicted wall time to prepare the whole list (the sample's encode CPU-seconds scaled
  to full length and to the list, over the worker processes);
* :func:`recommend`: the smallest output whose clips per core meet
  ``clips_per_gpu / cores_per_gpu`` times ``margin``; when none does, the fastest.

A GOP cut by ``seconds`` is measured faithfully as long as the loader's frame spacing
(frames / T) on the cut is at least the GOP: 8.5 s at 30 fps for GOP 16 and T=16.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

from ..config import load_config
from .index import Entry, probe, write_list
from .loader import build_loader
from .prepare import Job, is_small, out_path, prepare_one

# Stage 1 ViT-B on an H100: batch 16 per GPU in a step predicted at 447 ms (bf16 levers on;
# bench/results/train_step_levers_PREDICTED.md). A prediction, not a measurement.
STAGE1_BATCH_PER_GPU = 16
STAGE1_PREDICTED_STEP_S = 0.447
DEFAULT_CLIPS_PER_GPU = round(STAGE1_BATCH_PER_GPU / STAGE1_PREDICTED_STEP_S, 1)
DEFAULT_CORES_PER_GPU = 8
DEFAULT_MARGIN = 1.5
PLAN_FILE = "prepare_plan.json"     # in OUT_DIR: the choice, which a resumed run keeps
PLAN_DIR = ".plan"                  # in OUT_DIR: the trial encodes, removed when the plan is done


@dataclass
class Row:
    """One measured candidate. ``gop`` 0 is ``keep`` (the sources as they are)."""
    setting: str
    gop: int
    size_ratio: float            # output bytes / source bytes
    clips_per_core: float        # training-loader clips per CPU-second, one decoder thread
    prepare_s: float = 0.0       # predicted wall seconds to prepare the whole list
    fallback_gop: int = 0        # keep only: the GOP for sources that are not small


@dataclass
class Budget:
    clips_per_gpu: float = DEFAULT_CLIPS_PER_GPU
    cores_per_gpu: float = DEFAULT_CORES_PER_GPU
    margin: float = DEFAULT_MARGIN

    @property
    def need_per_core(self) -> float:
        """Clips per CPU-second each core must deliver, margin included."""
        return self.clips_per_gpu * self.margin / self.cores_per_gpu


def recommend(rows: list[Row], budget: Budget) -> tuple[Row, str]:
    """The smallest output that meets the budget with its margin (the faster on a size tie);
    when none meets it, the fastest. Returns the row and one line saying why."""
    if not rows:
        raise ValueError("recommend() needs at least one measured row")
    need = budget.need_per_core
    ok = [r for r in rows if r.clips_per_core >= need]
    feed = f"{budget.clips_per_gpu:g} clips/s per GPU from {budget.cores_per_gpu:g} cores"
    if ok:
        best = min(ok, key=lambda r: (r.size_ratio, -r.clips_per_core))
        return best, (f"{best.setting}: the smallest output ({best.size_ratio:.2f}x the sources) that feeds {feed} "
                      f"with a {budget.margin:g}x margin ({best.clips_per_core:.1f} >= {need:.1f} clips/s per core)")
    best = max(rows, key=lambda r: r.clips_per_core)
    return best, (f"{best.setting}: NO setting feeds {feed} with a {budget.margin:g}x margin "
                  f"({need:.1f} clips/s per core needed); the fastest gives {best.clips_per_core:.1f} "
                  f"({best.clips_per_core * budget.cores_per_gpu:.0f} clips/s per GPU) at {best.size_ratio:.2f}x")


def clips_per_cpu_second(fns: dict, n: int, rounds: int = 3) -> dict:
    """Clips per CPU-second of each ``fn(i)``, i in range(n), in this process (FFmpeg's threads
    included): 'clips/s per core', robust on a machine whose cores are shared (wall time is
    not). The functions take turns, round after round, and each keeps its best round, so a
    burst of load from another process does not land on one of them only."""
    # one torch thread, as in a DataLoader worker: idle intra-op threads spin and count as CPU time
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fn in fns.values():
            fn(0)                                        # warm-up
        best = {k: 0.0 for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                t = time.process_time()
                for i in range(n):
                    fn(i)
                best[k] = max(best[k], n / max(1e-9, time.process_time() - t))
    finally:
        torch.set_num_threads(threads)
    return best


def loader_decoder(paths: list[str], folder: str, config: str = "stage1_vitb"):
    """(``fn(i)``, frames, crop): ``fn(i)`` is the training loader's decode of path i (the config's
    frames, crop and sampling, one decoder thread, no workers), as timed by
    :func:`clips_per_cpu_second`."""
    os.makedirs(folder, exist_ok=True)
    lst = os.path.join(folder, "list.csv")
    write_list(lst, [Entry(p) for p in paths])
    cfg = load_config(config, [f"data.train_list={lst}", f"data.index_cache={os.path.join(folder, 'index.jsonl')}",
                               "data.backend=pyav", "data.num_workers=0", "data.decode_threads=1",
                               "data.verify=first", "optim.batch_per_gpu=1"])
    ds = build_loader(cfg, device="cpu").dataset
    return (lambda i: ds.decode_one(int(ds.usable[i % len(ds.usable)]), 0, 0)), cfg.model.num_frames, cfg.model.img_size


def sample_entries(entries: list[Entry], files: int, seed: int = 0) -> list[Entry]:
    """Up to ``files`` entries spread over the list (a fixed seed: a rerun samples the same ones)."""
    if len(entries) <= files:
        return list(entries)
    pick = sorted(random.Random(seed).sample(range(len(entries)), files))
    return [entries[i] for i in pick]


def measure(entries: list[Entry], job: Job, work_dir: str, *, gops=(1, 4, 16), files: int = 24,
            seconds: float = 10.0, config: str = "stage1_vitb", workers: int = 1, rounds: int = 2) -> dict:
    """Encode and time the candidates on a sample of ``entries`` (``job`` gives the run's
    encoder settings). Returns {'rows': [Row], 'sample': n, 'keep_possible', 'outputs': {gop:
    {src: (dst, whole file)}}, 'frames' and 'crop' timed, 'seconds': wall seconds of the plan}."""
    t0 = time.time()
    sample = sample_entries(entries, files)
    srcs = list(dict.fromkeys(os.path.abspath(e.path) for e in sample))     # a file listed twice is timed once
    infos = {s: probe(s) for s in srcs}
    srcs = [s for s in srcs if infos[s].ok]          # bad files fail later, in the run, with their reason
    if not srcs:
        raise ValueError("no sampled file decodes; run `python -m ivfast.data inspect LIST` to see why")
    base = os.path.commonpath([os.path.dirname(s) for s in srcs])
    jobs = [Job(s, out_path(s, base, os.path.join(work_dir, f"gop{g}")), job.short_side, g, job.fps_cap, job.crf,
                job.preset, job.bframes, max_seconds=seconds) for g in gops for s in srcs]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            res = list(ex.map(prepare_one, jobs))
    else:
        res = [prepare_one(j) for j in jobs]
    failed = {r["src"] for r in res if r["status"] == "failed"}
    if len(failed) == len(srcs):
        r = next(r for r in res if r["status"] == "failed")
        raise ValueError(f"the plan could not encode any sampled file, e.g. {r['src']}: {r['error']}")
    # a file that fails fails again in the run, with its reason in failed.txt; the plan goes on without it
    srcs = [s for s in srcs if s not in failed]
    jobs, res = zip(*[(j, r) for j, r in zip(jobs, res) if r["src"] not in failed])
    n_list = len(entries)
    rows, outputs, decoders = [], {}, {}
    for g in gops:
        mine = [r for j, r in zip(jobs, res) if j.gop == g]
        # a cut file is compared with its sources' bytes pro rata (by frames), and its encode
        # cost scaled up to the full length
        src_bytes = sum(r["bytes_in"] * _share(r, infos[r["src"]]) for r in mine)
        cpu_full = sum(r["cpu_s"] / _share(r, infos[r["src"]]) for r in mine)
        rows.append(Row(f"gop {g}", g, sum(r["bytes_out"] for r in mine) / max(1.0, src_bytes), 0.0,
                        cpu_full / len(mine) * n_list / max(1, min(workers, os.cpu_count() or 1))))
        outputs[g] = {r["src"]: (r["dst"], not r.get("cut")) for r in mine}
        decoders[f"gop {g}"], frames, crop = loader_decoder([r["dst"] for r in mine],
                                                            os.path.join(work_dir, f"index_gop{g}"), config)
    keep_possible = all(is_small(infos[s].width, infos[s].height, infos[s].fps, job.short_side, job.fps_cap)
                        for s in srcs)
    if keep_possible:
        t = time.process_time()
        for s in srcs:
            probe(s, full=True)            # what keep's verification costs per file
        rows.append(Row("keep", 0, 1.0, 0.0, (time.process_time() - t) / len(srcs) * n_list
                        / max(1, min(workers, os.cpu_count() or 1))))
        decoders["keep"] = loader_decoder(srcs, os.path.join(work_dir, "index_keep"), config)[0]
    speed = clips_per_cpu_second(decoders, len(srcs), rounds)
    for r in rows:
        r.clips_per_core = speed[r.setting]
    return {"rows": rows, "sample": len(srcs), "keep_possible": keep_possible, "outputs": outputs,
            "frames": frames, "crop": crop, "seconds": time.time() - t0}


def _share(rec: dict, info) -> float:
    """The part of the source a plan encode covered (1.0 for a whole file)."""
    if not rec.get("cut") or info.frames <= 0:
        return 1.0
    return min(1.0, rec.get("frames_in", info.frames) / info.frames)


def format_table(rows: list[Row]) -> str:
    lines = [f"{'setting':<8} {'size vs sources':>15} {'clips/s per core':>17} {'prepare whole list (predicted)':>31}"]
    for r in rows:
        lines.append(f"{r.setting:<8} {r.size_ratio:>14.2f}x {r.clips_per_core:>17.1f} {_duration(r.prepare_s):>31}")
    return "\n".join(lines)


def _duration(s: float) -> str:
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def save_plan(path: str, rows: list[Row], choice: Row, why: str, extra: dict) -> None:
    with open(path, "w") as f:
        json.dump({"choice": asdict(choice), "why": why, "rows": [asdict(r) for r in rows], **extra}, f, indent=1)
        f.write("\n")


def load_choice(path: str, key: dict) -> tuple[Row, str] | None:
    """The choice an earlier run of the same output folder made with the same ``key`` (budget and
    encoder settings); None when there is none."""
    try:
        with open(path) as f:
            d = json.load(f)
        if d.get("key") != key:
            return None
        return Row(**d["choice"]), d["why"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def adopt_outputs(outputs: dict, gop: int, jobs: list[Job]) -> set[str]:
    """Move the plan's whole-file encodes at the chosen GOP to their places in the run (the run
    then skips them as done); returns the destinations filled."""
    by_src = outputs.get(gop, {})
    moved = set()
    for j in jobs:
        dst, whole = by_src.get(j.src, ("", False))
        if whole and os.path.exists(dst) and not os.path.exists(j.dst):
            os.makedirs(os.path.dirname(j.dst) or ".", exist_ok=True)
            shutil.move(dst, j.dst)
            moved.add(j.dst)
    return moved


def remove_work(out_dir: str) -> None:
    shutil.rmtree(os.path.join(out_dir, PLAN_DIR), ignore_errors=True)


def plan_for_run(args, entries: list[Entry], settings: Job, gops: list[int]) -> tuple[int, bool, dict | None]:
    """The run's GOP and whether small sources are kept, from the plan (measured now, or the one an
    earlier run of this output folder saved); prints the table and one line saying which and why.
    Returns (gop, keep, the plan's encodes or None)."""
    path = os.path.join(args.out_dir, PLAN_FILE)
    budget = Budget(args.clips_per_gpu, args.cores_per_gpu, args.margin)
    # what the choice depends on: a rerun with the same ones keeps it (and its outputs) unmeasured
    key = {"budget": asdict(budget), "gops": list(gops), "config": args.config, "short_side": settings.short_side,
           "fps_cap": settings.fps_cap, "crf": settings.crf, "preset": settings.preset, "bframes": settings.bframes}
    if not args.plan:
        earlier = load_choice(path, key)
        if earlier is not None:
            row, why = earlier
            print(f"plan: {why} (chosen by the earlier run, {path}; --gop N to choose yourself)")
            return row.gop or row.fallback_gop, row.gop == 0, None
    load_config(args.config)          # a wrong --config fails now, not after the trial encodes
    work = os.path.join(args.out_dir, PLAN_DIR)
    shutil.rmtree(work, ignore_errors=True)
    try:
        m = measure(entries, settings, work, gops=gops, files=args.plan_files, seconds=args.plan_seconds,
                    config=args.config, workers=args.workers)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    rows = m["rows"]
    choice, why = recommend(rows, budget)
    if choice.gop == 0:
        # keep leaves small sources as they are; a larger one in the list gets the best GOP
        choice.fallback_gop = recommend([r for r in rows if r.gop], budget)[0].gop
    print(f"plan on {m['sample']} of {len(entries)} files (first {args.plan_seconds:g} s of each, "
          f"T={m['frames']}, {m['crop']} px crop, one decoder thread; took {m['seconds']:.1f} s):")
    print(format_table(rows))
    gop_note = f"; larger sources get gop {choice.fallback_gop}" if choice.gop == 0 else ""
    print(f"plan: {why}{gop_note}" + ("" if args.plan else "; --gop N to choose yourself"))
    save_plan(path, rows, choice, why, {"key": key, "sample": m["sample"], "files": len(entries),
                                        "plan_seconds": round(m["seconds"], 2)})
    if args.plan:
        shutil.rmtree(work, ignore_errors=True)
    return choice.gop or choice.fallback_gop, choice.gop == 0, m["outputs"]


def measure_outputs(paths: list[str], out_dir: str, config: str, files: int = 8) -> str:
    """One line: the training loader's clips per CPU-second on a sample of the outputs."""
    pick = [paths[i] for i in sorted(random.Random(0).sample(range(len(paths)), min(files, len(paths))))]
    folder = os.path.join(out_dir, PLAN_DIR, "check")
    try:
        fn, frames, crop = loader_decoder(pick, folder, config)
        speed = clips_per_cpu_second({"out": fn}, len(pick), rounds=1)["out"]
    except Exception as e:        # the outputs are written and listed already; only the report is missing
        return f"could not time the outputs ({type(e).__name__}: {e})"
    finally:
        shutil.rmtree(os.path.join(out_dir, PLAN_DIR), ignore_errors=True)
    return (f"measured on {len(pick)} outputs: {speed:.1f} clips per CPU-second (T={frames}, {crop} px crop, "
            "one decoder thread)")
