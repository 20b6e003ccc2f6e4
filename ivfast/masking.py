"""Mask samplers: which tokens of a T x H x W grid the encoder sees.

Contract for every sampler: int32 ``ids_keep`` [B, K] and ``ids_mask`` [B, M], each row sorted
ascending, keep and mask disjoint and together covering all N = T*H*W ids, the same K and M in
every row of a batch (so batched kernels see rectangular tensors).

The CPU samplers (random tube, V-JEPA multi-block) run in C++ (``ivfast._C``, GIL released).
The NumPy functions below are their reference: the same algorithm and the same counter-based
PRNG (SplitMix64 finaliser over key + counter), so both agree bit for bit on any machine.
Keep ``csrc/masks.cpp`` and this file in step.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

try:   # the C++ samplers; a bare source tree (never pip-installed) has no built extension
    from ivfast import _C
except ImportError as _e:
    _C = None
    _C_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

if TYPE_CHECKING:
    from ivfast.config import MaskingConfig

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_STREAM_MUL = _U64(0xD1B54A32D192ED03)
_STREAM_ADD = _U64(0x632BE59BD9B4E019)
_BATCH_STREAM = (1 << 64) - 1
_TRIM_COUNTER = 1 << 32
_PRED_COUNTER = 2 << 32


# --------------------------------------------------------------------------- PRNG (NumPy twin)
def _mix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def stream_key(seed: int, stream: int) -> int:
    """Key of one independent stream of draws (a sample of the batch, or the batch itself)."""
    s = np.array([seed % (1 << 64)], dtype=_U64)
    st = np.array([stream % (1 << 64)], dtype=_U64)
    with np.errstate(over="ignore"):
        return int(_mix64(_mix64(s) ^ (st * _STREAM_MUL + _STREAM_ADD))[0])


def rand_u64(key: int, counters: np.ndarray) -> np.ndarray:
    """The draws for ``counters`` of the stream ``key`` (uint64)."""
    c = np.asarray(counters, dtype=_U64)
    with np.errstate(over="ignore"):
        return _mix64(_U64(key) + (c + _U64(1)) * _GOLDEN)


def uniform(key: int, counters: np.ndarray) -> np.ndarray:
    """Doubles in [0, 1), exact: the top 53 bits of each draw."""
    return (rand_u64(key, counters) >> _U64(11)).astype(np.float64) * 2.0**-53


def _randint(key: int, counter: int, lo: int, hi: int) -> int:
    return lo + int(uniform(key, [counter])[0] * float(hi - lo))


def _select(key: int, base: int, n: int, k: int) -> np.ndarray:
    """Boolean mask of k of n items by selection sampling (Knuth's algorithm S).

    Item j is taken with probability (k - taken) / (n - j): exactly k taken, every k-subset
    equally likely. Item j uses a 32-bit half of draw ``base + j // 2`` (the high half for even
    j) in the exact integer test ``u32 * (n - j) < (k - taken) << 32``, as the C++ does.
    Sequential by nature, so a Python loop here.
    """
    draws = rand_u64(key, np.arange(base, base + (n + 1) // 2, dtype=np.uint64))
    halves = np.stack([draws >> _U64(32), draws & _U64(0xFFFFFFFF)], axis=1).ravel()[:n].tolist()
    taken, out = 0, np.zeros(n, bool)
    for j in range(n):
        if halves[j] * (n - j) < (k - taken) << 32:
            out[j] = True
            taken += 1
    return out


def _check_grid(B: int, T: int, H: int, W: int) -> None:
    if min(B, T, H, W) <= 0:
        raise ValueError(f"batch size and grid T, H, W must all be positive, got B={B} T={T} H={H} W={W}")


# --------------------------------------------------------------------------- NumPy references
def tube_mask_reference(B: int, T: int, H: int, W: int, ratio: float, seed: int):
    """Random tube masking: int(ratio*H*W) spatial positions masked in every frame."""
    _check_grid(B, T, H, W)
    S = H * W
    Sm = int(ratio * S)
    Sk = S - Sm
    if not 0.0 < ratio < 1.0 or Sm == 0 or Sk == 0:
        raise ValueError(f"mask ratio {ratio} leaves no masked or no visible position per frame")
    keep = np.empty((B, T * Sk), np.int32)
    mask = np.empty((B, T * Sm), np.int32)
    frame_base = (np.arange(T, dtype=np.int64) * S)[:, None]
    for b in range(B):
        kept = _select(stream_key(seed, b), 0, S, Sk)
        keep[b] = (frame_base + np.flatnonzero(kept)).ravel()
        mask[b] = (frame_base + np.flatnonzero(~kept)).ravel()
    return keep, mask


def block_size(T: int, H: int, W: int, spatial: tuple, temporal: tuple, aspect: tuple, seed: int):
    """(t, h, w) of this batch's blocks: temporal scale, spatial scale and aspect ratio from three
    independent uniforms (V-JEPA's and the released jepa_mask.py's scheme, not I-JEPA's one draw)."""
    ut, us, ua = (float(v) for v in uniform(stream_key(seed, _BATCH_STREAM), np.arange(3, dtype=np.uint64)))
    t = max(1, int(T * (temporal[0] + ut * (temporal[1] - temporal[0]))))
    s_keep = int(H * W * (spatial[0] + us * (spatial[1] - spatial[0])))
    ar = aspect[0] + ua * (aspect[1] - aspect[0])
    h = min(H, max(1, round(math.sqrt(s_keep * ar))))   # round(): half to even, as nearbyint
    w = min(W, max(1, round(math.sqrt(s_keep / ar))))
    return min(T, t), h, w


def multiblock_mask_reference(B: int, T: int, H: int, W: int, num_blocks: int, spatial: tuple,
                              temporal: tuple, aspect: tuple, seed: int, max_keep: int = 0,
                              trim: str = "lowest", min_keep: int = 1, max_tries: int = 100):
    """V-JEPA multi-block masking, one mask set; rows cut to a common K (see ``multiblock_mask``)."""
    _check_grid(B, T, H, W)
    if trim not in ("random", "lowest"):
        raise ValueError("trim must be 'random' or 'lowest'")
    N = T * H * W
    t, h, w = block_size(T, H, W, spatial, temporal, aspect, seed)
    visible = []
    for b in range(B):
        key, c = stream_key(seed, b), 0
        for attempt in range(max_tries + 1):
            if attempt == max_tries:
                raise RuntimeError(f"multi-block masking left fewer than min_keep={min_keep} visible "
                                   f"tokens after {max_tries} tries; use smaller or fewer blocks")
            masked = np.zeros((T, H, W), bool)
            for _ in range(num_blocks):
                top = _randint(key, c, 0, H - h + 1)
                left = _randint(key, c + 1, 0, W - w + 1)
                start = _randint(key, c + 2, 0, T - t + 1)
                c += 3
                masked[start:start + t, top:top + h, left:left + w] = True
            vis = np.flatnonzero(~masked.ravel())
            if len(vis) >= min_keep:
                break
        visible.append(vis)
    K = min(len(v) for v in visible)
    if max_keep > 0:
        K = min(K, max_keep)
    P = N - max(len(v) for v in visible)
    keep = np.empty((B, K), np.int32)
    mask = np.empty((B, N - K), np.int32)
    pred = np.empty((B, P), np.int32)
    for b, vis in enumerate(visible):
        blocked = np.setdiff1d(np.arange(N), vis)
        if trim == "lowest" or len(vis) == K:
            chosen = vis[:K]
        else:
            chosen = vis[_select(stream_key(seed, b), _TRIM_COUNTER, len(vis), K)]
        if trim == "lowest" or len(blocked) == P:
            pred[b] = blocked[:P]
        else:
            pred[b] = blocked[_select(stream_key(seed, b), _PRED_COUNTER, len(blocked), P)]
        kept = np.zeros(N, bool)
        kept[chosen] = True
        keep[b] = np.flatnonzero(kept)
        mask[b] = np.flatnonzero(~kept)
    return keep, mask, pred


# --------------------------------------------------------------------------- fast samplers (C++)
_warned_no_C = False


def _native():
    """``ivfast._C``, or None (after one warning) when it is not built: callers then run the NumPy
    reference, which is bit-equal to it, only slower (about 10-100x; fine for a check, not for
    a long training run)."""
    global _warned_no_C
    if _C is None and not _warned_no_C:
        _warned_no_C = True
        import warnings
        warnings.warn(f"ivfast._C is not importable ({_C_IMPORT_ERROR}); mask sampling uses the NumPy "
                      f"reference (bit-equal, slower). Build it with "
                      f"`pip install --no-build-isolation --no-deps -e .`", RuntimeWarning, stacklevel=3)
    return _C


def tube_mask(B: int, T: int, H: int, W: int, ratio: float, seed: int, threads: int = 0):
    """Random tube masking (C++). Returns int32 (ids_keep [B, K], ids_mask [B, M]).

    ``threads`` = 0 picks a default (several threads for batches of 32 and more); the result
    does not depend on it.
    """
    C = _native()
    if C is None:
        return tube_mask_reference(B, T, H, W, float(ratio), seed % (1 << 64))
    return C.tube_mask(B, T, H, W, float(ratio), seed % (1 << 64), int(threads))


def multiblock_mask(B: int, T: int, H: int, W: int, num_blocks: int, spatial: tuple,
                    temporal: tuple = (1.0, 1.0), aspect: tuple = (0.75, 1.5), seed: int = 0,
                    max_keep: int = 0, trim: str = "lowest", min_keep: int = 1, max_tries: int = 100,
                    threads: int = 0, with_pred: bool = False):
    """V-JEPA multi-block masking, one mask set (C++).

    The block size is drawn once per batch, positions per sample; the union of the blocks is
    masked. Rows are cut to a common K (the batch minimum, capped by ``max_keep``): ``trim``
    "lowest" keeps the lowest ids (the default: V-JEPA's collator and the released code); ids
    run in (t, h, w) order, so the encoder sees early frames and the predictor predicts late ones
    from them, a forward-in-time task. "random" drops visible ids uniformly at random, spreading
    the context over every frame (an option to compare).
    Dropped visible ids join ``ids_mask``, so keep + mask cover every position (the predictor
    fills all of ``ids_mask`` with mask tokens). With ``with_pred`` a third array ``ids_pred``
    [B, P] holds the block-masked ids only, cut to the batch minimum the same way: the
    positions V-JEPA computes the loss on (``masking.predict=blocks``; the released code, and
    ivfast's default ``predict=unseen``, use all of ``ids_mask``).
    """
    C = _native()
    if C is None:
        keep, mask, pred = multiblock_mask_reference(B, T, H, W, int(num_blocks), tuple(spatial), tuple(temporal),
                                                     tuple(aspect), seed % (1 << 64), int(max_keep), trim,
                                                     int(min_keep), int(max_tries))
        return (keep, mask, pred) if with_pred else (keep, mask)
    keep, mask, pred = C.multiblock_mask(B, T, H, W, int(num_blocks), float(spatial[0]), float(spatial[1]),
                                          float(temporal[0]), float(temporal[1]), float(aspect[0]),
                                          float(aspect[1]), seed % (1 << 64), int(max_keep), trim,
                                          int(min_keep), int(max_tries), int(threads))
    return (keep, mask, pred) if with_pred else (keep, mask)


def multiblock_masks(cfg: "MaskingConfig", batch_size: int, T: int, H: int, W: int, seed: int,
                     with_pred: bool = False):
    """All mask sets of ``cfg.blocks`` for one batch: a list of (ids_keep, ids_mask[, ids_pred])."""
    out = []
    for i, spec in enumerate(cfg.blocks):
        set_seed = stream_key(seed, i)   # independent draws per mask set
        out.append(multiblock_mask(batch_size, T, H, W, spec.num_blocks, spec.spatial_scale,
                                   spec.temporal_scale, spec.aspect_ratio, set_seed,
                                   cfg.max_keep, cfg.trim, with_pred=with_pred))
    return out


# ---- semantic-aware masking (GPU, no host sync)
# Keeps the tokens the teacher attends to. Everything is sorts and elementwise maths on the
# scores' device with shapes known on the host: no .item(), no nonzero, no boolean indexing,
# so it never waits for the GPU.


def _descending_order(key: "torch.Tensor") -> "torch.Tensor":
    """Indices of ``key`` rows from largest to smallest; equal keys keep index order (lower first)."""
    return torch.sort(key, dim=1, descending=True, stable=True).indices


def semantic_mask(scores: "torch.Tensor", ratio: float, mode: str = "topk", random_fraction: float = 0.0,
                  generator: "torch.Generator | None" = None, frames: "int | None" = None):
    """Semantic-aware mask from per-token teacher attention ``scores`` [B, N] (N = T*H*W raster).

    ``mode``:
      - "topk": keep the K highest-scoring tokens (the paper's description); ties go to the
        lower token id, so the result is deterministic.
      - "sample": sample K tokens without replacement with probability proportional to the
        scores (the released code's ``torch.multinomial``), done as Gumbel-top-k: the top K
        of log(score) + Gumbel noise. Negative scores count as 0.
    ``frames``: select within each frame, as the released code does (the scores are viewed as
        [B, frames, N // frames]; each frame keeps n - int(ratio * n) of its n tokens), so
        K = frames * per-frame keep. ``None``: rank over the whole clip, K = N - int(ratio * N).
    ``random_fraction``: this share of the kept set (round(fraction * K), per frame if
        ``frames``) is drawn uniformly from the tokens not already chosen by the scores.
    ``generator``: a torch.Generator on the scores' device, for the random draws.

    Returns int32 ``(ids_keep [B, K], ids_mask [B, N - K])``, rows sorted ascending (the
    contract of every sampler in this module). NaN scores rank last.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N] (one score per token), got shape {tuple(scores.shape)}")
    if mode not in ("topk", "sample"):
        raise ValueError(f"mode must be 'topk' or 'sample', got {mode!r}")
    if not 0.0 <= random_fraction <= 1.0:
        raise ValueError(f"random_fraction must be in [0, 1], got {random_fraction}")
    B, N = scores.shape
    groups = 1
    if frames is not None:
        if frames <= 0 or N % frames:
            raise ValueError(f"frames={frames} must be positive and divide the {N} tokens per clip")
        groups = frames
    n = N // groups
    n_mask = int(ratio * n)
    n_keep = n - n_mask
    if n_mask <= 0 or n_keep <= 0:
        raise ValueError(f"mask ratio {ratio} over {n} tokens leaves no masked or no visible token")
    if generator is not None and generator.device != scores.device:
        raise ValueError(f"generator is on {generator.device} but scores are on {scores.device}; "
                         f"create it with torch.Generator(device=scores.device)")

    s = scores.detach().float().reshape(B * groups, n)
    key = torch.nan_to_num(s, nan=-float("inf"))

    def uniform():
        return torch.rand(s.shape, generator=generator, device=s.device, dtype=torch.float32)

    if mode == "sample":
        # Gumbel-top-k: the order of log(p) - log(-log(u)) is a draw of sampling without
        # replacement with probabilities p (tiny floor on u keeps the logs finite)
        u = uniform().clamp_min(torch.finfo(torch.float32).tiny)
        key = torch.log(key.clamp_min(0.0)) - torch.log(-torch.log(u))
    n_rand = int(round(random_fraction * n_keep))
    if n_rand > 0:
        # the first n_keep - n_rand of the score order stay (key 2 > any uniform draw); the
        # rest of the kept set goes to the largest uniform draws among the other tokens
        rank = torch.empty_like(s, dtype=torch.int64).scatter_(
            1, _descending_order(key), torch.arange(n, device=s.device).expand(B * groups, n).contiguous())
        key = torch.where(rank < n_keep - n_rand, torch.full_like(s, 2.0), uniform())
    order = _descending_order(key)
    keep = order[:, :n_keep].sort(dim=1).values
    mask = order[:, n_keep:].sort(dim=1).values
    if groups > 1:
        # frame-local ids -> clip ids; frames are in order, so rows stay sorted
        base = (torch.arange(groups, device=s.device) * n).repeat(B).unsqueeze(1)
        keep = (keep + base).reshape(B, groups * n_keep)
        mask = (mask + base).reshape(B, groups * n_mask)
    return keep.to(torch.int32), mask.to(torch.int32)
