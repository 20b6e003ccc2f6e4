"""CPU decoding with PyAV, and the crop/resize/flip that matches the DALI graph.

Used in DataLoader workers when DALI is missing, cannot decode a file's codec, or the
config asks for it, and as the reference the DALI path is tested against.
"""
from __future__ import annotations

import threading
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from .sampling import ClipPlan
from .sources import iter_frames, open_video

if TYPE_CHECKING:
    import torch


class BadSample(Exception):
    """A file failed while decoding; ``reason`` is one of ``index.BAD_REASONS``.

    ``decoded``: for 'truncated', how many frames the stream gave before it ended (its real
    length when decoding started at frame 0), so the loader can clamp the video's length.
    """

    def __init__(self, reason: str, path: str, detail: str, decoded: int = -1):
        super().__init__(f"{reason}: {path}: {detail}")
        self.reason, self.path, self.detail, self.decoded = reason, path, detail, decoded


SEEK_GAP = 120     # frames: a longer jump forward seeks to a keyframe (when the GOP is unknown)
SEEK_MARGIN = 1    # with a known GOP: seek when the keyframe before the target is this far ahead
                   # (a seek costs less than one decoded frame: on all-intra prepared files at
                   # T=32, margin 8 -> 1 took 17 -> 30 clips per CPU-second)
SKIP_MARGIN = 16   # skip non-reference frames only while the next sample is this far ahead
                   # (more than any B-frame reorder distance, so a wanted frame is never skipped)
# Containers whose timestamps come from a per-file sample table (one timeline for the whole
# file): there, numbering frames by timestamp after a seek or a skip is safe. Not MPEG-TS /
# PS and other streams, whose timestamps can restart (concatenated segments).
TIMED_FORMATS = ("mov", "mp4", "m4a", "3gp", "matroska", "webm", "avi")


