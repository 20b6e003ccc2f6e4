"""A bounded byte-mutation fuzz campaign of the decoders, through ``inspect`` and the loader.

``python bench/fuzz_decoders.py OUT_DIR [--inputs 1200] [--seed 0] [--time-limit 10] [--size 96x80]
[--frames 24] [--json RESULT]``

Seeds: synthetic clips in H.264 (MP4, and remuxed into AVI), H.264 with B-frames (MP4), VP9
(WebM) and MJPEG (AVI). Each mutant is a seed with 1-3 of: random byte flips, a random chunk
overwritten, a chunk deleted, a chunk duplicated, the header zeroed, a truncation.

Stage 1, ``inspect``: every mutant through ``ivfast.data.__main__.inspect_file`` (full decode)
in a worker process that is restarted when it dies; each ends as good, bad (with the probe's
reason), crash (the signal that killed the worker), timeout (over ``--time-limit``) or
exception (``probe`` raised, which it must not).
Stage 2, the loader: one epoch of all mutants through ``build_loader`` with two DataLoader
workers (quick index probe, ``data.decode_timeout_s`` = the time limit): every file must end
as index-bad, decode-bad (a reason, decoder crashes and time-outs included) or delivered.
Mutants whose outcome was a crash, a timeout or an exception are copied to ``OUT_DIR/found``.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import av
import numpy as np

from ivfast.config import load_config
from ivfast.data import build_loader
from ivfast.data.synth import make_videos, write_video

WORKER = r"""
import json, sys
from ivfast.data.__main__ import inspect_file
for line in sys.stdin:
    path = line.rstrip("\n")
    try:
        r = inspect_file(path, full=True)
        out = {"outcome": "good" if r["decodes"] else "bad:" + str(r["error"]), "detail": r["detail"]}
    except Exception as e:
        out = {"outcome": "exception:" + type(e).__name__, "detail": str(e)[:300]}
    print(json.dumps(out), flush=True)
