"""C++ mask samplers: bit-for-bit agreement with the NumPy reference, and the mask contract."""
import threading

import numpy as np
import pytest

from ivfast import _C, masking
from ivfast.config import load_config

GRIDS = [(1, 1, 2), (2, 3, 3), (3, 5, 7), (4, 8, 8), (16, 16, 16), (5, 14, 9)]
BLOCK_SETS = [(8, (0.15, 0.15), (1.0, 1.0)), (2, (0.7, 0.7), (1.0, 1.0)), (3, (0.1, 0.3), (0.5, 1.0))]


def check_contract(keep, mask, B, N):
    assert keep.dtype == np.int32 and mask.dtype == np.int32
    assert keep.shape[0] == mask.shape[0] == B
    assert keep.shape[1] + mask.shape[1] == N
    for k, m in zip(keep, mask):
        assert np.all(np.diff(k) > 0) and np.all(np.diff(m) > 0), "rows must be sorted and unique"
        both = np.concatenate([k, m])
        assert np.array_equal(np.sort(both), np.arange(N)), "keep + mask must cover every id once"


def test_extension_imports():
    assert callable(_C.tube_mask) and callable(_C.multiblock_mask)


def test_prng_twins_agree():
    counters = np.arange(0, 1000, 7, dtype=np.uint64)
    for seed in (0, 1, 2**63 + 5, 2**64 - 1):
        key = masking.stream_key(seed, 3)
        assert key == _C.stream_key(seed, 3)
        ref = masking.rand_u64(key, counters)
        assert [int(x) for x in ref] == [_C.splitmix_u64(key, int(c)) for c in counters]


@pytest.mark.parametrize("grid", [g for g in GRIDS if g[1] * g[2] > 1])
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_tube_matches_reference(grid, ratio):
    T, H, W = grid
    S = H * W
    if int(ratio * S) in (0, S):
        pytest.skip("ratio leaves an empty side on this tiny grid")
    for seed in range(25):
        keep, mask = masking.tube_mask(4, T, H, W, ratio, seed)
        rk, rm = masking.tube_mask_reference(4, T, H, W, ratio, seed)
        assert np.array_equal(keep, rk) and np.array_equal(mask, rm), f"seed {seed}"
        check_contract(keep, mask, 4, T * S)
        assert mask.shape[1] == T * int(ratio * S)


def test_tube_is_a_tube():
    T, H, W = 6, 7, 9
    keep, _ = masking.tube_mask(3, T, H, W, 0.75, 11)
    for row in keep:
        per_frame = row.reshape(T, -1) - (np.arange(T) * H * W)[:, None]
        assert (per_frame == per_frame[0]).all(), "the same spatial set must be kept in every frame"


def test_tube_seeds_differ_and_repeat():
    a = masking.tube_mask(2, 4, 8, 8, 0.75, 1)[0]
    assert np.array_equal(a, masking.tube_mask(2, 4, 8, 8, 0.75, 1)[0])
    assert not np.array_equal(a, masking.tube_mask(2, 4, 8, 8, 0.75, 2)[0])
    assert not np.array_equal(a[0], a[1]), "samples of a batch must get different masks"


@pytest.mark.parametrize("grid", [g for g in GRIDS if g[1] >= 3])
@pytest.mark.parametrize("blocks", BLOCK_SETS)
@pytest.mark.parametrize("trim", ["random", "lowest"])
def test_multiblock_matches_reference(grid, blocks, trim):
    T, H, W = grid
    nb, spatial, temporal = blocks
    for seed in range(12):
        max_keep = 0 if seed % 3 else 2 * H
        args = (5, T, H, W, nb, spatial, temporal, (0.75, 1.5), seed, max_keep, trim)
        keep, mask, pred = masking.multiblock_mask(*args, with_pred=True)
        rk, rm, rp = masking.multiblock_mask_reference(*args)
        assert np.array_equal(keep, rk) and np.array_equal(mask, rm), f"seed {seed}"
        assert np.array_equal(pred, rp), f"seed {seed}: prediction sets differ"
        check_contract(keep, mask, 5, T * H * W)
        for p_row, m_row in zip(pred, mask):
            assert np.all(np.diff(p_row) > 0) and np.isin(p_row, m_row).all(), "pred must be sorted, inside mask"
        if max_keep:
            assert keep.shape[1] <= max_keep


def test_multiblock_geometry():
    """Without trimming pressure, the masked set of a sample is a union of t x h x w boxes."""
    T, H, W = 8, 16, 16
    t, h, w = masking.block_size(T, H, W, (0.15, 0.15), (1.0, 1.0), (0.75, 1.5), seed=3)
    assert t == T, "blocks span the whole clip in time by default"
    assert abs(h * w - 0.15 * H * W) <= max(h, w) + 1
    keep, mask = masking.multiblock_mask(1, T, H, W, 1, (0.15, 0.15), seed=3)
    vol = np.zeros(T * H * W, bool)
    vol[mask[0]] = True
    vol = vol.reshape(T, H, W)
    assert (vol == vol[0]).all(), "the same spatial mask on every frame"
    hs, ws = np.nonzero(vol[0])
    assert hs.max() - hs.min() + 1 == h and ws.max() - ws.min() + 1 == w and vol[0].sum() == h * w