def decode_frames(path: str, indices, threads: int = 1, seek_gap: int = SEEK_GAP,
                  skip_nonref: bool = True, crop: tuple[int, int, int, int] | None = None,
                  rgb: str = "exact") -> np.ndarray:
    """Decode the frames at ``indices`` (display order, repeats allowed) -> [T, H, W, 3] uint8 RGB.

    ``crop`` (x, y, w, h): return only that region, [T, h, w, 3], the same pixels as slicing
    the full frames, but only the region (and a small margin) is converted to RGB.
    ``rgb``: "exact" converts as DALI does (bit-identical), "fast" with swscale's default path
    (see :func:`to_rgb`).

    Frame k is the k-th frame the decoder outputs, as in the index's frame count and DALI's
    ``frames`` argument. The work between samples is cut three ways, none of which changes
    the result:

    * seeking: once two keyframes have been seen (a regular GOP), a target whose preceding
      keyframe lies more than ``SEEK_MARGIN`` frames ahead is reached by seeking to that
      keyframe; without a known GOP, a jump of more than ``seek_gap`` frames seeks;
    * ``skip_nonref``: while the next sample is more than ``SKIP_MARGIN`` frames ahead the
      decoder skips non-reference frames (FFmpeg ``skip_frame=NONREF``: no later frame
      depends on them);
    * RGB conversion only for the sampled frames, single-threaded (PyAV >= 18 starts a
      thread pool per call otherwise).

    After a seek or a skip, frames are numbered by timestamp (k = (pts - pts0) x fps), which
    is checked against the sequential count while decoding from the start. Any sign that the
    timestamps cannot be trusted (missing pts, a seek past the target, a target number that
    never appears) restarts with plain sequential decoding, so the result is always the
    sequential numbering. Raises :class:`BadSample` ('truncated' when the stream ends early,
    with ``decoded`` = the frames it gave; 'decode_error' on a corrupt payload inside the
    stream or frames whose size changes mid-stream; 'unreadable' when the container cannot
    be opened).
    """
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or idx.size == 0 or idx.min() < 0:
        raise ValueError(f"indices must be a non-empty 1-D list of frame numbers >= 0, got {idx}")
    wanted = [int(w) for w in np.unique(idx)]
    wanted_set = set(wanted)
    if rgb not in RGB_MODES:
        raise ValueError(f"rgb must be one of {RGB_MODES}, got {rgb!r}")
    convert = CropConverter(crop, rgb) if crop is not None else (lambda f: to_rgb(f, rgb))
    got: dict[int, np.ndarray] = {}
    try:
        container = open_video(path)     # a path, or a tar shard member
    except Exception as e:
        raise BadSample("unreadable", path, f"{type(e).__name__}: {e}") from e
    with container:
        if not container.streams.video:
            raise BadSample("no_video_stream", path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if threads > 1 else "SLICE"
        stream.thread_count = max(1, threads)
        rate = stream.average_rate or stream.guessed_rate
        tb = stream.time_base
        fmt = set((container.format.name or "").split(","))
        timed = bool(rate) and bool(tb) and bool(fmt & set(TIMED_FORMATS))
        spf = float(tb) * float(rate) if timed else 0.0     # timestamp units -> frame numbers
        can_seek = seek_gap > 0 and timed
        st = {"k": -1, "w": wanted[0], "regular": timed, "by_pts": False, "from_start": True}
        pts0 = None                 # timestamp of frame 0 (from a decode that started at the beginning)
        keys: list[int] = []        # numbers of the keyframes seen while decoding from the start

        def skip_now() -> bool:     # asked by iter_frames before each packet
            # k == -1 right after a seek: the position is unknown until the first frame, and
            # skipping there would drop a wanted B-frame just after the keyframe (a restart)
            on = (skip_nonref and st["regular"] and pts0 is not None and st["k"] >= 0
                  and st["w"] - st["k"] > SKIP_MARGIN)
            if on:
                st["by_pts"] = True
            return on

        def should_seek(w: int, k: int) -> bool:
            if not (can_seek and pts0 is not None and st["regular"]):
                return False
            gop = keys[1] - keys[0] if len(keys) >= 2 else 0
            return (w // gop) * gop - k > SEEK_MARGIN if gop else w - k > seek_gap

        frames_iter = iter_frames(container, stream, skip_now)
        try:
            for w in wanted:
                st["w"] = w
                k = st["k"]
                if w <= k:
                    continue
                if should_seek(w, k):
                    container.seek(int(pts0 + (w / float(rate)) / float(tb)), stream=stream, backward=True)
                    frames_iter = iter_frames(container, stream, skip_now)
                    st["by_pts"], st["from_start"], st["k"], k = True, False, -1, -1
                while k < w:
                    frame = next(frames_iter, None)
                    if frame is None:
                        break
                    if pts0 is None:
                        pts0 = frame.pts
                        if pts0 is None:
                            st["regular"] = False
                    n = int(round((frame.pts - pts0) * spf)) if (frame.pts is not None and pts0 is not None and timed) else None
                    if st["by_pts"]:
                        if n is None or n <= k and k >= 0:
                            raise _Restart              # no timestamp, or not increasing
                        if k == -1 and n > w:           # the seek overshot the target
                            raise _Restart
                        k = n
                    else:
                        k += 1
                        if n != k:                      # timestamps disagree with the count
                            st["regular"] = False
                    if frame.key_frame and st["from_start"] and st["regular"] and len(keys) < 2:
                        keys.append(k)
                        if len(keys) == 2 and k not in wanted_set and should_seek(w, k):
                            # the GOP just became known and the target is GOPs away: seek now
                            container.seek(int(pts0 + (w / float(rate)) / float(tb)), stream=stream,
                                           backward=True)
                            frames_iter = iter_frames(container, stream, skip_now)
                            st["by_pts"], st["from_start"], st["k"], k = True, False, -1, -1
                            continue
                    st["k"] = k
                    if k in got or k not in wanted_set:
                        continue
                    got[k] = convert(frame)
                if w not in got:
                    if st["by_pts"] and k > w:          # skipped or timestamps jumped this number
                        raise _Restart
                    break                               # the stream ended first
        except _Restart:
            return decode_frames(path, indices, threads, seek_gap=0, skip_nonref=False, crop=crop, rgb=rgb)
        except Exception as e:
            raise BadSample("decode_error", path, f"near frame {st['k']}: {type(e).__name__}: {e}") from e
    missing = [w for w in wanted if w not in got]
    if missing:
        raise BadSample("truncated", path, f"stream ended after frame {st['k']}; frames {missing[:4]} were asked for",
                        decoded=st["k"] + 1)
    shapes = sorted({got[w].shape for w in wanted})
    if len(shapes) > 1:      # e.g. segments of different resolutions concatenated into one stream
        raise BadSample("decode_error", path, f"the frame size changes within the stream: {shapes}")
    return np.stack([got[int(i)] for i in idx])


# swscale with full-resolution chroma interpolation and accurate rounding: the conversion DALI's
# decoder applies (bit-identical on VP9/MJPEG in tests/test_data_dali.py). swscale's default
# yuv420p -> rgb24 path upsamples chroma differently: 31-42 dB PSNR against DALI on sharp
# coloured edges (max |diff| up to 166). Both BT.601 (limited range; full range for yuvj).
# Cost on one core: ~0.5 ms per 340x256 frame, against ~0.05 ms for the default path.
_RGB_FLAGS = None


RGB_MODES = ("exact", "fast")


def to_rgb(frame, rgb: str = "exact") -> np.ndarray:
    """A decoded frame -> [H, W, 3] uint8 RGB, converted as DALI converts (see above).

    ``rgb="fast"``: swscale's default (SIMD) path instead, 2.5-16x cheaper per frame but
    ~44 dB PSNR against the exact conversion on sharp coloured edges (max |diff| up to ~70),
    so a run's pixels then depend on the backend (``data.rgb``).

    Single-threaded swscale: PyAV >= 18 otherwise starts a thread pool per call (one thread
    per visible CPU), which costs milliseconds per frame when the cores are busy."""
    global _RGB_FLAGS
    if _RGB_FLAGS is None:
        from av.video.reformatter import Interpolation as I

        _RGB_FLAGS = I.BILINEAR | I.FULL_CHR_H_INT | I.ACCURATE_RND
    flags = _RGB_FLAGS if rgb == "exact" else "BILINEAR"
    return frame.reformat(format="rgb24", interpolation=flags, threads=1).to_ndarray(threads=1)


CROP_MARGIN = 2    # pixels of context kept around a crop for the chroma interpolation (1 suffices)
MIN_BOX = (64, 16)   # smallest box converted (narrower boxes, < ~40 px, were seen off by 1)
_BOX_FORMATS = ("yuv420p", "yuvj420p")   # where the box conversion is tested bit-exact


class CropConverter:
    """RGB of one crop region (x, y, w, h) of each frame: [h, w, 3] uint8, the same pixels as
    ``to_rgb(frame)[y:y + h, x:x + w]``, but only a box around the crop is converted.

    At the training crop scales (0.66-1.0 of the short side) that is 1.5-3x less swscale
    work. The box goes through libavfilter's ``crop`` (a view of the decoded frame: no copy,
    and the frame's colour properties, chroma siting included, stay; a frame rebuilt from
    NumPy planes loses the siting and converts differently). Its corner is on even pixels and
    it keeps ``CROP_MARGIN`` pixels of context, so every crop pixel is bit-identical to a
    full-frame conversion (tests/test_data_decode.py). Other pixel formats convert the whole
    frame and slice it.
    """

    def __init__(self, crop: tuple[int, int, int, int], rgb: str = "exact"):
        self.crop = tuple(int(v) for v in crop)
        self.rgb = rgb
        self._key = None          # (W, H, fmt) the box below was placed for
        self._box = self._inner = None

    def __call__(self, frame) -> np.ndarray:
        x, y, w, h = self.crop
        W, H = frame.width, frame.height
        if x < 0 or y < 0 or w < 1 or h < 1 or x + w > W or y + h > H:
            raise ValueError(f"crop {self.crop} lies outside the {W}x{H} frame "
                             "(the index's frame size is stale: rebuild the index cache)")
        fmt = frame.format.name
        if fmt not in _BOX_FORMATS or (w * h) * 10 > W * H * 9:      # ~whole frame: no gain
            return to_rgb(frame, self.rgb)[y:y + h, x:x + w]
        if self._key != (W, H, fmt):
            self._build(W, H, fmt)
        graph = _crop_graph(W, H, fmt, self._box)      # shared per thread: (re-)aimed at this box
        try:
            graph.push(frame)
            box = graph.pull()
        except Exception:
            _GRAPHS.cache.pop(self._key, None)     # never reuse a graph that may hold a frame
            self._key = None
            raise
        bx, by = self._inner
        return to_rgb(box, self.rgb)[by:by + h, bx:bx + w]

    def _build(self, W: int, H: int, fmt: str) -> None:
        """Place the box converted for this crop in W x H frames."""
        x, y, w, h = self.crop
        # tiny boxes take other swscale code paths, which round differently: keep a minimum size
        ex, ey = max(CROP_MARGIN, (MIN_BOX[0] - w + 1) // 2), max(CROP_MARGIN, (MIN_BOX[1] - h + 1) // 2)
        x0, y0 = max(0, x - ex) & ~1, max(0, y - ey) & ~1
        x1, y1 = min(W, x + w + ex), min(H, y + h + ey)
        x1, y1 = min(W, x1 + (x1 - x0) % 2), min(H, y1 + (y1 - y0) % 2)    # even sizes inside the frame
        self._box = (x0, y0, x1 - x0, y1 - y0)
        self._key, self._inner = (W, H, fmt), (x - x0, y - y0)


_GRAPHS = threading.local()      # per thread: {(W, H, fmt): [graph, crop filter, box]}


def _crop_graph(W: int, H: int, fmt: str, box: tuple[int, int, int, int]):
    """A configured buffer -> crop -> sink graph for W x H ``fmt`` frames, cropping ``box``.

    Built once per frame size and thread (building costs ~0.7-4 ms, as much as decoding a few
    frames) and re-aimed per clip with the crop filter's runtime commands."""
    import av

    cache = getattr(_GRAPHS, "cache", None)
    if cache is None:
        cache = _GRAPHS.cache = {}
    ent = cache.get((W, H, fmt))
    if ent is None:
        x0, y0, bw, bh = box
        g = av.filter.Graph()
        src = g.add_buffer(width=W, height=H, format=fmt, time_base=Fraction(1, 1000))
        crop = g.add("crop", f"w={bw}:h={bh}:x={x0}:y={y0}:exact=1")
        sink = g.add("buffersink")
        src.link_to(crop)
        crop.link_to(sink)
        g.configure()
        if len(cache) > 16:
            cache.clear()
        ent = cache[(W, H, fmt)] = [g, crop, box]
    elif ent[2] != box:
        x0, y0, bw, bh = box
        for key, val in (("w", bw), ("h", bh), ("x", x0), ("y", y0)):
            ent[1].process_command(key, str(val))
        ent[2] = box
    return ent[0]


class _Restart(Exception):
    """Timestamps cannot be trusted for this file: decode it from the start."""


def crop_resize(frames: "np.ndarray | torch.Tensor", plan: ClipPlan, size: int) -> "torch.Tensor":
    """[T, H, W, 3] uint8 frames -> [3, T, size, size] uint8: crop, bilinear resize, flip.

    Bilinear with antialiasing when shrinking, rounded to uint8: the same operations the DALI
    graph applies (``fn.resize`` with a region of interest, linear, antialias on).
    """
    cx, cy, cw, ch = plan.crop
    return resize_flip(frames[:, cy:cy + ch, cx:cx + cw], plan, size)


def resize_flip(frames: "np.ndarray | torch.Tensor", plan: ClipPlan, size: int) -> "torch.Tensor":
    """Already-cropped [T, h, w, 3] uint8 frames (``decode_frames(..., crop=plan.crop)``) ->
    [3, T, size, size] uint8: the resize and flip of :func:`crop_resize`."""
    import torch   # here, so that importing the decoder does not import torch
    import torch.nn.functional as F

    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"frames must be [T, H, W, 3] uint8, got {tuple(x.shape)} {x.dtype}")
    ch, cw = x.shape[1], x.shape[2]
    x = x.permute(0, 3, 1, 2)                                      # T, 3, h, w (channels-last memory)
    if (ch, cw) != (size, size):
        # uint8 in, uint8 out: torch's channels-last uint8 bilinear kernel is ~10x faster on one
        # core than resizing in float, and differs from the float path by rounding only (<= 1)
        x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=ch > size or cw > size)
    if plan.flip:
        x = x.flip(-1)
    return x.permute(1, 0, 2, 3).contiguous()