"""


def seeds(out: Path, size: tuple[int, int], frames: int) -> list[Path]:
    d = out / "seeds"
    shutil.rmtree(d, ignore_errors=True)
    files = [make_videos(d, 1, codec, frames=frames, size=size, seed=k, prefix=f"seed{k}")[0]
             for k, codec in enumerate(("h264", "h264b", "vp9", "mjpeg"))]
    with av.open(str(files[0])) as src:              # the same pictures, H.264 in an AVI container
        frames = np.stack([f.to_ndarray(format="rgb24") for f in src.decode(video=0)])
    return files + [write_video(d / "seed4_h264.avi", frames, "h264")]


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        n = len(b)
        if n < 16:
            break
        op = int(rng.integers(6))
        at = int(rng.integers(n))
        size = int(rng.integers(1, max(2, n // 16)))
        if op == 0:                                   # flip bytes
            for i in rng.integers(0, n, int(rng.integers(1, 17))):
                b[int(i)] ^= int(rng.integers(1, 256))
        elif op == 1:                                 # overwrite a chunk
            b[at:at + size] = rng.integers(0, 256, len(b[at:at + size]), dtype=np.uint8).tobytes()
        elif op == 2:                                 # delete a chunk
            del b[at:at + size]
        elif op == 3:                                 # duplicate a chunk
            b[at:at] = b[at:at + size]
        elif op == 4:                                 # zero the header
            b[:min(n, size, 512)] = bytes(min(n, size, 512))
        else:                                         # truncate
            del b[max(8, at):]
    return bytes(b)


class Inspector:
    """A worker process running inspect_file, restarted when it dies or passes the time limit."""

    def __init__(self, time_limit: float):
        self.time_limit, self.proc = time_limit, None

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})

    def run(self, path: Path) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.time_limit + 30)   # + start-up
        if not ready:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"outcome": "timeout", "detail": f"no answer in {self.time_limit + 30:g} s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            sig = signal.Signals(-code).name if code < 0 else f"exit {code}"
            return {"outcome": f"crash:{sig}", "detail": "the decoding process died"}
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--inputs", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--size", default="96x80", help="seed clips' WIDTHxHEIGHT")
    ap.add_argument("--frames", type=int, default=24, help="seed clips' frames")
    ap.add_argument("--json", default="")
    ap.add_argument("--loader-stage", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = Path(a.out)
    if a.loader_stage:
        return loader_stage(a.loader_stage, out, a.time_limit)
    shutil.rmtree(out / "mutants", ignore_errors=True)
    (out / "mutants").mkdir(parents=True)
    base = seeds(out, tuple(int(x) for x in a.size.split("x")), a.frames)
    mutants = []
    for i in range(a.inputs):
        src = base[i % len(base)]
        dst = out / "mutants" / f"m{i:05d}_{src.stem.rsplit('_', 1)[1]}{src.suffix}"
        dst.write_bytes(mutate(src.read_bytes(), np.random.default_rng([a.seed, i])))
        mutants.append(dst)

    t0 = time.monotonic()
    insp = Inspector(a.time_limit)
    outcomes, found = Counter(), []
    per_seed: dict[str, Counter] = {}
    for m in mutants:
        r = insp.run(m)
        kind = r["outcome"]
        outcomes[kind] += 1
        per_seed.setdefault(m.stem.rsplit("_", 1)[1] + m.suffix, Counter())[kind.split(":")[0]] += 1
        if kind.startswith(("crash", "timeout", "exception")):
            found.append({"file": m.name, **r})
    insp.close()
    t_inspect = time.monotonic() - t0

    # stage 2: the loader, one epoch over every mutant and as many intact copies of the seeds (a
    # data set of mostly bad files stops at its replacement limit, by design). It runs in a
    # fresh process: this one has run PyAV's threaded decoders, and DataLoader workers forked
    # from it can deadlock (a real hang, which the time limit would then blame on some file).
    listing = out / "mutants.csv"
    good = []
    for i in range(len(mutants)):
        src = base[i % len(base)]
        good.append(out / "mutants" / f"intact{i:05d}{src.suffix}")
        shutil.copy(src, good[-1])
    listing.write_text("".join(f"{m}\n" for m in mutants + good))
    t0 = time.monotonic()
    res_loader = subprocess.run([sys.executable, __file__, str(out), "--loader-stage", str(listing),
                                 "--time-limit", str(a.time_limit)], capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=3600)
    if res_loader.returncode != 0:
        sys.exit(f"loader stage failed: {res_loader.stderr[-3000:]}")
    loader_res = json.loads(res_loader.stdout.strip().splitlines()[-1])
    loader_res["seconds"] = round(time.monotonic() - t0, 1)
    res = {"inputs": len(mutants), "seeds": [p.name for p in base], "seed": a.seed, "time_limit_s": a.time_limit,
           "seed_clips": f"{a.size}, {a.frames} frames",
           "date": time.strftime("%Y-%m-%d"), "pyav": av.__version__, "ffmpeg": av.library_versions.get("libavcodec"),
           "inspect": {"outcomes": dict(sorted(outcomes.items())), "per_seed": {k: dict(v) for k, v in per_seed.items()},
                       "seconds": round(t_inspect, 1)},
           "loader": loader_res, "found": found}
    for f in found:
        (out / "found").mkdir(exist_ok=True)
        shutil.copy(out / "mutants" / f["file"], out / "found" / f["file"])
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    if loader_res["accounted"] != loader_res["files"]:
        sys.exit(f"loader: {loader_res['files']} files, {loader_res['accounted']} accounted for: some were lost")


def loader_stage(listing: str, out: Path, time_limit: float) -> None:
    """One epoch of ``listing`` through the loader; prints one JSON line of the accounting."""
    cfg = load_config("demo", [f"data.train_list={listing}", f"data.index_cache={out / 'index.jsonl'}",
                               "data.num_workers=2", "data.backend=pyav", "data.max_bad_fraction=1.0",
                               f"data.decode_timeout_s={time_limit}", "data.verify=first",
                               "optim.batch_per_gpu=4"])
    loader = build_loader(cfg)
    delivered = set()
    for batch in loader:
        delivered.update(loader.path_of(int(i)) for i in batch["index"])
    s = loader.bad_summary()
    accounted = sum(s["index"].values()) + s["decode_bad_files"] + len(delivered)
    print(json.dumps({"files": s["files"], "index_bad": s["index"], "decode_bad": s["decode"],
                      "decode_bad_files": s["decode_bad_files"], "delivered_files": len(delivered),
                      "accounted": accounted,
                      "examples": {k: [Path(p).name for p in v] for k, v in s["examples"].items()}}))


if __name__ == "__main__":
    main()
