"""The plan step of ``python -m ivfast.data prepare``: the recommendation is the smallest measured
output that meets the budget with its margin (else the fastest), and a run without ``--gop``
follows it."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

try:
    import av  # noqa: F401
except ImportError as _e:
    pytest.skip(f"PyAV is not importable: {_e}", allow_module_level=True)

from ivfast.data import read_list  # noqa: E402
from ivfast.data.plan import Budget, Row, recommend  # noqa: E402
from ivfast.data.prepare import Job, is_small, prepare_one  # noqa: E402
from ivfast.data.__main__ import prepare_main  # noqa: E402
from ivfast.data.synth import make_videos  # noqa: E402

W, H, N = 96, 80, 50


def rows(*spec):
    return [Row(name, gop, size, speed) for name, gop, size, speed in spec]


def test_recommend_smallest_output_that_meets_the_budget_with_margin():
    r = rows(("gop 1", 1, 7.9, 55.0), ("gop 4", 4, 4.9, 40.0), ("gop 16", 16, 3.1, 16.0), ("keep", 0, 1.0, 6.0))
    # 36 clips/s per GPU from 8 cores: 4.5 per core, 6.75 with the 1.5x margin -> keep (6.0) falls short
    best, why = recommend(r, Budget(36, 8, 1.5))
    assert best.setting == "gop 16" and "\n" not in why and "gop 16" in why and "6.8" in why
    assert recommend(r, Budget(36, 8, 1.0))[0].setting == "keep"          # without the margin keep is enough
    assert recommend(r, Budget(36, 2, 1.5))[0].setting == "gop 4"         # 27 per core
    assert recommend(r, Budget(36, 1, 1.5))[0].setting == "gop 1"         # 54 per core: only all-intra
    same_size = rows(("a", 4, 2.0, 10.0), ("b", 16, 2.0, 12.0))
    assert recommend(same_size, Budget(8, 1, 1.0))[0].setting == "b"       # a size tie goes to the faster


def test_recommend_is_the_least_size_among_those_meeting_any_budget():
    rng = random.Random(1)
    for _ in range(300):
        r = [Row(f"s{i}", i + 1, rng.uniform(0.5, 9), rng.uniform(1, 60)) for i in range(rng.randint(1, 5))]
        b = Budget(rng.uniform(5, 80), rng.choice([2, 4, 8, 16]), rng.choice([1.0, 1.25, 1.5, 2.0]))
        best, _ = recommend(r, b)
        meeting = [x for x in r if x.clips_per_core >= b.clips_per_gpu * b.margin / b.cores_per_gpu]
        if meeting:
            assert best in meeting and best.size_ratio == min(x.size_ratio for x in meeting)
        else:
            assert best.clips_per_core == max(x.clips_per_core for x in r)


def test_recommend_when_nothing_meets_picks_the_fastest_and_says_so():
    best, why = recommend(rows(("gop 1", 1, 7.9, 50.0), ("gop 4", 4, 4.9, 35.0)), Budget(36, 1, 1.5))
    assert best.setting == "gop 1" and why.count("\n") == 0 and "NO setting" in why and "54.0" in why
    with pytest.raises(ValueError, match="at least one"):
        recommend([], Budget())


def test_cut_encode_and_small_sources(tmp_path):
    src = make_videos(tmp_path / "raw", 1, "h264b", frames=N, size=(W, H), seed=3, fps=25)[0]
    rec = prepare_one(Job(str(src), str(tmp_path / "cut.mp4"), 40, 4, 0.0, 20, "veryfast", max_seconds=1.0))
    assert rec["status"] == "done" and rec["frames"] == rec["frames_in"] == 25 and rec["cut"] and rec["cpu_s"] > 0
    kept = prepare_one(Job(str(src), str(tmp_path / "k.mp4"), 256, 4, 0.0, 20, "veryfast", keep_small=True))
    assert kept["status"] == "kept" and kept["dst"] == str(src) and kept["frames"] == N
    assert not (tmp_path / "k.mp4").exists()
    big = prepare_one(Job(str(src), str(tmp_path / "b.mp4"), 40, 4, 0.0, 20, "veryfast", keep_small=True))
    assert big["status"] == "done" and big["dst"] == str(tmp_path / "b.mp4")      # not small: re-encoded
    assert is_small(340, 256, 30, 256, 0) and not is_small(640, 360, 30, 256, 0) and not is_small(340, 256, 30, 256, 25)


@pytest.fixture
def run(capsys):
    """``python -m ivfast.data prepare ARGS`` in this process (no interpreter start per call)."""
    def call(*args):
        rc = prepare_main([str(a) for a in args])
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=out, stderr=err)
    return call


def keyframes(path):
    with av.open(path) as c:
        return [i for i, f in enumerate(c.decode(video=0)) if f.key_frame]


def test_plan_prints_table_and_a_run_without_gop_follows_it(tmp_path, run):
    make_videos(tmp_path / "raw", 3, "h264b", frames=N, size=(W, H), seed=4, fps=25, gop=250)
    out = tmp_path / "prep"
    common = ["--short-side", 40, "--plan-gops", "1,8", "--workers", 1]
    r = run(tmp_path / "raw", out, "--plan", "--clips-per-gpu", 1, *common)
    assert r.returncode == 0, r.stderr
    assert "size vs sources" in r.stdout and "gop 1 " in r.stdout and "gop 8 " in r.stdout and "keep" not in r.stdout
    assert "plan on 3 of 3 files" in r.stdout and "took" in r.stdout
    plan = json.loads((out / "prepare_plan.json").read_text())
    assert plan["choice"]["size_ratio"] == min(x["size_ratio"] for x in plan["rows"])    # all meet 1 clip/s
    assert not list(out.rglob("*.mp4"))                                                 # --plan writes no video
    # nothing meets a huge budget: the run takes the fastest GOP, says so, and its files have that GOP
    r = run(tmp_path / "raw", out, "--clips-per-gpu", 1e6, *common)
    assert r.returncode == 0, r.stderr
    plan = json.loads((out / "prepare_plan.json").read_text())
    fastest = max(plan["rows"], key=lambda x: x["clips_per_core"])
    line = next(x for x in r.stdout.splitlines() if x.startswith("plan: "))
    assert "NO setting" in line and plan["choice"]["gop"] == fastest["gop"]
    g = fastest["gop"]
    new = read_list(out / "list.csv")
    assert len(new) == 3 and all(keyframes(e.path) == list(range(0, N, g)) for e in new)
    assert "3 encoded by the plan" in r.stdout and "bytes in ->" in r.stdout
    assert "clips per CPU-second" in r.stdout and not (out / ".plan").exists()
    again = run(tmp_path / "raw", out, "--clips-per-gpu", 1e6, *common)         # resumed: same choice, no plan
    assert "chosen by the earlier run" in again.stdout and "size vs sources" not in again.stdout
    assert "3 already done" in again.stdout


def test_small_sources_are_kept_when_fast_enough(tmp_path, run):
    raw = make_videos(tmp_path / "raw", 2, "h264b", frames=N, size=(W, H), seed=5, fps=25, gop=250)
    out = tmp_path / "prep"
    r = run(tmp_path / "raw", out, "--clips-per-gpu", 0.01, "--plan-gops", "4", "--workers", 1)
    assert r.returncode == 0, r.stderr
    assert "plan: keep: the smallest output (1.00x" in r.stdout and "larger sources get gop 4" in r.stdout
    assert "2 kept as they are" in r.stdout
    assert sorted(e.path for e in read_list(out / "list.csv")) == sorted(str(p) for p in raw)
    assert not list(out.rglob("*.mp4"))


def test_plan_argument_problems_are_one_line(tmp_path, run):
    make_videos(tmp_path / "raw", 1, "h264b", frames=8, size=(W, H), seed=6)
    for bad in (["--plan-gops", "x"], ["--plan-gops", "0,4"], ["--margin", 0], ["--cores-per-gpu", -1],
                ["--config", "nope"]):
        r = run(tmp_path / "raw", tmp_path / "out", *bad)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: "), r.stderr
        assert not (tmp_path / "out" / ".plan").exists()                  # no trial encodes left behind


def test_clips_per_cpu_second_times_with_one_torch_thread():
    # idle intra-op threads spin and count as CPU time: the timing runs as a DataLoader worker does
    import torch

    from ivfast.data.plan import clips_per_cpu_second

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    try:
        speed = clips_per_cpu_second({"a": lambda i: seen.append(torch.get_num_threads())}, 3, rounds=2)
        assert set(seen) == {1} and len(seen) == 1 + 3 * 2 and speed["a"] > 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_cut_sample_is_compared_with_its_share_of_the_source():
    from ivfast.data.plan import _share

    info = SimpleNamespace(frames=300)
    assert _share({"cut": True, "frames_in": 75}, info) == 0.25          # first 75 of 300 frames encoded
    assert _share({"cut": False, "frames_in": 300}, info) == 1.0
    assert _share({"cut": True, "frames_in": 75}, SimpleNamespace(frames=0)) == 1.0    # length unknown: whole
