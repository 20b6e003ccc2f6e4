"""``python -m ivfast.data prepare LIST OUT_DIR``: re-encode a data set once into a form that
trains fast.

Sparse TSN sampling of raw uploads (keyframe every ~250 frames, full source resolution)
decodes nearly every frame of every video. Prepared files have the short side scaled to
``--short-side`` (default 256, just above a 224 crop), a keyframe every ``--gop`` frames (the
loader then seeks to the keyframe before each sample instead of decoding through), no
B-frames by default (``--bframes``), an optional frame-rate cap, and H.264 tuned for fast
decoding (no CABAC or deblocking, ``tune=fastdecode``), which CPU decoders and NVDEC both
decode fast.

``--gop`` trades disk for decoding: with 16 TSN samples from a 10 s, 30 fps clip, a sample
costs one keyframe plus on average (gop - 1) / 2 frames. Without ``--gop`` the plan step
(``ivfast.data.plan``; ``--plan`` runs it alone) measures gop 1 / 4 / 16, and keeping small
sources as they are, on a sample of the list and takes the smallest output that still feeds
``--clips-per-gpu`` from ``--cores-per-gpu`` cores with ``--margin``. Measured ranges over
synthetic and real clips are in the README (bench/results/loader_*_cputime.json): at 340x256
gop 1 files are 7.0-8.1x the sources (up to 11x per clip), gop 16 2.4-3.5x.

* Parallel over processes, with a progress bar; resumable: an output is written to a
  temporary name, verified by a full decode (frame count), then renamed, so an existing
  output is a finished one and is skipped next time.
* The list's labels, sources and clip times are carried into ``OUT_DIR/list.csv``
  (CSV with a header, which every ivfast command reads); files that fail are left out and
  listed in ``OUT_DIR/failed.txt``.
* A summary: files done / kept / skipped / failed, bytes in and out, wall time, and the
  training loader's clips per CPU-second on a sample of the outputs.
* ``--shards MB``: then pack the outputs, in list order, into uncompressed tar shards of about
  MB megabytes each (webdataset layout, ``OUT_DIR/shards/shard-NNNNNN.tar``) and write
  ``OUT_DIR/shards.csv``, whose rows give each sample's shard member and byte range: the loader
  reads a sample in place, by id, so exact resume is kept (see ``ivfast.data.shards``). Each
  shard is verified (bytes and a full decode of every video) before its rename; a rerun keeps
  shards that match. The loose files stay (they are what makes the re-encode resumable).

This module re-encodes one file (:func:`prepare_one`); the command that plans, re-encodes every
file and packs is :func:`ivfast.data.__main__.prepare_main`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from fractions import Fraction

from .index import probe
from .sources import iter_frames


@dataclass
class Job:
    src: str
    dst: str
    short_side: int
    gop: int
    fps_cap: float
    crf: int
    preset: str
    bframes: int = 0        # B-frames between references; 0: every frame decodes in display order
    max_seconds: float = 0.0   # > 0: encode only the first this many seconds (the plan's short samples)
    keep_small: bool = False   # a source needing no downscale or frame drop is used as it is


def out_path(entry_path: str, base: str, out_dir: str) -> str:
    """OUT_DIR/<path relative to the list's common folder, extension .mp4>."""
    rel = os.path.relpath(os.path.abspath(entry_path), base)
    if rel.startswith(".."):
        rel = os.path.basename(entry_path)
    return os.path.join(out_dir, os.path.splitext(rel)[0] + ".mp4")


def target_size(w: int, h: int, short_side: int) -> tuple[int, int]:
    """Scale so the short side is ``short_side`` (never upscale); both sides even (4:2:0)."""
    s = min(1.0, short_side / min(w, h)) if short_side > 0 else 1.0
    return max(2, int(round(w * s / 2)) * 2), max(2, int(round(h * s / 2)) * 2)


def kept_frames(n_in: int, fps: float, cap: float) -> list[int]:
    """Input frame numbers kept under a frame-rate cap: the first frame of each output tick."""
    if cap <= 0 or fps <= cap:
        return list(range(n_in))
    out, last = [], -1
    for i in range(n_in):
        tick = int(i * cap / fps)
        if tick != last:
            out.append(i)
            last = tick
    return out


def is_small(width: int, height: int, fps: float, short_side: int, fps_cap: float) -> bool:
    """Whether re-encoding would neither downscale nor drop frames (``keep`` can use it as it is)."""
    return (short_side <= 0 or min(width, height) <= short_side) and (fps_cap <= 0 or fps <= fps_cap)


