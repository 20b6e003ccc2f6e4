"""DALI path on the CPU backend (VP8/VP9/MJPEG) against the PyAV path, routing and fallback.

Runs wherever nvidia-dali imports (its CPU video decoder needs no GPU); skipped, with DALI's
import error as the reason, where it does not.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

try:   # importorskip that also skips on a broken install (ImportError, not only ModuleNotFoundError)
    import av
except ImportError as _e:
    pytest.skip(f"PyAV (the reference decoder DALI is compared with) is not importable: {_e}", allow_module_level=True)

from ivfast.config import load_config  # noqa: E402
from ivfast.data import build_loader, normalize
from ivfast.data.dali import dali_status
from ivfast.data.pyav import crop_resize, decode_frames
from ivfast.data.sampling import ClipPlan, plan_clip, sample_rng
from ivfast.data.synth import make_videos, read_frame_number

DALI_OK, DALI_WHY = dali_status()
pytestmark = pytest.mark.skipif(not DALI_OK, reason=f"DALI CPU path not testable: {DALI_WHY}")

W, H, FRAMES = 96, 80, 24


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali_clips")
    out = {c: make_videos(root, n, c, frames=FRAMES, size=(W, H), seed=10 + k)
           for k, (c, n) in enumerate([("vp9", 5), ("mjpeg", 2), ("h264", 2), ("vp8", 1)])}
    data = out["vp9"][0].read_bytes()
    (root / "truncated.webm").write_bytes(data[: len(data) // 2])
    out["root"], out["truncated"] = root, root / "truncated.webm"
    return out


def decoder(batch, frames, size, **kw):
    from ivfast.data.dali import DaliClipDecoder
    return DaliClipDecoder(batch, frames, size, device_id=None, num_threads=1, **kw)


def test_dali_cpu_decodes_exact_frames(vids):
    idx = np.array([7, 0, 7, 23])
    dec = decoder(2, 4, 80)
    for path in (vids["vp9"][0], vids["mjpeg"][0], vids["vp8"][0]):
        plan = ClipPlan(idx, (0, 0, 80, 80), False)              # 80x80 crop, no resize: stamps intact
        out = dec.decode([np.fromfile(path, np.uint8)], [plan])
        assert out.shape == (1, 3, 4, 80, 80) and out.dtype == torch.uint8
        frames = out[0].permute(1, 2, 3, 0).numpy()
        assert [read_frame_number(f) for f in frames] == idx.tolist(), path.name
        ref = crop_resize(decode_frames(str(path), idx), plan, 80)
        assert (out[0].int() - ref.int()).abs().float().mean() < 2.5


def test_dali_matches_pyav_with_augmentation(vids):
    dec = decoder(4, 8, 56)
    for path in (vids["vp9"][1], vids["mjpeg"][1]):
        plans = [plan_clip(num_frames_video=FRAMES, fps=25.0, width=W, height=H, num=8, out_size=56,
                           rng=sample_rng(0, 0, i)) for i in range(4)]
        assert {p.flip for p in plans} == {True, False} and len({p.crop for p in plans}) > 1
        out = dec.decode([np.fromfile(path, np.uint8)] * 4, plans)
        for j, plan in enumerate(plans):
            ref = crop_resize(decode_frames(str(path), plan.frames), plan, 56)
            diff = (out[j].int() - ref.int()).abs().float()
            # colour conversion differs slightly (FFmpeg in DALI vs PyAV's swscale)
            assert diff.mean() < 2.5 and torch.quantile(diff.flatten(), 0.99) < 16, (path.name, plan)
            wrong = crop_resize(decode_frames(str(path), plan.frames), ClipPlan(plan.frames, plan.crop, not plan.flip), 56)
            assert (out[j].int() - wrong.int()).abs().float().mean() > 8      # the comparison can tell


def test_dali_normalises_in_graph(vids):
    plan = plan_clip(num_frames_video=FRAMES, fps=25.0, width=W, height=H, num=4, out_size=56, rng=sample_rng(1, 0, 0))
    data = [np.fromfile(vids["vp9"][2], np.uint8)]
    u8 = decoder(1, 4, 56).decode(data, [plan])
    f32 = decoder(1, 4, 56, output="normalized").decode(data, [plan])
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32, normalize(u8, torch.float32), atol=1e-4, rtol=0)


def cfg_for(lst: Path, tmp: Path, backend: str, **data):
    over = [f"data.train_list={lst}", f"data.index_cache={tmp / ('idx_' + backend + '.jsonl')}",
            "data.num_workers=0", f"data.backend={backend}", "optim.batch_per_gpu=3", "data.decode_threads=1"]
    return load_config("demo", over + [f"data.{k}={v}" for k, v in data.items()])


def test_mixed_codecs_routed_and_match_pyav(tmp_path, vids, monkeypatch):
    files = vids["vp9"][:3] + vids["h264"] + vids["mjpeg"][:1] + vids["vp8"]
    lst = tmp_path / "l.txt"
    lst.write_text("".join(f"{f}\n" for f in files))
    dali_loader = build_loader(cfg_for(lst, tmp_path, "dali"))
    assert dali_loader.backend == "dali"
    assert all(i.verified for i in dali_loader.dataset.index.infos)     # verify=auto: full decode for DALI
    real = dali_loader.dali.decode
    # record which files DALI was handed: none of them may be H.264 on the CPU backend
    handed = []
    orig_batch = dali_loader._dali_batch

    def batch_spy(ids, rep, epoch, pool):
        infos = dali_loader.dataset.index.infos
        handed.extend(infos[int(i)].codec for i in ids if infos[int(i)].codec in dali_loader.dali.codecs)
        return orig_batch(ids, rep, epoch, pool)

    monkeypatch.setattr(dali_loader, "_dali_batch", batch_spy)
    calls = []
    monkeypatch.setattr(dali_loader.dali, "decode", lambda d, p: calls.append(len(p)) or real(d, p))
    dali_batches = list(dali_loader)
    pyav_batches = list(build_loader(cfg_for(lst, tmp_path, "pyav")))
    assert len(dali_batches) == len(pyav_batches) == 3
    assert sum(calls) == len(handed) >= 5 and "h264" not in handed and set(handed) == {"vp9", "mjpeg", "vp8"}
    ids = [i for b in dali_batches for i in b["index"].tolist()]
    assert set(ids) == set(range(len(files)))                            # no file lost to routing
    for a, b in zip(dali_batches, pyav_batches):
        assert torch.equal(a["index"], b["index"])
        assert a["video"].shape == b["video"].shape == (3, 3, 4, 56, 56)
        assert (a["video"].int() - b["video"].int()).abs().float().mean() < 2.5
    s = dali_loader.bad_summary()
    assert s["bad_files"] == 0 and s["dali_fallback_batches"] == 0


def test_dali_failure_falls_back_and_counts(tmp_path, vids):
    lst = tmp_path / "l.txt"
    lst.write_text("".join(f"{f}\n" for f in vids["vp9"][:5] + [vids["truncated"]]))
    cfg = cfg_for(lst, tmp_path, "dali", max_bad_fraction=0.5)
    loader = build_loader(cfg)
    # a download cut short is kept at the length that decodes (a note, not a bad file)...
    assert loader.bad_summary()["index"] == {} and 0 < loader.dataset.index.infos[5].frames < FRAMES
    assert "promised by the header" in loader.dataset.index.infos[5].note
    from ivfast.data.index import build_index
    index = build_index(str(lst), cache_path=str(tmp_path / "idx_dali.jsonl"), full=True)
    bad = index.infos[5]
    bad.frames = FRAMES                                                   # ...pretend the index said more
    loader = build_loader(cfg, index=index)
    batches = list(loader)                                                # DALI raises (pad_mode none), PyAV finds it
    assert all(b["video"].shape == (3, 3, 4, 56, 56) for b in batches)
    assert 5 not in [i for b in batches for i in b["index"].tolist()]
    s = loader.bad_summary()
    assert s["dali_fallback_batches"] >= 1 and s["decode_bad_files"] == 1 and "truncated" in s["decode"]
    assert loader.dali.rebuilds == s["dali_fallback_batches"]


def test_backend_choice():
    from ivfast.data.loader import choose_backend
    assert choose_backend("auto", torch.device("cpu")) == "pyav"         # DALI on CPU only when asked
    assert choose_backend("dali", torch.device("cpu")) == "dali"
    assert choose_backend("pyav", torch.device("cuda")) == "pyav"


def test_dali_early_stop_and_resume(tmp_path, vids):
    import threading
    lst = tmp_path / "l.txt"
    lst.write_text("".join(f"{f}\n" for f in vids["vp9"] + vids["h264"]))
    cfg = cfg_for(lst, tmp_path, "dali")
    full = [b["index"] for b in build_loader(cfg)]
    loader = build_loader(cfg)
    it = iter(loader)
    first = next(it)
    it.close()                                                            # the consumer stops early
    assert not any(t.name == "ivfast-dali-producer" for t in threading.enumerate())
    assert torch.equal(first["index"], full[0]) and loader.state_dict()["position"] == 1
    resumed = build_loader(cfg)
    resumed.load_state_dict(loader.state_dict())
    assert [b["index"].tolist() for b in resumed] == [x.tolist() for x in full[1:]]


@pytest.mark.gpu
def test_dali_gpu_matches_pyav(tmp_path, vids):
    """NVDEC ("mixed") path: every codec here goes to DALI, output on the GPU, close to PyAV."""
    lst = tmp_path / "l.txt"
    files = vids["vp9"][:3] + vids["h264"] + vids["mjpeg"][:1]
    lst.write_text("".join(f"{f}\n" for f in files))
    gpu = build_loader(cfg_for(lst, tmp_path, "dali"), device="cuda")
    assert gpu.backend == "dali" and {"h264", "vp9", "mjpeg"} <= gpu.dali.codecs
    cpu = list(build_loader(cfg_for(lst, tmp_path, "pyav")))
    got = list(gpu)
    assert len(got) == len(cpu) and gpu.bad_summary()["dali_fallback_batches"] == 0
    for a, b in zip(got, cpu):
        assert a["video"].is_cuda and a["video"].dtype == torch.uint8 and a["index"].is_cuda
        assert torch.equal(a["index"].cpu(), b["index"])
        assert (a["video"].cpu().int() - b["video"].int()).abs().float().mean() < 3.0
    norm = next(iter(build_loader(cfg_for(lst, tmp_path, "dali", output="normalized"), device="cuda")))
    assert norm["video"].dtype == torch.bfloat16 and norm["video"].is_cuda
    torch.testing.assert_close(norm["video"].float(), normalize(got[0]["video"], torch.float32),
                               atol=0.02, rtol=0.01)


def test_pyav_and_dali_cpu_agree_within_codec_noise(tmp_path):
    """Same frames, no resize: PyAV's RGB (swscale, full chroma interpolation, accurate rounding)
    matches DALI's decoder to >= 45 dB (bit-identical here); swscale's default yuv420p -> rgb24
    (the old path) did not (chroma upsampling)."""
    import av
    from nvidia.dali import fn, pipeline_def, types

    def psnr(a, b):
        return 10 * np.log10(255.0 ** 2 / max(((a.astype(np.float64) - b) ** 2).mean(), 1e-9))

    idx = [0, 3, 7]
    for codec in ("vp9", "mjpeg"):
        path = str(make_videos(tmp_path, 1, codec, frames=8, size=(128, 96), seed=4)[0])

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def raw():
            enc = fn.external_source(name="e", dtype=types.UINT8, ndim=1)
            return fn.decoders.video(enc, device="cpu", frames=idx)
        pipe = raw()
        pipe.build()
        pipe.feed_input("e", [np.fromfile(path, np.uint8)])
        dali = np.array(pipe.run()[0].as_tensor())[0].astype(np.float64)
        ours = decode_frames(path, idx)
        assert psnr(ours, dali) >= 60, codec        # target >= 45 dB; bit-identical on these files
        with av.open(path) as c:
            old = np.stack([f.to_ndarray(format="rgb24") for k, f in enumerate(c.decode(video=0)) if k in idx])
        assert psnr(old, dali) < 42, codec          # the test sees the difference it guards against
