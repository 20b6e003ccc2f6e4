"""Video input pipeline on small generated clips (PyAV path; DALI tests in test_data_dali.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# PyAV is an optional decoder: without it this module is skipped, not a collection error
# (the GPU machine has no PyAV; `pytest -m gpu` must still collect).
try:   # importorskip that also skips on a broken install (ImportError, not only ModuleNotFoundError)
    import av
except ImportError as _e:
    pytest.skip(f"PyAV (the CPU video decoder) is not importable: {_e}", allow_module_level=True)

from ivfast.config import load_config
from ivfast.data import DataError, build_index, build_loader, normalize, read_list, shard_epoch
from ivfast.data import index as index_mod
from ivfast.data.pyav import BadSample, crop_resize, decode_frames
from ivfast.data.sampling import (ClipPlan, fixed_offsets, multiscale_crop, plan_clip, sample_rng,
                                  segment_indices, stride_indices)
from ivfast.data.synth import make_videos, read_frame_number

W, H, FRAMES = 96, 80, 24


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """Good clips of three codecs and one file of every bad kind, made once per session."""
    root = tmp_path_factory.mktemp("clips")
    good = root / "good"
    vp9 = make_videos(good, 8, "vp9", frames=FRAMES, size=(W, H), seed=1)
    h264 = make_videos(good, 3, "h264", frames=FRAMES, size=(W, H), seed=2)
    mjpeg = make_videos(good, 3, "mjpeg", frames=FRAMES, size=(W, H), seed=3)
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.webm").write_bytes(b"")
    (bad / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    short = make_videos(bad, 1, "vp9", frames=3, size=(W, H), seed=4, prefix="short")[0]
    data = vp9[0].read_bytes()
    (bad / "truncated.webm").write_bytes(data[: len(data) // 2])
    # MJPEG with scrambled payloads in the middle (later frames decode again): the quick probe
    # passes, decoding fails. (A stream that only fails at its end is a cut, not corrupt.)
    corrupt_middle(mjpeg[0], bad / "corrupt.avi", range(3, 21))     # every 4-frame clip meets it
    with av.open(str(bad / "audio.wav"), "w") as c:        # a file with no video stream
        s = c.add_stream("pcm_s16le", rate=8000)
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        fr.sample_rate = 8000
        for p in list(s.encode(fr)) + list(s.encode()):
            c.mux(p)
    return {"root": root, "good": good, "vp9": vp9, "h264": h264, "mjpeg": mjpeg, "bad": bad,
            "short": short, "corrupt": bad / "corrupt.avi"}


def corrupt_middle(src: Path, dst: Path, packets) -> Path:
    """Copy ``src`` with the payload of ``packets`` (numbers) scrambled, the rest intact."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        s = inp.streams.video[0]
        o = out.add_stream_from_template(s)
        for i, pkt in enumerate(p for p in inp.demux(s) if p.size):
            if i in packets:
                b = bytearray(bytes(pkt))
                b[2:] = np.random.default_rng(i).integers(0, 256, len(b) - 2, dtype=np.uint8).tobytes()
                q = av.Packet(bytes(b))
                q.pts, q.dts, q.duration, q.time_base, q.is_keyframe = pkt.pts, pkt.dts, pkt.duration, pkt.time_base, True
                pkt = q
            pkt.stream = o
            out.mux(pkt)
    return dst


def write_list(path: Path, files) -> str:
    path.write_text("".join(f"{f}\n" for f in files))
    return str(path)


def make_cfg(train_list: str, tmp: Path, **data) -> object:
    over = [f"data.train_list={train_list}", f"data.index_cache={tmp / 'idx.jsonl'}", "data.num_workers=0",
            "data.backend=pyav", "optim.batch_per_gpu=3"]
    over += [f"data.{k}={v}" for k, v in data.items()]
    return load_config("demo", over)