def test_multiblock_trim_lowest_keeps_early_frames():
    """trim=lowest (the default, as released) keeps early frames' context; random spreads it."""
    T, H, W = 16, 16, 16
    kw = dict(num_blocks=8, spatial=(0.15, 0.15), seed=4, max_keep=300)
    low, _ = masking.multiblock_mask(8, T, H, W, trim="lowest", **kw)
    rnd, _ = masking.multiblock_mask(8, T, H, W, trim="random", **kw)
    frames_low = np.unique(low // (H * W)).size
    frames_rnd = np.unique(rnd // (H * W)).size
    assert frames_rnd == T and frames_low < T
    default, _ = masking.multiblock_mask(8, T, H, W, **kw)
    assert np.array_equal(default, low)


def test_prediction_set_is_the_blocks_only():
    """ids_pred holds block-masked ids only: dropped visible ids are filled but never predicted."""
    T, H, W = 4, 16, 16
    kw = dict(num_blocks=2, spatial=(0.15, 0.15), seed=8, max_keep=50)
    keep, mask, pred = masking.multiblock_mask(6, T, H, W, with_pred=True, **kw)
    # with max_keep only the visible set is cut: the block-masked set is the same as without it
    _, _, pred_uncapped = masking.multiblock_mask(6, T, H, W, with_pred=True, **dict(kw, max_keep=0))
    assert np.array_equal(pred, pred_uncapped)
    assert mask.shape[1] > pred.shape[1], "dropped visible ids are in ids_mask, not in ids_pred"
    for b in range(6):
        assert not np.isin(pred[b], keep[b]).any(), "a predicted id is visible"


def test_multiblock_masks_from_config():
    cfg = load_config("stage2_vitb").masking
    sets = masking.multiblock_masks(cfg, 4, 32, 16, 16, seed=9)
    assert len(sets) == 2
    for keep, mask in sets:
        check_contract(keep, mask, 4, 32 * 256)
        assert keep.shape[1] <= cfg.max_keep
    assert sets[0][1].shape[1] < sets[1][1].shape[1], "the long-range set masks more"


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="positive"):
        masking.tube_mask(0, 2, 4, 4, 0.5, 0)
    with pytest.raises(ValueError, match="ratio"):
        masking.tube_mask(1, 2, 4, 4, 1.0, 0)
    with pytest.raises(ValueError, match="trim"):
        masking.multiblock_mask(1, 2, 4, 4, 1, (0.2, 0.2), trim="middle")
    with pytest.raises(RuntimeError, match="min_keep"):
        masking.multiblock_mask(1, 1, 4, 4, 4, (1.0, 1.0), min_keep=1, max_tries=3)


def test_cpp_releases_the_gil():
    """Python keeps running while a long C++ sampling call is in flight on another thread.

    The worker stamps the call's start and end; the main thread stamps every turn of its loop.
    With the GIL held through the call, the main thread only gets a switch interval (5 ms)
    after the call returns and before the end stamp, so no stamp falls in the first half of
    the call; released, thousands do. (Checked the other way with a GIL-holding
    ctypes.PyDLL usleep: no stamp in the first half.)
    """
    import time

    window, stamps = {}, []
    done = threading.Event()

    def work():
        window["start"] = time.perf_counter()
        window["ids"] = masking.multiblock_mask(2048, 32, 16, 16, 8, (0.15, 0.15), seed=5, threads=1)
        window["end"] = time.perf_counter()
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    while not done.is_set():
        stamps.append(time.perf_counter())
    worker.join()
    start, end = window["start"], window["end"]
    assert end - start > 0.02, "the call is too short to tell"
    first_half = sum(start < t < (start + end) / 2 for t in stamps)
    assert first_half > 100, f"the main thread ran only {first_half} times in the first half of the C++ call"
    ref = masking.multiblock_mask(2048, 32, 16, 16, 8, (0.15, 0.15), seed=5, threads=2)
    assert np.array_equal(window["ids"][0], ref[0]) and np.array_equal(window["ids"][1], ref[1])


def test_block_size_draws_scale_and_aspect_independently():
    """V-JEPA / released jepa_mask.py: temporal scale, spatial scale and aspect ratio each get their
    own uniform (counters 0, 1, 2 of the batch stream); one shared draw (I-JEPA) ties them."""
    T, H, W = 16, 16, 16
    ts, ss, ars = [], [], []
    for seed in range(200):
        t, h, w = masking.block_size(T, H, W, (0.1, 0.9), (0.2, 1.0), (0.5, 2.0), seed)
        ts.append(t), ss.append(h * w), ars.append(h / w)
        # the C++ sampler takes the same size: its one-block mask is a t x h x w box
        _, mask = masking.multiblock_mask(1, T, H, W, 1, (0.1, 0.9), (0.2, 1.0), (0.5, 2.0), seed)
        assert mask.shape[1] == t * h * w
    u = masking.uniform(masking.stream_key(7, masking._BATCH_STREAM), np.arange(3, dtype=np.uint64))
    assert masking.block_size(T, H, W, (0.1, 0.9), (0.2, 1.0), (0.5, 2.0), 7)[0] == max(1, int(T * (0.2 + u[0] * 0.8)))
    rank = lambda v: np.argsort(np.argsort(v))
    for a, b in ((ts, ss), (ts, ars), (ss, ars)):
        rho = np.corrcoef(rank(a), rank(b))[0, 1]
        assert abs(rho) < 0.4, f"block-size draws are correlated (rank corr {rho:.2f}): one shared uniform?"
