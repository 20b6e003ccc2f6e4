"""Decoder levers (GOP-aware seeking, skipping non-reference frames, single-threaded RGB
conversion) never change which frames come back: each sampled frame carries its number."""
from __future__ import annotations

import numpy as np
import pytest

try:
    import av  # noqa: F401
except ImportError as _e:
    pytest.skip(f"PyAV is not importable: {_e}", allow_module_level=True)

from ivfast.data import pyav as pyav_mod  # noqa: E402
from ivfast.data.synth import make_videos, read_frame_number  # noqa: E402

W, H, N = 96, 80, 90


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    root = tmp_path_factory.mktemp("levers")
    out = {}
    for codec, gop in (("h264b", 30), ("h264b", 250), ("h264", 8), ("vp9", 16), ("mjpeg", 0)):
        out[(codec, gop)] = make_videos(root, 1, codec, frames=N, size=(W, H), seed=3, gop=gop,
                                        prefix=f"g{gop}")[0]
    return out


def count_frames(monkeypatch):
    """Patch iter_frames to count the frames the decoder outputs (decoding work) and restarts."""
    seen = {"frames": 0, "calls": 0}
    real_iter, real_decode = pyav_mod.iter_frames, pyav_mod.decode_frames

    def it(*a, **k):
        for f in real_iter(*a, **k):
            seen["frames"] += 1
            yield f

    def dec(*a, **k):
        seen["calls"] += 1
        return real_decode(*a, **k)
    monkeypatch.setattr(pyav_mod, "iter_frames", it)
    monkeypatch.setattr(pyav_mod, "decode_frames", dec)
    return seen


def test_b_frames_really_present(vids):
    with av.open(str(vids[("h264b", 30)])) as c:
        types = {int(f.pict_type) for f in c.decode(video=0)}
    assert 3 in types          # AV_PICTURE_TYPE_B


@pytest.mark.parametrize("key", [("h264b", 30), ("h264b", 250), ("h264", 8), ("vp9", 16), ("mjpeg", 0)])
def test_levers_frame_exact(vids, key, monkeypatch):
    path = str(vids[key])
    rng = np.random.default_rng(0)
    sets = [[0, 89], [89, 0, 45, 45], [5, 6, 7, 60], list(range(0, 90, 6))]
    sets += [sorted(rng.integers(0, N, 8).tolist()) for _ in range(4)]
    for idx in sets:
        ref = pyav_mod.decode_frames(path, idx, seek_gap=0, skip_nonref=False)     # plain sequential
        assert [read_frame_number(f) for f in ref] == idx
        seen = count_frames(monkeypatch)
        fast = pyav_mod.decode_frames(path, idx)
        assert seen["calls"] == 1, (key, idx)              # no fall-back restart on these files
        np.testing.assert_array_equal(fast, ref)
        monkeypatch.undo()


def test_levers_cut_decoding_work(vids, monkeypatch):
    """Sparse samples: the short-GOP file seeks, the long-GOP B-frame file skips non-reference frames."""
    idx = [3, 40, 80]
    seen = count_frames(monkeypatch)
    pyav_mod.decode_frames(str(vids[("h264", 8)]), idx)
    assert seen["frames"] < 30                              # ~3 GOPs of 8 instead of 81 frames
    seen["frames"] = 0
    pyav_mod.decode_frames(str(vids[("h264b", 250)]), idx)
    assert seen["frames"] < 70                              # B-frames between samples are skipped
    seen["frames"] = 0
    pyav_mod.decode_frames(str(vids[("h264b", 250)]), idx, skip_nonref=False)
    assert seen["frames"] >= 81


def test_untimed_container_decodes_sequentially(tmp_path, monkeypatch):
    """MPEG-TS timestamps can restart: no seeking or skipping there, plain counting."""
    path = tmp_path / "a.ts"
    frames = make_videos(tmp_path, 1, "h264", frames=40, size=(W, H), seed=1, gop=5)[0]
    with av.open(str(frames)) as inp, av.open(str(path), "w", format="mpegts") as out:
        s = inp.streams.video[0]
        o = out.add_stream_from_template(s)
        for pkt in inp.demux(s):
            if pkt.size:
                pkt.stream = o
                out.mux(pkt)
    seen = count_frames(monkeypatch)
    got = pyav_mod.decode_frames(str(path), [1, 30, 39])
    assert [read_frame_number(f) for f in got] == [1, 30, 39] and seen["frames"] == 40


def test_crop_resize_uint8_path_within_rounding_of_float_reference():
    import torch
    import torch.nn.functional as F

    from ivfast.data.sampling import ClipPlan

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 61, 77, 3), dtype=np.uint8))
    plan = ClipPlan(np.arange(3), (5, 3, 50, 47), True)
    out = pyav_mod.crop_resize(x, plan, 24)
    ref = x[:, 3:50, 5:55].permute(0, 3, 1, 2).float()
    ref = F.interpolate(ref, size=(24, 24), mode="bilinear", align_corners=False, antialias=True).flip(-1)
    ref = ref.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3)
    assert out.shape == (3, 3, 24, 24) and out.dtype == torch.uint8
    assert (out.int() - ref.int()).abs().max() <= 1