# --------------------------------------------------------------------------- synth + decode
def test_synth_cli_and_exact_frames(tmp_path, clips):
    out = subprocess.run([sys.executable, "-m", "ivfast.data.synth", str(tmp_path), "--num", "2", "--codec",
                          "mjpeg", "--frames", "5", "--size", "96x80", "--list", str(tmp_path / "l.csv")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(list(tmp_path.glob("*.avi"))) == 2 and "wrote 2 mjpeg clips" in out.stdout
    assert len(read_list(tmp_path / "l.csv")) == 2
    for path in (clips["vp9"][0], clips["h264"][0], clips["mjpeg"][0]):
        idx = [7, 0, 7, 23, 12]
        frames = decode_frames(str(path), idx)
        assert frames.shape == (5, H, W, 3) and frames.dtype == np.uint8
        assert [read_frame_number(f) for f in frames] == idx, path.name
    with pytest.raises(BadSample) as e:
        decode_frames(str(clips["vp9"][1]), [3, FRAMES])       # one past the end
    assert e.value.reason == "truncated"


def test_seeking_decode_gives_sequential_frame_numbers(tmp_path, monkeypatch):
    from ivfast.data import pyav as pyav_mod
    calls = []
    real = pyav_mod.decode_frames
    monkeypatch.setattr(pyav_mod, "decode_frames", lambda *a, **k: calls.append(1) or real(*a, **k))
    for codec in ("vp9", "h264", "mjpeg"):
        path = make_videos(tmp_path, 1, codec, frames=60, size=(W, H), gop=10)[0]
        for idx in ([0, 5, 30, 59, 2, 45], [50, 59], [11, 12, 40, 40]):
            calls.clear()
            frames = pyav_mod.decode_frames(str(path), idx, seek_gap=3)      # seeks for every jump > 3
            assert [read_frame_number(f) for f in frames] == idx, (codec, idx)
            assert len(calls) == 1                                            # no fall-back restart
            np.testing.assert_array_equal(frames, real(str(path), idx, seek_gap=0))


# --------------------------------------------------------------------------- list formats
def test_read_list_formats(tmp_path):
    (tmp_path / "a.csv").write_text("path,label,source\nx/a.mp4,3,k400\nb.mp4,,ssv2\n")
    (tmp_path / "a.tsv").write_text("x/a.mp4\t3\n# comment\n\nb.mp4\t1\n")
    (tmp_path / "rel.txt").write_text("ssv2 x/a.webm -1 -1 -1 5\nk400 b.mp4 10.0 2.0 4.5 7\n")
    (tmp_path / "rel5.txt").write_text("x/a.webm 10 1 3 2\n")
    (tmp_path / "plain.txt").write_text("x/a.webm 4\n/abs/b.mp4\n")
    csv_ = read_list(tmp_path / "a.csv", root="/data")
    assert [(e.path, e.label, e.source) for e in csv_] == [("/data/x/a.mp4", 3, "k400"), ("/data/b.mp4", -1, "ssv2")]
    tsv = read_list(tmp_path / "a.tsv")
    assert [(e.path, e.label) for e in tsv] == [("x/a.mp4", 3), ("b.mp4", 1)]
    rel = read_list(tmp_path / "rel.txt", root="/r")
    assert (rel[0].source, rel[0].path, rel[0].label, rel[0].start_sec) == ("ssv2", "/r/x/a.webm", 5, -1)
    assert (rel[1].source, rel[1].start_sec, rel[1].end_sec, rel[1].label) == ("k400", 2.0, 4.5, 7)
    r5 = read_list(tmp_path / "rel5.txt")[0]
    assert (r5.path, r5.start_sec, r5.end_sec, r5.label, r5.source) == ("x/a.webm", 1.0, 3.0, 2, "")
    assert [(e.path, e.label) for e in read_list(tmp_path / "plain.txt")] == [("x/a.webm", 4), ("/abs/b.mp4", -1)]
    (tmp_path / "broken.txt").write_text("a b c\n")
    with pytest.raises(DataError, match="line 1"):
        read_list(tmp_path / "broken.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_list(tmp_path / "nope.csv")


# --------------------------------------------------------------------------- sampling
def test_segment_sampling():
    n, t = 50, 16
    for seed in range(20):
        idx = segment_indices(0, n, t, np.random.default_rng(seed))
        edges = np.arange(t + 1) * n / t
        assert np.all(idx >= np.floor(edges[:-1])) and np.all(idx < np.maximum(np.floor(edges[1:]), np.floor(edges[:-1]) + 1))
        assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < n
    centre = segment_indices(0, n, t, None)
    np.testing.assert_array_equal(centre, np.floor((np.arange(t) + 0.5) * n / t).astype(int))
    # a window inside the video, and fewer frames than T (frames repeat, never out of range)
    win = segment_indices(30, 40, 4, np.random.default_rng(0))
    assert win.min() >= 30 and win.max() < 40
    short = segment_indices(0, 5, 16, np.random.default_rng(0))
    assert short.min() >= 0 and short.max() <= 4 and len(short) == 16
    st = stride_indices(0, 100, 8, 4, np.random.default_rng(0))
    assert np.all(np.diff(st) == 4) and st.max() < 100
    np.testing.assert_array_equal(stride_indices(0, 10, 4, 4, None), [0, 4, 8, 9])   # pads with the last


def test_crop_and_plan_deterministic():
    for seed in range(30):
        x, y, w, h = multiscale_crop(340, 256, 224, [1.0, 0.875, 0.75, 0.66], np.random.default_rng(seed))
        assert (x, y) in fixed_offsets(340, 256, w, h)
        assert 0 <= x and x + w <= 340 and 0 <= y and y + h <= 256
        allowed = {224 if abs(int(256 * s) - 224) < 3 else int(256 * s) for s in [1.0, 0.875, 0.75, 0.66]}
        assert w in allowed and h in allowed
    kw = dict(num_frames_video=300, fps=30.0, width=340, height=256, num=16, out_size=224)
    a = plan_clip(**kw, rng=sample_rng(0, 1, 5))
    b = plan_clip(**kw, rng=sample_rng(0, 1, 5))
    c = plan_clip(**kw, rng=sample_rng(0, 2, 5))
    assert np.array_equal(a.frames, b.frames) and a.crop == b.crop and a.flip == b.flip
    assert not (np.array_equal(a.frames, c.frames) and a.crop == c.crop)
    ev = plan_clip(**kw, train=False)
    assert ev.crop == (42, 0, 256, 256) and not ev.flip
    flips = {plan_clip(**kw, rng=sample_rng(0, 0, i), flip=False).flip for i in range(20)}
    assert flips == {False}
    win = plan_clip(**kw, rng=sample_rng(0, 0, 0), start_sec=2.0, end_sec=4.0)
    assert win.frames.min() >= 60 and win.frames.max() < 120


def test_crop_resize_matches_manual():
    frames = torch.randint(0, 256, (2, 20, 30, 3), dtype=torch.uint8)
    out = crop_resize(frames, ClipPlan(np.array([0, 1]), (5, 2, 12, 12), True), 12)   # no resize: crop + flip
    assert out.shape == (3, 2, 12, 12)
    assert torch.equal(out, frames[:, 2:14, 5:17].flip(2).permute(3, 0, 1, 2))


# --------------------------------------------------------------------------- index + bad input
def test_index_cache_reused_and_invalidated(tmp_path, clips):
    files = [tmp_path / f"c{i}.webm" for i in range(3)]
    for src, dst in zip(clips["vp9"], files):
        dst.write_bytes(src.read_bytes())
    lst = write_list(tmp_path / "list.txt", files)
    first = build_index(lst)
    assert first.probed == 3 and Path(first.cache_path).exists()
    assert all(i.ok and i.frames == FRAMES and i.codec == "vp9" and (i.width, i.height) == (W, H)
               and abs(i.fps - 25) < 1e-6 for i in first.infos)
    again = build_index(lst)
    assert again.probed == 0 and [i.frames for i in again.infos] == [FRAMES] * 3
    make_videos(tmp_path / "new", 1, "vp9", frames=10, size=(W, H))      # replace one file: new size/mtime
    (tmp_path / "new" / "clip_00000_vp9.webm").replace(files[1])
    third = build_index(lst)
    assert third.probed == 1 and third.infos[1].frames == 10 and third.infos[0].frames == FRAMES
    full = build_index(lst, full=True)                      # a stricter probe redoes quick results
    assert full.probed == 3 and all(i.verified for i in full.infos)
    assert build_index(lst, full=True).probed == 0
    Path(first.cache_path).write_text("not json\n")          # a damaged cache is ignored, not fatal
    assert build_index(lst).probed == 3
    # the parallel probe (processes) agrees with the serial one
    many = [str(f) for f in files] * 11
    assert index_mod.probe_many(many, workers=2) == [index_mod.probe(p) for p in many]


def test_every_bad_kind_is_classified(clips, monkeypatch):
    b = clips["bad"]
    reasons = {
        "missing": index_mod.probe(str(b / "missing.mp4")).error,
        "empty": index_mod.probe(str(b / "empty.webm")).error,
        "unreadable": index_mod.probe(str(b / "garbage.mp4")).error,
        "no_video_stream": index_mod.probe(str(b / "audio.wav")).error,
        "decode_error": index_mod.probe(str(clips["corrupt"]), full=True).error,
    }
    assert reasons == {k: k for k in reasons}
    # a download cut short is not bad: its packets are the video, the header's promise a note
    cut = index_mod.probe(str(b / "truncated.webm"), full=True)
    assert cut.ok and 0 < cut.frames < FRAMES and "promised by the header" in cut.note
    assert index_mod.probe(str(clips["corrupt"])).ok          # the quick probe cannot see it...
    with pytest.raises(BadSample) as e:                       # ...decoding does
        decode_frames(str(clips["corrupt"]), [0, 10])                   # a frame in the corrupt middle
    assert e.value.reason == "decode_error"
    short = index_mod.probe(str(clips["short"]))
    assert short.ok and short.frames == 3
    monkeypatch.setattr(index_mod, "decoder_available", lambda codec: codec != "vp9")
    assert index_mod.probe(str(clips["vp9"][0])).error == "unsupported_codec"
    assert set(index_mod.BAD_REASONS) == set(reasons) | {"too_few_frames", "unsupported_codec", "truncated"}


def test_index_time_bad_files_counted_and_threshold(tmp_path, clips):
    b = clips["bad"]
    bad = [b / "missing.mp4", b / "empty.webm", b / "garbage.mp4", b / "audio.wav"]
    kept = [b / "truncated.webm", clips["short"]]              # 10 and 3 frames: usable (clip: 4 frames)
    lst = write_list(tmp_path / "l.txt", list(clips["vp9"][:6]) + bad + kept)
    with pytest.raises(DataError, match="max_bad_fraction"):
        build_loader(make_cfg(lst, tmp_path))
    loader = build_loader(make_cfg(lst, tmp_path, max_bad_fraction=0.6))
    s = loader.bad_summary()
    assert s["index"] == {"missing": 1, "empty": 1, "unreadable": 1, "no_video_stream": 1}
    assert s["files"] == 12 and s["bad_files"] == 4 and s["samples"] == 8 and s["short"] == 1
    seen = {i for batch in loader for i in batch["index"].tolist()}
    assert seen == set(range(6)) | {10, 11}                    # the good ones and the short ones, all of them
    # data.min_frames decides what is too short
    strict = build_loader(make_cfg(lst, tmp_path, max_bad_fraction=0.6, min_frames=4))
    assert strict.bad_summary()["index"]["too_few_frames"] == 1 and strict.bad_summary()["samples"] == 7


def test_log_step_summary_plans_no_epoch_and_caches_short_count(tmp_path, clips, monkeypatch):
    """bad_summary() runs at every log step: its epoch counts are arithmetic (no re-permutation
    of the epoch) and the short-video count is recounted only after a repair changed a length."""
    import ivfast.data.loader as loader_mod

    lst = write_list(tmp_path / "l.txt", list(clips["vp9"][:7]) + [clips["short"]])
    loader = build_loader(make_cfg(lst, tmp_path))
    for drop_last in (False, True):                  # same counts as the real plan
        loader.drop_last = drop_last
        assert loader.epoch_stats() == loader._epoch_plan()[2]
    loader.drop_last = False
    before = loader.bad_summary()
    assert before["short"] == 1 and before["samples"] == 8 and before["padded"] == 1

    def no_plan(*a, **k):
        raise AssertionError("a log-step summary re-planned the epoch")
    monkeypatch.setattr(loader_mod, "shard_epoch", no_plan)
    infos = loader.dataset.index.infos
    sid = int(loader.dataset.usable[0])
    real = infos[sid].frames
    monkeypatch.setattr(infos[sid], "frames", 2)     # a length changed behind the cache's back...
    assert loader.bad_summary()["short"] == 1        # ...is not recounted (cached)
    loader._repair_version += 1                      # what _apply_repairs does on a clamp
    assert loader.bad_summary()["short"] == 2
    monkeypatch.setattr(infos[sid], "frames", real)


def test_decode_time_bad_file_replaced_and_counted(tmp_path, clips, caplog):
    lst = write_list(tmp_path / "l.txt", list(clips["vp9"][:5]) + [clips["corrupt"]])
    cfg = make_cfg(lst, tmp_path, max_bad_fraction=0.5)
    loader = build_loader(cfg)
    assert len(loader) == 2 and loader.bad_summary()["samples"] == 6   # the quick probe passed it
    batches = list(loader)
    assert all(b["video"].shape == (3, 3, 4, 56, 56) for b in batches)
    ids = [i for b in batches for i in b["index"].tolist()]
    assert 5 not in ids and len(ids) == 6 and set(ids) <= set(range(5))
    s = loader.bad_summary()
    # one file, met once or more (a replacement drawn in another slot can meet it again)
    assert list(s["decode"]) == ["decode_error"] and s["decode"]["decode_error"] >= 1 and s["decode_bad_files"] == 1
    assert str(clips["corrupt"]) in s["examples"]["decode_error"]
    assert any("corrupt.avi" in r.message for r in caplog.records)
    strict = build_loader(make_cfg(lst, tmp_path, max_bad_fraction=0.1))
    with pytest.raises(DataError, match="max_bad_fraction"):
        list(strict)
    # verify=full finds it while indexing instead
    full = build_loader(make_cfg(lst, tmp_path, max_bad_fraction=0.5, verify="full"))
    assert full.bad_summary()["index"] == {"decode_error": 1} and full.bad_summary()["samples"] == 5


def _sizes_change_midstream(path: Path) -> Path:
    """A real file whose frames change size: two MPEG-TS segments of different resolutions, concatenated."""
    parts = []
    for k, (w, h) in enumerate([(W, H), (64, 48)]):
        seg = path.with_suffix(f".{k}.ts")
        with av.open(str(seg), "w", format="mpegts") as c:
            s = c.add_stream("mpeg4", rate=25)   # (mpeg1/2 lose a frame at the join: 'truncated')
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            for i in range(12):
                f = av.VideoFrame.from_ndarray(np.full((h, w, 3), 10 * i, np.uint8), format="rgb24")
                for p in s.encode(f):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        parts.append(seg.read_bytes())
        seg.unlink()
    path.write_bytes(b"".join(parts))
    return path


def test_any_decode_or_crop_failure_is_a_bad_sample(tmp_path, clips, monkeypatch):
    """A file that makes decoding/cropping raise anything is replaced and counted, never a crash."""
    ts = _sizes_change_midstream(tmp_path / "sizes.ts")
    with pytest.raises(BadSample) as e:
        decode_frames(str(ts), [0, 20])
    assert e.value.reason == "decode_error" and "frame size changes" in e.value.detail
    lst = write_list(tmp_path / "l.txt", list(clips["vp9"][:5]) + [ts])
    loader = build_loader(make_cfg(lst, tmp_path, max_bad_fraction=0.5))
    assert loader.bad_summary()["samples"] == 6            # the first-frame probe passes it
    ids = [i for b in loader for i in b["index"].tolist()]
    assert 5 not in ids and len(ids) == 6
    s = loader.bad_summary()
    assert s["decode"].get("decode_error", 0) >= 1 and s["examples"]["decode_error"] == [str(ts)]

    # any other exception (here a ValueError from the decoder of one file) is handled the same way
    import ivfast.data.loader as loader_mod
    real = loader_mod.decode_frames
    victim = str(clips["vp9"][2])

    def flaky(path, *a, **k):
        if path == victim:
            raise ValueError("all input arrays must have the same shape")
        return real(path, *a, **k)

    monkeypatch.setattr(loader_mod, "decode_frames", flaky)
    lst = write_list(tmp_path / "l2.txt", clips["vp9"][:6])
    loader = build_loader(make_cfg(lst, tmp_path, max_bad_fraction=0.5, index_cache=str(tmp_path / "i2.jsonl")))
    ids = [i for b in loader for i in b["index"].tolist()]
    assert 2 not in ids and len(ids) == 6
    s = loader.bad_summary()
    assert s["decode_bad_files"] == 1 and s["examples"]["decode_error"] == [victim]


# --------------------------------------------------------------------------- sharding, resume, output
def test_sharding_covers_epoch_exactly():
    ids = np.arange(100, 113)                                  # 13 samples, 3 ranks x batch 2
    for drop_last in (False, True):
        parts = [shard_epoch(ids, seed=3, epoch=1, rank=r, world_size=3, batch_size=2, drop_last=drop_last)
                 for r in range(3)]
        shapes = {p[0].shape for p in parts}
        assert len(shapes) == 1                                # every rank runs the same number of steps
        allids = np.concatenate([p[0].ravel() for p in parts])
        if drop_last:
            assert shapes == {(2, 2)} and len(set(allids)) == len(allids) == 12 and parts[0][2]["dropped"] == 1
        else:
            assert shapes == {(3, 2)} and set(allids) == set(ids) and parts[0][2]["padded"] == 5
            reps = np.concatenate([p[1].ravel() for p in parts])
            assert (reps > 0).sum() == 5                        # the repeats are marked (fresh augmentation)
            firsts = allids[reps == 0]
            assert sorted(firsts) == list(ids)                  # each sample exactly once as a first appearance
    a = shard_epoch(ids, seed=3, epoch=1, rank=0, world_size=3, batch_size=2, drop_last=False)[0]
    b = shard_epoch(ids, seed=3, epoch=1, rank=0, world_size=3, batch_size=2, drop_last=False)[0]
    c = shard_epoch(ids, seed=3, epoch=2, rank=0, world_size=3, batch_size=2, drop_last=False)[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_loader_ranks_resume_and_determinism(tmp_path, clips):
    lst = write_list(tmp_path / "l.txt", clips["vp9"][:7])
    cfg = make_cfg(lst, tmp_path)
    ranks = [build_loader(cfg, rank=r, world_size=2) for r in range(2)]
    assert [len(r) for r in ranks] == [2, 2]
    got = [[(b["index"].clone(), b["video"].clone()) for b in r] for r in ranks]
    ids = [i for r in got for idx, _ in r for i in idx.tolist()]
    assert set(ids) == set(range(7)) and len(ids) == 12        # 7 samples + 5 padding over 2 ranks x 2 x 3
    for r in got:
        for idx, video in r:
            assert video.shape == (3, 3, 4, 56, 56) and video.dtype == torch.uint8 and idx.dtype == torch.int64
    # resume in the middle of epoch 0 of rank 1 reproduces the same batch, pixels included
    fresh = build_loader(cfg, rank=1, world_size=2)
    it = iter(fresh)
    next(it)
    state = fresh.state_dict()
    assert state["position"] == 1 and state["epoch"] == 0
    resumed = build_loader(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)                                       # the training loop's call keeps the position
    rest = list(resumed)
    assert len(rest) == 1 and torch.equal(rest[0]["index"], got[1][1][0]) and torch.equal(rest[0]["video"], got[1][1][1])
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["position"] == 0
    # the next epoch differs; another seed differs
    nxt = [b["index"] for b in resumed]
    assert not all(torch.equal(x, y[0]) for x, y in zip(nxt, got[1]))
    other = build_loader(make_cfg(lst, tmp_path, **{}), rank=1, world_size=2)
    other.seed = other.dataset.seed = 99
    assert not torch.equal(next(iter(other))["video"], got[1][0][1])
    bad_state = dict(state, world_size=4)
    with pytest.raises(DataError, match="world_size"):
        build_loader(cfg, rank=1, world_size=2).load_state_dict(bad_state)


def test_workers_normalized_and_flip_source(tmp_path, clips):
    lst = write_list(tmp_path / "l.txt", clips["vp9"][:6])
    plain = [b for b in build_loader(make_cfg(lst, tmp_path))]
    workers = [b for b in build_loader(make_cfg(lst, tmp_path, num_workers=2))]
    for a, b in zip(plain, workers):                            # worker processes change nothing
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])
    norm = list(build_loader(make_cfg(lst, tmp_path, output="normalized")))
    assert norm[0]["video"].dtype == torch.float32
    torch.testing.assert_close(norm[0]["video"], normalize(plain[0]["video"], torch.float32))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(norm[0]["video"] * std + mean, plain[0]["video"].float() / 255, atol=1e-5, rtol=0)
    # the released list's 'ssv2' source is never flipped
    rel = tmp_path / "rel.txt"
    rel.write_text("".join(f"ssv2 {p} -1 -1 -1 0\n" for p in clips["vp9"][:6]))
    loader = build_loader(make_cfg(str(rel), tmp_path, index_cache=tmp_path / "i2.jsonl"))
    assert not any(loader.dataset.plan(i, 0, 0).flip for i in range(6))
    assert any(build_loader(make_cfg(lst, tmp_path)).dataset.plan(i, 0, 0).flip for i in range(6))


def test_normalize_fp32_maths_and_no_host_tensors(monkeypatch):
    v = torch.randint(0, 256, (2, 3, 2, 5, 7), dtype=torch.uint8)
    m = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
    s = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)
    want = (v.float() / 255 - m) / s
    torch.testing.assert_close(normalize(v, torch.float32), want, atol=0, rtol=0)
    # computed in fp32 and rounded once: bf16 output equals the fp32 result cast
    assert torch.equal(normalize(v, torch.bfloat16), want.bfloat16())

    def boom(*a, **k):   # on a GPU, a tensor built from Python numbers is a blocking host copy
        raise AssertionError("normalize built its mean/std from host values again")
    monkeypatch.setattr(torch, "tensor", boom)
    normalize(v, torch.float32)


def test_eval_loader_is_centred_and_seed_free(tmp_path, clips):
    lst = write_list(tmp_path / "l.txt", clips["vp9"][:3])
    a = build_loader(make_cfg(lst, tmp_path), train=False)
    b = build_loader(make_cfg(lst, tmp_path, **{}), train=False)
    b.dataset.seed = 123
    for i in range(3):
        pa, pb = a.dataset.plan(i, 0, 0), b.dataset.plan(i, 5, 0)
        assert np.array_equal(pa.frames, pb.frames) and pa.crop == pb.crop == (8, 0, 80, 80) and not pa.flip
        np.testing.assert_array_equal(pa.frames, [3, 9, 15, 21])


def test_inspect_cli(tmp_path, clips):
    good = subprocess.run([sys.executable, "-m", "ivfast.data", "inspect", str(clips["vp9"][0]), str(clips["h264"][0])],
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "2 files: 2 decode, 0 bad" in good.stdout and "vp9" in good.stdout and "96x80" in good.stdout
    lst = write_list(tmp_path / "l.txt", [clips["vp9"][0], clips["corrupt"], clips["bad"] / "empty.webm"])
    bad = subprocess.run([sys.executable, "-m", "ivfast.data", "inspect", lst, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1, bad.stderr
    lines = [json.loads(ln) for ln in bad.stdout.splitlines()]
    assert [r["decodes"] for r in lines[:3]] == [True, False, False]
    assert lines[1]["error"] == "decode_error" and lines[2]["error"] == "empty"
    assert lines[3]["totals"]["bad"] == 2 and lines[0]["frames"] == FRAMES
    assert lines[0]["container_frames"] == FRAMES and lines[0]["note"] == ""


@pytest.mark.gpu
def test_normalize_no_host_sync_on_gpu():
    v = torch.randint(0, 256, (2, 3, 2, 5, 7), dtype=torch.uint8, device="cuda")
    normalize(v, torch.bfloat16)                 # first call puts mean/std on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        normalize(v, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# --------------------------------------------------------------------------- crashing and hanging decoders
def _inject(monkeypatch, crash="", hang=""):
    """decode_frames that segfaults its process on ``crash`` and never returns on ``hang``
    (``hang="*"``: on every file)."""
    import os
    import signal
    import time

    from ivfast.data import loader as loader_mod

    real = loader_mod.decode_frames

    def injected(source, *a, **k):
        if str(source) == crash:
            os.kill(os.getpid(), signal.SIGSEGV)     # what FFmpeg does on some malformed streams
        if hang in (str(source), "*"):
            time.sleep(3600)                         # a decoder that never returns
        return real(source, *a, **k)

    monkeypatch.setattr(loader_mod, "decode_frames", injected)     # the workers fork with it


@pytest.mark.slow
def test_decoder_segfault_costs_one_file_and_resume_stays_exact(tmp_path, clips, monkeypatch, caplog):
    """A worker killed by SIGSEGV inside the decoder: the file is counted and named, the workers
    restart, the epoch completes; a loader resumed before the crash yields the same batches."""
    files = list(clips["vp9"])                       # 8 files: 3 batches of 3
    crash = str(files[2])
    _inject(monkeypatch, crash=crash)
    cfg = make_cfg(write_list(tmp_path / "l.txt", files), tmp_path, num_workers=2, max_bad_fraction=0.5)
    loader = build_loader(cfg)
    batches = [(b["index"].clone(), b["video"].clone()) for b in loader]
    assert len(batches) == 3 and all(v.shape == (3, 3, 4, 56, 56) for _, v in batches)
    ids = [i for idx, _ in batches for i in idx.tolist()]
    assert 2 not in ids and len(ids) == 9
    s = loader.bad_summary()
    assert s["decode_bad_files"] == 1 and s["examples"] == {"decoder_crash": [crash]}, s
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert f"(signal SIGSEGV) decoding {crash}" in log, log
    # exact resume: a new loader resumed after batch 0 meets the crash anew and yields the same batches
    resumed = build_loader(cfg)
    resumed.load_state_dict(dict(loader.state_dict(), epoch=0, position=1))
    rest = [(b["index"], b["video"]) for b in resumed]
    assert len(rest) == 2 and 2 not in torch.cat([i for i, _ in rest]).tolist()
    for (a_idx, a_vid), (b_idx, b_vid) in zip(batches[1:], rest):
        assert torch.equal(a_idx, b_idx) and torch.equal(a_vid, b_vid)


@pytest.mark.slow
def test_decode_past_the_time_limit_costs_one_file(tmp_path, clips, monkeypatch, caplog):
    import time

    files = list(clips["vp9"])
    hang = str(files[5])
    _inject(monkeypatch, hang=hang)
    cfg = make_cfg(write_list(tmp_path / "l.txt", files), tmp_path, num_workers=2, max_bad_fraction=0.5,
                   decode_timeout_s=2)
    t0 = time.monotonic()
    batches = list(build_loader(cfg))
    assert time.monotonic() - t0 < 60
    ids = [i for b in batches for i in b["index"].tolist()]
    assert len(batches) == 3 and 5 not in ids and len(ids) == 9
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert f"decoding {hang}: counted as bad (decode_timeout)" in log, log
    assert "decode_timeout_s=2" in log


@pytest.mark.slow
def test_workers_that_hang_on_every_file_stop_the_run_clearly(tmp_path, clips, monkeypatch):
    """Time-outs on file after file are a hung worker (e.g. a deadlock after fork), not bad files:
    a few restarts, then one clear error instead of blaming the data set file by file."""
    _inject(monkeypatch, hang="*")
    cfg = make_cfg(write_list(tmp_path / "l.txt", clips["vp9"]), tmp_path, num_workers=1, max_bad_fraction=0.9,
                   decode_timeout_s=1)
    with pytest.raises(DataError, match=r"killed 3 times in a row for decodes past data.decode_timeout_s=1, "
                                        r"each on another file .*more likely the workers hang than the files"):
        list(build_loader(cfg))
