"""A video's length is what decodes: over-stated containers and streams cut mid-GOP are kept
(a note, a repair), short videos are sampled with repeated frames, real files written with PyAV."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:   # PyAV writes and reads every file here
    import av  # noqa: F401
except ImportError as _e:
    pytest.skip(f"PyAV is not importable: {_e}", allow_module_level=True)

from ivfast.config import load_config  # noqa: E402
from ivfast.data import DataError, build_index, build_loader  # noqa: E402
from ivfast.data.index import load_cache, probe  # noqa: E402
from ivfast.data.pyav import crop_resize, decode_frames  # noqa: E402
from ivfast.data.synth import cut_mid_gop, make_videos, overstated, read_frame_number  # noqa: E402

W, H = 96, 80
HIDDEN = 12        # frames the edit list hides: 40 listed, 28 decode


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lengths")
    src = make_videos(root / "src", 2, "h264", frames=40, size=(W, H), seed=5, gop=12)
    src60 = make_videos(root / "src", 1, "h264", frames=60, size=(W, H), seed=6, gop=25, prefix="long")[0]
    over = overstated(src[0], root / "over.mp4", hidden=HIDDEN)
    cut = cut_mid_gop(src60, root / "cut.mp4", keep=0.5)
    short = make_videos(root, 1, "vp9", frames=3, size=(W, H), seed=7, prefix="short")[0]
    good = make_videos(root / "good", 4, "vp9", frames=24, size=(W, H), seed=8)
    return {"root": root, "over": over, "cut": cut, "short": short, "good": good, "plain": src[1]}


def cfg_for(lst, tmp: Path, **data):
    over = [f"data.train_list={lst}", f"data.index_cache={tmp / 'idx.jsonl'}", "data.num_workers=0",
            "data.backend=pyav", "optim.batch_per_gpu=2"] + [f"data.{k}={v}" for k, v in data.items()]
    return load_config("demo", over)


def stamps(frames) -> list[int]:
    return [read_frame_number(f) for f in frames]


def test_files_really_have_the_property(files):
    """The container lists more than decodes; the cut stream ends inside a GOP."""
    o = av.open(str(files["over"]))
    assert o.streams.video[0].frames == 40
    assert sum(1 for _ in o.decode(o.streams.video[0])) == 40 - HIDDEN
    o.close()
    c = av.open(str(files["cut"]))
    assert c.streams.video[0].frames == 60
    with pytest.raises(av.error.FFmpegError):      # the partial last packet fails to decode
        for _ in c.decode(c.streams.video[0]):
            pass
    c.close()


def test_full_probe_counts_decodable_frames_and_notes_shortfall(files):
    over, cut = probe(str(files["over"]), full=True), probe(str(files["cut"]), full=True)
    assert over.ok and over.verified and over.frames == 40 - HIDDEN and over.container_frames == 40
    assert "28 frames decode, the container lists 40" in over.note
    assert cut.ok and cut.verified and 10 < cut.frames < 60 and cut.container_frames == 60 and cut.note
    quick = probe(str(files["over"]))                  # the quick probe trusts the container
    assert quick.ok and quick.frames == 40 and not quick.verified


def test_frame_exact_on_overstated_and_cut_files(files):
    n_cut = probe(str(files["cut"]), full=True).frames
    idx = [0, 5, 5, 27, 13]
    assert stamps(decode_frames(str(files["over"]), idx)) == [i + HIDDEN for i in idx]
    idx = [0, n_cut - 1, 3, n_cut - 2]
    assert stamps(decode_frames(str(files["cut"]), idx)) == idx
    for path, n in ((files["over"], 40 - HIDDEN), (files["cut"], n_cut)):
        with pytest.raises(Exception) as e:
            decode_frames(str(path), [1, n])            # one past the decodable end
        assert e.value.reason == "truncated" and e.value.decoded == n


@pytest.mark.parametrize("workers", [0, 1])
def test_quick_probe_stream_ending_early_is_repaired(tmp_path, files, workers):
    """Only the quick probe ran: the stream ends before the container's count. The length is
    clamped, the cache updated, the same video sampled again; a repair, not a bad file."""
    lst = tmp_path / "l.txt"
    lst.write_text(f"{files['over']}\n{files['cut']}\n")
    cfg = cfg_for(lst, tmp_path, verify="first", num_workers=workers)
    loader = build_loader(cfg)
    assert [i.frames for i in loader.dataset.index.infos] == [40, 60]       # what the containers say
    batches = list(loader)
    s = loader.bad_summary()
    assert s["bad_files"] == 0 and s["decode"] == {} and s["repaired"] == 2
    assert sorted(b for batch in batches for b in batch["index"].tolist()) == [0, 1]   # nothing replaced
    n_cut = probe(str(files["cut"]), full=True).frames
    assert [i.frames for i in loader.dataset.index.infos] == [40 - HIDDEN, n_cut]
    cached = load_cache(str(tmp_path / "idx.jsonl"))
    assert cached[str(files["over"])].frames == 40 - HIDDEN and cached[str(files["cut"])].frames == n_cut
    assert "the container lists 40" in cached[str(files["over"])].note
    # the batch is the re-planned clip of the same video, frame for frame
    batch = batches[0]
    for row, sid in enumerate(batch["index"].tolist()):
        plan = loader.dataset.plan(sid, 0, 0)
        frames = decode_frames(loader.path_of(sid), plan.frames)
        assert plan.frames.max() < loader.dataset.index.infos[sid].frames
        offset = HIDDEN if sid == 0 else 0
        assert stamps(frames) == [int(f) + offset for f in plan.frames]
        assert np.array_equal(batch["video"][row].numpy(), crop_resize(frames, plan, 56).numpy())
    # the next run reads the clamped lengths from the cache: no repair needed
    again = build_loader(cfg)
    assert [i.frames for i in again.dataset.index.infos] == [40 - HIDDEN, n_cut]
    list(again)
    assert again.bad_summary()["repaired"] == 0


def test_short_videos_sampled_with_repeats(tmp_path, files):
    lst = tmp_path / "l.txt"
    lst.write_text("".join(f"{f}\n" for f in [files["short"]] + files["good"][:3]))
    loader = build_loader(cfg_for(lst, tmp_path))
    s = loader.bad_summary()
    assert s["bad_files"] == 0 and s["short"] == 1 and s["samples"] == 4
    plan = loader.dataset.plan(0, 0, 0)                   # 3 frames, a 4-frame clip: one repeats
    assert len(plan.frames) == 4 and set(plan.frames.tolist()) <= {0, 1, 2} and len(set(plan.frames.tolist())) == 3
    assert stamps(decode_frames(str(files["short"]), plan.frames)) == plan.frames.tolist()
    ids = [i for b in loader for i in b["index"].tolist()]
    assert 0 in ids and loader.bad_summary()["decode"] == {}
    strict = build_loader(cfg_for(lst, tmp_path, min_frames=4, max_bad_fraction=0.5))
    assert strict.bad_summary()["index"] == {"too_few_frames": 1}


def test_inspect_shows_the_note_and_both_counts(files):
    out = subprocess.run([sys.executable, "-m", "ivfast.data", "inspect", str(files["over"]), str(files["cut"]), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr          # not bad
    recs = [json.loads(ln) for ln in out.stdout.splitlines()]
    assert recs[0]["frames"] == 40 - HIDDEN and recs[0]["container_frames"] == 40 and recs[0]["decodes"]
    assert recs[1]["frames"] < recs[1]["container_frames"] == 60 and recs[1]["note"]
    assert recs[2]["totals"]["bad"] == 0 and recs[2]["totals"]["noted"] == 2
    text = subprocess.run([sys.executable, "-m", "ivfast.data", "inspect", str(files["over"])],
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "ok (note: 28 frames decode, the container lists 40)" in text.stdout


def test_startup_data_problems_are_one_line(tmp_path, files):
    for lst, match in (("", "no data list given"), (str(tmp_path / "nope.txt"), "does not exist")):
        with pytest.raises(DataError, match=match) as e:
            build_loader(cfg_for(lst, tmp_path))
        assert "\n" not in str(e.value)
    lst = tmp_path / "l.txt"
    lst.write_text(f"{files['good'][0]}\n{tmp_path / 'missing.mp4'}\n")
    with pytest.raises(DataError, match="max_bad_fraction") as e:
        build_loader(cfg_for(lst, tmp_path))
    assert "\n" not in str(e.value)
