"""NVIDIA DALI decoding: file bytes, frame indices and crops in through ``external_source``,
decode (``fn.decoders.video``), crop+resize, flip, normalise and layout all in the DALI graph.

Device "mixed" decodes on the GPU (NVDEC: H.264, HEVC, AV1, MPEG-4, VP8, VP9, MJPEG);
device "cpu" uses FFmpeg inside DALI and only handles VP8, VP9 and MJPEG (anything else
fails or may come back wrong), so :func:`dali_codecs` tells the loader which files to route
here; the rest go to PyAV. A DALI error invalidates the pipeline: :class:`DaliClipDecoder`
rebuilds it and reports the batch as failed so the caller can decode it another way.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from .sampling import ClipPlan

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# codec names as PyAV/FFmpeg report them (VideoInfo.codec)
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS = frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4"})


@functools.lru_cache(maxsize=1)
def dali_status() -> tuple[bool, str]:
    """(importable, why not). Importing DALI is done once and only when asked."""
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali import fn
        if not hasattr(fn, "decoders") or not hasattr(fn.decoders, "video"):
            return False, f"nvidia-dali {nvidia.dali.__version__} has no fn.decoders.video (need >= 1.40)"
        return True, ""
    except Exception as e:  # ImportError, or a broken CUDA library underneath
        return False, f"nvidia-dali is not importable ({type(e).__name__}: {e}); install ivfast[dali-cuda12]"


def dali_codecs(gpu: bool) -> frozenset[str]:
    return DALI_GPU_CODECS if gpu else DALI_CPU_CODECS


class DaliError(RuntimeError):
    pass


class DaliClipDecoder:
    """One DALI pipeline decoding batches of (file, ClipPlan) into [n, 3, T, S, S] tensors.

    ``device_id`` None runs the CPU backend; an int runs "mixed" (GPU decode) on that GPU.
    ``output`` 'uint8' keeps bytes; 'normalized' applies ImageNet mean/std in the graph and
    returns float32 (or float16 when ``half``).
    """

    def __init__(self, max_batch: int, num_frames: int, size: int, device_id: int | None = None,
                 num_threads: int = 2, output: str = "uint8", half: bool = False, seed: int = 0):
        ok, why = dali_status()
        if not ok:
            raise DaliError(why)
        self.max_batch, self.num_frames, self.size = max_batch, num_frames, size
        self.device_id, self.num_threads, self.output, self.half, self.seed = (
            device_id, num_threads, output, half, seed)
        self.codecs = dali_codecs(device_id is not None)
        self.rebuilds = 0
        self._pipe = self._build()

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device_id is not None
        size, normalized = self.size, self.output == "normalized"

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads, device_id=self.device_id,
                      seed=self.seed, exec_dynamic=True, prefetch_queue_depth=1)
        def clip_pipeline():
            enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            # pad_mode "none": an index past the end must fail, not come back as black frames
            video = fn.decoders.video(enc, device="mixed" if gpu else "cpu", frames=frames,
                                      pad_mode="none")  # F,H,W,C
            # crop + resize in one op: the ROI is the crop, in (y, x) source pixels
            video = fn.resize(video, roi_start=roi_start, roi_end=roi_end, size=[size, size],
                              interp_type=types.INTERP_LINEAR, antialias=True)
            if normalized:
                mean = [255.0 * m for m in IMAGENET_MEAN]
                std = [255.0 * s for s in IMAGENET_STD]
                dtype = types.FLOAT16 if self.half else types.FLOAT
            else:
                mean, std, dtype = [0.0], [1.0], types.UINT8
            return fn.crop_mirror_normalize(video, mirror=mirror, mean=mean, std=std, dtype=dtype,
                                            output_layout="CFHW")

        pipe = clip_pipeline()
        pipe.build()
        return pipe

    def decode(self, data: Sequence[np.ndarray], plans: Sequence[ClipPlan]) -> torch.Tensor:
        """Decode one batch. ``data`` holds each file's bytes as a uint8 array.

        Raises :class:`DaliError` on any DALI failure (the pipeline is rebuilt first, so the
        decoder stays usable).
        """
        n = len(plans)
        if not 0 < n <= self.max_batch or len(data) != n:
            raise ValueError(f"a DALI batch needs 1..{self.max_batch} samples with one file each, "
                             f"got {n} plans and {len(data)} files")
        for p in plans:
            if len(p.frames) != self.num_frames:
                raise ValueError(f"every plan needs {self.num_frames} frames, got {len(p.frames)}")
        pipe = self._pipe
        try:
            pipe.feed_input("encoded", list(data))
            pipe.feed_input("frames", [np.asarray(p.frames, np.int32) for p in plans])
            pipe.feed_input("roi_start", [np.array([p.crop[1], p.crop[0]], np.float32) for p in plans])
            pipe.feed_input("roi_end", [np.array([p.crop[1] + p.crop[3], p.crop[0] + p.crop[2]], np.float32)
                                        for p in plans])
            pipe.feed_input("mirror", [np.array(int(p.flip), np.int32) for p in plans])
            (out,) = pipe.run()
            return self._to_torch(out)
        except Exception as e:
            # DALI marks the pipeline invalid after an error: start a fresh one.
            self.rebuilds += 1
            del pipe, self._pipe
            self._pipe = self._build()
            raise DaliError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

    def _to_torch(self, out) -> torch.Tensor:
        tensor = out.as_tensor()
        if self.device_id is None:
            return torch.from_numpy(np.array(tensor))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dtype = {"uint8": torch.uint8}.get(self.output, torch.float16 if self.half else torch.float32)
        dst = torch.empty(tensor.shape(), dtype=dtype, device=torch.device("cuda", self.device_id))
        feed_ndarray(tensor, dst, cuda_stream=torch.cuda.current_stream(dst.device))
        return dst