def prepare_one(job: Job) -> dict:
    """Re-encode one file; returns {'src', 'dst', 'status': done|kept|skipped|failed, 'cpu_s', ...}.

    ``kept`` (with ``job.keep_small``): the source is small already; ``dst`` is the source,
    verified by a full decode, and nothing is written."""
    t0 = time.process_time()
    rec = _prepare_one(job)
    # CPU seconds of this process, encoder and decoder threads included (the plan's cost estimate)
    return {**rec, "cpu_s": time.process_time() - t0}


def _prepare_one(job: Job) -> dict:
    import av   # PyAV is optional: ivfast.data imports without it (the DALI-only GPU machine)
    from av.video.frame import PictureType

    rec = {"src": job.src, "dst": job.dst, "bytes_in": 0, "bytes_out": 0, "frames": 0}
    try:
        rec["bytes_in"] = os.path.getsize(job.src)
    except OSError as e:
        return {**rec, "status": "failed", "error": f"missing: {e}"}
    if job.keep_small:
        kept = _keep(job, rec)
        if kept is not None:
            return kept
    if os.path.exists(job.dst):
        # finished earlier: its frame count is the one it was verified with (our mp4 header lists
        # it exactly), so a rerun describes it as the first run did (shard metadata stays the same)
        try:
            with av.open(job.dst) as done:
                frames = max(0, done.streams.video[0].frames)
        except Exception:
            frames = 0
        return {**rec, "status": "skipped", "bytes_out": os.path.getsize(job.dst), "frames": frames}
    os.makedirs(os.path.dirname(job.dst) or ".", exist_ok=True)
    tmp = f"{job.dst}.tmp{os.getpid()}.mp4"
    try:
        with av.open(job.src, metadata_errors="ignore") as inp:
            s = inp.streams.video[0]
            s.thread_type = "AUTO"
            rate = s.average_rate or s.guessed_rate or 25
            fps = float(rate)
            out_fps = min(fps, job.fps_cap) if job.fps_cap > 0 else fps
            keep_every = job.fps_cap > 0 and fps > job.fps_cap
            with av.open(tmp, "w", format="mp4") as out:
                o = out.add_stream("libx264", rate=Fraction(out_fps).limit_denominator(1001),
                                   options={"preset": job.preset, "tune": "fastdecode", "crf": str(job.crf),
                                            # exact GOP: a keyframe every gop frames, no scene-cut extras
                                            "x264-params": f"keyint={job.gop}:min-keyint={job.gop}:scenecut=0:bframes={job.bframes}"})
                o.pix_fmt = "yuv420p"
                o.gop_size = job.gop
                size = None
                n_in = n_out = 0
                last_tick = -1
                last_in = int(job.max_seconds * fps) if job.max_seconds > 0 else -1
                for frame in iter_frames(inp, s):
                    if n_in == last_in:
                        break
                    if size is None:
                        size = target_size(frame.width, frame.height, job.short_side)
                        o.width, o.height = size
                    i, n_in = n_in, n_in + 1
                    if keep_every:
                        tick = int(i * job.fps_cap / fps)
                        if tick == last_tick:
                            continue
                        last_tick = tick
                    f = frame.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="AREA")
                    f.pts, f.time_base = n_out, o.codec_context.time_base or Fraction(1, 25)
                    # the source's picture type rides along and x264 obeys it (extra keyframes, no B-frames)
                    f.pict_type = PictureType.NONE
                    n_out += 1
                    for p in o.encode(f):
                        out.mux(p)
                for p in o.encode():
                    out.mux(p)
        if n_out == 0:
            raise ValueError("no frame decodes")
        # verify: every written frame decodes
        with av.open(tmp) as chk:
            got = sum(1 for _ in iter_frames(chk, chk.streams.video[0]))
        if got != n_out:
            raise ValueError(f"verification: {got} of {n_out} written frames decode")
        os.replace(tmp, job.dst)
        return {**rec, "status": "done", "frames": n_out, "frames_in": n_in, "cut": n_in == last_in,
                "bytes_out": os.path.getsize(job.dst),
                "size": list(size), "fps": out_fps}
    except Exception as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return {**rec, "status": "failed", "error": f"{type(e).__name__}: {e}"}


def _keep(job: Job, rec: dict) -> dict | None:
    """The source itself as the output when it is small already (None: it needs a re-encode)."""
    info = probe(job.src)
    if not info.ok or not is_small(info.width, info.height, info.fps, job.short_side, job.fps_cap):
        return None          # a bad file fails in the re-encode with its own message
    full = probe(job.src, full=True)      # the verification a re-encoded output gets: every frame decodes
    if not full.ok:
        return {**rec, "status": "failed", "error": f"{full.error}: {full.detail}"}
    return {**rec, "dst": job.src, "status": "kept", "frames": full.frames, "bytes_out": rec["bytes_in"],
            "size": [full.width, full.height], "fps": full.fps}