def test_prepared_file_seeks_without_restarts(tmp_path, monkeypatch):
    """A prepared file (keyframe every 16, B-frames): frames right after a seeked-to keyframe
    are B-frames. Two ways skipping used to drop them and force a sequential restart: skipping
    switched on at the unknown position just after a seek, and a skip state left on the shared
    codec context by the iterator a seek abandoned."""
    from ivfast.data.prepare import Job, prepare_one

    src = make_videos(tmp_path, 1, "h264b", frames=120, size=(W, H), seed=3, gop=250, prefix="raw")[0]
    dst = str(tmp_path / "prepared.mp4")
    assert prepare_one(Job(str(src), dst, 256, 16, 0.0, 20, "veryfast"))["status"] == "done"
    for idx in ([2, 17, 49, 81], [1, 33, 65, 97], [5, 20, 50, 82, 113], [0, 16, 48, 64, 65, 96]):
        seen = count_frames(monkeypatch)
        got = pyav_mod.decode_frames(dst, idx)
        assert seen["calls"] == 1, idx                      # seeking and skipping, no restart
        assert [read_frame_number(f) for f in got] == idx
        assert seen["frames"] < 16 * len(idx), idx          # GOP-sized work per sample, not the file
        monkeypatch.undo()


@pytest.mark.parametrize("key", [("h264b", 30), ("vp9", 16), ("mjpeg", 0)])
def test_crop_conversion_bit_identical_to_full_frame(vids, key, monkeypatch):
    """decode_frames(crop=...) converts only a box around the crop to RGB; the pixels must be
    those of converting the whole frame and slicing (odd sizes, odd offsets, frame edges)."""
    path = str(vids[key])
    idx = [0, 7, 40, 41, 89]
    full = pyav_mod.decode_frames(path, idx)
    crops = [(0, 0, W, H), (1, 1, 37, 29), (3, 0, 60, 80), (W - 33, H - 27, 33, 27), (10, 11, 1, 1),
             (0, 5, W, 51), (17, 2, 49, 77)]
    boxes = []
    real = pyav_mod.CropConverter._build

    def spy(self, *a):            # the box path must really run (not the full-frame fallback)
        real(self, *a)
        boxes.append(self.crop)
    monkeypatch.setattr(pyav_mod.CropConverter, "_build", spy)
    for x, y, w, h in crops:
        got = pyav_mod.decode_frames(path, idx, crop=(x, y, w, h))
        assert got.shape == (len(idx), h, w, 3)
        np.testing.assert_array_equal(got, full[:, y:y + h, x:x + w], err_msg=f"{key} crop {(x, y, w, h)}")
    assert len(boxes) >= len(crops) - 2          # all but the (near-)whole-frame crops use a box


def test_crop_outside_the_frame_is_a_clear_error(vids):
    with pytest.raises(pyav_mod.BadSample, match="lies outside the 96x80 frame.*rebuild the index"):
        pyav_mod.decode_frames(str(vids[("h264", 8)]), [0, 3], crop=(50, 0, 60, 40))


def test_fast_rgb_is_close_but_not_the_dali_conversion(vids):
    """data.rgb=fast: swscale's default path, near the exact (DALI) conversion, not equal."""
    path = str(vids[("h264b", 30)])
    idx = [0, 33, 80]
    exact = pyav_mod.decode_frames(path, idx, crop=(3, 5, 70, 60)).astype(np.float64)
    fast = pyav_mod.decode_frames(path, idx, crop=(3, 5, 70, 60), rgb="fast").astype(np.float64)
    psnr = 10 * np.log10(255 ** 2 / np.mean((exact - fast) ** 2))
    assert 30 < psnr < 80, psnr
    with pytest.raises(ValueError, match="rgb must be one of"):
        pyav_mod.decode_frames(path, idx, rgb="accurate")


def test_loader_passes_the_rgb_mode(vids, tmp_path):
    from ivfast.config import load_config
    from ivfast.data import build_loader

    lst = tmp_path / "list.csv"
    lst.write_text(f"path,label\n{vids[('h264b', 30)]},0\n")
    out = {}
    for mode in ("exact", "fast"):
        cfg = load_config("demo", [f"data.train_list={lst}", f"data.index_cache={tmp_path / 'idx.jsonl'}",
                                   "data.backend=pyav", "data.num_workers=0", f"data.rgb={mode}"])
        ds = build_loader(cfg, device="cpu").dataset
        assert ds.rgb == mode
        out[mode] = ds.decode_one(0, 0, 0)
    assert out["exact"].shape == out["fast"].shape and not torch_equal(out["exact"], out["fast"])


def torch_equal(a, b) -> bool:
    import torch
    return bool(torch.equal(a, b))


def test_crop_graphs_are_shared_and_re_aimed(vids):
    """One filter graph per frame size and thread, re-aimed per crop: two converters used in
    turn on the same frames still get their own crops."""
    path = str(vids[("h264b", 30)])
    full = pyav_mod.decode_frames(path, [5])[0]
    with av.open(path) as c:
        frame = next(f for i, f in enumerate(c.decode(video=0)) if i == 5)
    pyav_mod._GRAPHS.cache = {}
    a, b = pyav_mod.CropConverter((3, 4, 50, 40)), pyav_mod.CropConverter((30, 20, 41, 57))
    for _ in range(2):
        np.testing.assert_array_equal(a(frame), full[4:44, 3:53])
        np.testing.assert_array_equal(b(frame), full[20:77, 30:71])
    assert len(pyav_mod._GRAPHS.cache) == 1
