"""Synthetic moving-pattern clips written with PyAV (demo runs, tests, benchmarks).

Each clip shows a coloured gradient background, moving stripes and a moving square, so
neighbouring frames differ and a wrong frame index shows up as a large pixel difference.
The top-left corner also carries the frame number as a row of black/white blocks
(:func:`read_frame_number` reads it back), which lets tests check that a decoder returned
exactly the frames that were asked for.

    python -m ivfast.data.synth OUT_DIR --num 32 --codec vp9 --frames 24 --size 96x80
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# codec name on the command line -> (PyAV encoder, container extension, pixel format, options)
CODECS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "vp9": ("libvpx-vp9", "webm", "yuv420p", {"deadline": "realtime", "cpu-used": "8"}),
    "vp8": ("libvpx", "webm", "yuv420p", {"deadline": "realtime", "cpu-used": "8"}),
    "h264": ("libx264", "mp4", "yuv420p", {"preset": "ultrafast"}),
    # Kinetics-like: B-frames (x264 'veryfast' uses 3, with a B-pyramid), as real uploads have
    "h264b": ("libx264", "mp4", "yuv420p", {"preset": "veryfast"}),
    "mjpeg": ("mjpeg", "avi", "yuvj420p", {}),
}

BITS = 10          # frame-number blocks: up to 1023 frames
BLOCK = 8          # block side in pixels (survives lossy coding at any quality we use)


def _frame(i: int, h: int, w: int, p: dict) -> np.ndarray:
    """Frame ``i`` of a clip with parameters ``p`` as an [h, w, 3] uint8 RGB image."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):  # slowly drifting background gradient
        img[..., c] = p["base"][c] + 60 * np.sin((xx * p["gx"][c] + yy * p["gy"][c]) / 40 + i * 0.05)
    phase = (xx * np.cos(p["angle"]) + yy * np.sin(p["angle"])) / p["period"] + i * p["speed"]
    img += 50 * (np.sin(2 * np.pi * phase) > 0)[..., None]          # moving stripes
    side = max(4, min(h, w) // 4)                                    # moving square
    x0 = int((p["x0"] + i * p["vx"]) % max(1, w - side))
    y0 = int((p["y0"] + i * p["vy"]) % max(1, h - side))
    img[y0:y0 + side, x0:x0 + side] = p["square"]
    img = np.clip(img, 0, 255).astype(np.uint8)
    if w >= BITS * BLOCK and h >= 2 * BLOCK:                         # frame number stamp
        for b in range(BITS):
            img[:BLOCK, b * BLOCK:(b + 1) * BLOCK] = 255 if (i >> b) & 1 else 0
    return img


def read_frame_number(frame: np.ndarray) -> int:
    """Read back the frame number stamped by :func:`make_videos` from a decoded [H, W, 3] frame."""
    h, w = frame.shape[:2]
    if w < BITS * BLOCK or h < 2 * BLOCK:
        raise ValueError(f"frame of {w}x{h} px is too small to carry a frame number "
                         f"(needs at least {BITS * BLOCK}x{2 * BLOCK})")
    n = 0
    for b in range(BITS):
        block = frame[2:BLOCK - 2, b * BLOCK + 2:(b + 1) * BLOCK - 2].astype(np.float32)
        n |= int(block.mean() > 127) << b
    return n


def write_video(path: str | Path, frames: np.ndarray, codec: str = "vp9", fps: int = 25, gop: int = 0) -> Path:
    """Encode ``frames`` ([T, H, W, 3] uint8 RGB; H and W even) to ``path`` with PyAV.

    ``gop``: keyframe interval (0 = the encoder's default)."""
    import av

    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not supported here; choose one of {sorted(CODECS)}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be a [T, H, W, 3] uint8 array, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size {w}x{h}: width and height must be even for 4:2:0 video")
    enc, _, pix_fmt, options = CODECS[codec]
    path = Path(path)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(enc, rate=fps, options=dict(options))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if gop:
            stream.gop_size = gop
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def remux(src: str | Path, dst: str | Path, shift_frames: int = 0, faststart: bool = False) -> Path:
    """Copy the video packets of ``src`` into ``dst`` (MP4) without re-encoding.

    ``shift_frames`` > 0 moves every timestamp that many frames below zero: the muxer then
    writes an edit list that hides those frames, so the container lists more frames than
    decode (the common real-world 'listed 456, 455 decode'). ``faststart`` puts the sample
    table first, so a copy cut short still opens and lists every frame (a cut download)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        s = inp.streams.video[0]
        o = out.add_stream_from_template(s)
        for pkt in inp.demux(s):
            if not pkt.size:
                continue
            if shift_frames and pkt.duration:
                pkt.pts -= shift_frames * pkt.duration
                pkt.dts -= shift_frames * pkt.duration
            pkt.stream = o
            out.mux(pkt)
    return Path(dst)


def overstated(src: str | Path, dst: str | Path, hidden: int = 3) -> Path:
    """An MP4 whose container lists ``hidden`` more frames than decode (edit list); decoded
    frame k carries the stamp k + ``hidden``."""
    return remux(src, dst, shift_frames=hidden)


def cut_mid_gop(src: str | Path, dst: str | Path, keep: float = 0.6) -> Path:
    """An MP4 (sample table first) cut to ``keep`` of its bytes: the container lists every
    frame, the last packet is partial, decoding ends inside a GOP."""
    tmp = Path(str(dst) + ".full.mp4")
    remux(src, tmp, faststart=True)
    data = tmp.read_bytes()
    tmp.unlink()
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return Path(dst)


def make_videos(out_dir: str | Path, num: int, codec: str = "vp9", frames: int = 24,
                size: tuple[int, int] = (96, 80), fps: int = 25, seed: int = 0,
                prefix: str = "clip", gop: int = 0) -> list[Path]:
    """Write ``num`` moving-pattern clips of ``frames`` frames at ``size`` = (width, height).

    Files are named ``{prefix}_{i:05d}_{codec}.{ext}``; the same seed gives the same pixels.
    Returns the paths in order.
    """
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not supported here; choose one of {sorted(CODECS)}")
    w, h = int(size[0]), int(size[1])
    if num < 0 or frames < 1 or w < 2 or h < 2:
        raise ValueError(f"need num >= 0, frames >= 1 and a size of at least 2x2; got num={num}, "
                         f"frames={frames}, size={size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ext = CODECS[codec][1]
    paths = []
    for k in range(num):
        rng = np.random.default_rng([seed, k])
        p = {
            "base": rng.uniform(60, 190, 3), "gx": rng.uniform(-1, 1, 3), "gy": rng.uniform(-1, 1, 3),
            "angle": rng.uniform(0, np.pi), "period": rng.uniform(8, 24), "speed": rng.uniform(0.05, 0.2),
            "x0": rng.uniform(0, w), "y0": rng.uniform(0, h), "vx": rng.uniform(1, 4), "vy": rng.uniform(-3, 3),
            "square": rng.uniform(0, 255, 3),
        }
        clip = np.stack([_frame(i, h, w, p) for i in range(frames)])
        paths.append(write_video(out_dir / f"{prefix}_{k:05d}_{codec}.{ext}", clip, codec, fps, gop))
    return paths


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT (e.g. 96x80), got {text!r}")
    return w, h


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ivfast.data.synth", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--codec", choices=sorted(CODECS), default="vp9")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--size", type=_parse_size, default=(96, 80), help="WIDTHxHEIGHT, even numbers")
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gop", type=int, default=0, help="keyframe interval (0 = encoder default)")
    ap.add_argument("--list", default="", help="also write a CSV list (path) of the clips here")
    args = ap.parse_args(argv)
    paths = make_videos(args.out_dir, args.num, args.codec, args.frames, args.size, args.fps, args.seed,
                        gop=args.gop)
    if args.list:
        Path(args.list).write_text("path\n" + "".join(f"{p}\n" for p in paths))
    print(f"wrote {len(paths)} {args.codec} clips of {args.frames} frames at "
          f"{args.size[0]}x{args.size[1]} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
