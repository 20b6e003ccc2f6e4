"""``python -m ivfast.data prepare``: re-encoded files keep every frame (frame-exact), have the
asked GOP, carry labels into a new list, resume, and feed the loader."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

try:
    import av  # noqa: F401
except ImportError as _e:
    pytest.skip(f"PyAV is not importable: {_e}", allow_module_level=True)

from ivfast.data import read_list  # noqa: E402
from ivfast.data.prepare import kept_frames, target_size  # noqa: E402
from ivfast.data.pyav import decode_frames  # noqa: E402
from ivfast.data.synth import make_videos, read_frame_number  # noqa: E402

W, H, N = 96, 80, 50


def run(*args):
    return subprocess.run([sys.executable, "-m", "ivfast.data", "prepare", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_prepare_frame_exact_gop_labels_resume(tmp_path):
    raw = make_videos(tmp_path / "raw" / "a", 2, "h264b", frames=N, size=(W, H), seed=1, gop=250)
    (tmp_path / "raw" / "bad.mp4").write_bytes(b"")
    lst = tmp_path / "train.csv"
    lst.write_text(f"path,label,source\n{raw[0]},3,k400\n{raw[1]},7,ssv2\n{tmp_path / 'raw' / 'bad.mp4'},1,k400\n")
    out = tmp_path / "prep"
    r = run(lst, out, "--short-side", H, "--gop", 8, "--workers", 2)      # short side kept: stamps survive
    assert r.returncode == 1 and "2 done, 0 already done, 1 failed" in r.stdout, r.stdout + r.stderr
    new = read_list(out / "list.csv")
    assert [(e.label, e.source) for e in new] == [(3, "k400"), (7, "ssv2")]
    assert new[0].path.endswith("a/clip_00000_h264b.mp4") and "bad.mp4" in (out / "failed.txt").read_text()
    with av.open(new[0].path) as c:
        frames = list(c.decode(video=0))
    assert [read_frame_number(f.to_ndarray(format="rgb24")) for f in frames] == list(range(N))
    assert [i for i, f in enumerate(frames) if f.key_frame] == list(range(0, N, 8))
    idx = [0, 17, 33, 49, 17]
    assert [read_frame_number(f) for f in decode_frames(new[1].path, idx)] == idx       # seeks, frame-exact
    again = run(lst, out, "--short-side", H, "--gop", 8)
    assert "0 done, 2 already done, 1 failed" in again.stdout                            # resumable
    assert not list(out.rglob("*.tmp*"))


def test_prepare_scales_and_caps_fps(tmp_path):
    raw = make_videos(tmp_path / "raw", 1, "h264", frames=N, size=(W, H), seed=2, fps=25)
    lst = tmp_path / "l.txt"
    lst.write_text(f"{raw[0]} 5\n")
    out = tmp_path / "prep"
    r = run(lst, out, "--short-side", 40, "--gop", 4, "--fps-cap", 10, "--workers", 1)
    assert r.returncode == 0, r.stderr
    e = read_list(out / "list.csv")[0]
    assert e.label == 5
    with av.open(e.path) as c:
        s = c.streams.video[0]
        assert (s.codec_context.width, s.codec_context.height) == target_size(W, H, 40) == (48, 40)
        assert abs(float(s.average_rate) - 10) < 1e-6
        n = sum(1 for _ in c.decode(s))
    assert n == len(kept_frames(N, 25, 10)) == 20
    assert kept_frames(10, 30, 15) == [0, 2, 4, 6, 8] and kept_frames(5, 25, 0) == list(range(5))
    assert target_size(1280, 720, 256) == (456, 256) and target_size(64, 48, 256) == (64, 48)


def test_cli_data_problems_are_one_line(tmp_path):
    for cmd in (["prepare", tmp_path / "nope.csv", tmp_path / "out"], ["prepare", "", tmp_path / "out"]):
        r = subprocess.run([sys.executable, "-m", "ivfast.data", *map(str, cmd)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: "), r.stderr


def test_prepare_gop_ignores_the_sources_frame_types(tmp_path):
    # decoded frames carry their source picture type, which x264 takes as an order: a source
    # keyframe every 5 frames must not become extra keyframes, nor its P-frames forbid B-frames
    raw = make_videos(tmp_path / "raw", 1, "h264", frames=N, size=(W, H), seed=7, gop=5)
    out = tmp_path / "prep"
    r = run(raw[0].parent, out, "--short-side", H, "--gop", 8, "--bframes", 2, "--workers", 1)
    assert r.returncode == 0, r.stderr
    with av.open(read_list(out / "list.csv")[0].path) as c:
        frames = list(c.decode(video=0))
    assert [i for i, f in enumerate(frames) if f.key_frame] == list(range(0, N, 8))
    assert any(int(f.pict_type) == 3 for f in frames)                   # B-frames, as asked
