"""Tar shards (``prepare --shards``, ``ivfast.data.shards``): webdataset layout, frame-exact reads
in place, the same batches as the plain prepared list, exact resume, bad members handled as bad
files, a missing shard as one clear error."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import av  # noqa: F401
except ImportError as _e:
    pytest.skip(f"PyAV is not importable: {_e}", allow_module_level=True)

from ivfast.config import load_config  # noqa: E402
from ivfast.data import DataError, Entry, build_index, build_loader, read_list  # noqa: E402
from ivfast.data.pyav import decode_frames  # noqa: E402
from ivfast.data.index import write_list  # noqa: E402
from ivfast.data.shards import pack  # noqa: E402
from ivfast.data.sources import Member, MemberFile, open_video, read_array  # noqa: E402
from ivfast.data.synth import make_videos, read_frame_number  # noqa: E402

W, H, N = 96, 80, 40


def stamps(frames) -> list[int]:
    return [read_frame_number(f) for f in frames]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Raw Kinetics-like clips (B-frames, one keyframe) through ``prepare --shards`` (CLI)."""
    root = tmp_path_factory.mktemp("shards")
    raw = make_videos(root / "raw", 5, "h264b", frames=N, size=(W, H), seed=11, gop=250)
    lst = root / "train.csv"
    lst.write_text("path,label,source\n" + "".join(f"{p},{i},k400\n" for i, p in enumerate(raw)))
    out = root / "prep"
    r = subprocess.run([sys.executable, "-m", "ivfast.data", "prepare", str(lst), str(out), "--short-side", str(H),
                        "--gop", "8", "--workers", "1", "--shards", "0.05"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"packed 5 samples into (\d+) shards \(\1 written, 0 kept\)", r.stdout), r.stdout
    return {"root": root, "raw": raw, "list": lst, "out": out, "plain": out / "list.csv",
            "sharded": out / "shards.csv", "stdout": r.stdout}


def cfg_for(lst, tmp: Path, **data):
    over = [f"data.train_list={lst}", f"data.index_cache={tmp / (Path(lst).stem + '.idx.jsonl')}",
            "data.num_workers=0", "data.backend=pyav", "optim.batch_per_gpu=2"]
    return load_config("demo", over + [f"data.{k}={v}" for k, v in data.items()])


# --------------------------------------------------------------------------- layout and list
def test_webdataset_layout_and_member_list(prepared):
    tars = sorted((prepared["out"] / "shards").glob("shard-*.tar"))
    assert len(tars) >= 2 and [t.name for t in tars][:2] == ["shard-000000.tar", "shard-000001.tar"]
    assert not list(prepared["out"].rglob("*.tmp*"))
    rows = list(csv.DictReader(open(prepared["sharded"])))
    plain = read_list(prepared["plain"])
    assert len(rows) == len(plain) == 5
    keys = []
    for t in tars:
        with tarfile.open(t, "r:") as tf:                      # plain uncompressed tar
            ms = tf.getmembers()
            assert all(m.isfile() and m.mtime == 0 for m in ms)
            names = [m.name for m in ms]
            # webdataset: each sample's members are consecutive and share the key before the first dot
            ks = list(dict.fromkeys(n.split(".")[0] for n in names))
            assert names == [f"{k}.{ext}" for k in ks for ext in ("mp4", "json", "cls")]
            for k in ks:
                meta = json.loads(tf.extractfile(f"{k}.json").read())
                assert tf.extractfile(f"{k}.cls").read().decode() == str(meta["label"])
                assert meta["source"] == "k400" and meta["frames"] == N
            keys += ks
    assert len(set(keys)) == 5 and keys == sorted(keys)        # unique, in list order
    for row, e in zip(rows, plain):
        tar, name = row["path"].rsplit("#", 1)
        assert name.startswith(keys[plain.index(e)]) and name.endswith(".mp4")
        with open(tar, "rb") as f:                             # offset/size: the member's bytes, in place
            f.seek(int(row["offset"]))
            assert f.read(int(row["size"])) == Path(e.path).read_bytes()
    sharded = read_list(prepared["sharded"])
    assert [(e.label, e.source) for e in sharded] == [(e.label, e.source) for e in plain]
    assert all(e.offset > 0 and e.size > 0 for e in sharded)


def test_rerun_keeps_shards_and_member_view_is_bounded(prepared, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in (prepared["out"] / "shards").glob("*.tar")}
    r = subprocess.run([sys.executable, "-m", "ivfast.data", "prepare", str(prepared["list"]), str(prepared["out"]),
                        "--short-side", str(H), "--gop", "8", "--workers", "1", "--shards", "0.05"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"0 written, {len(before)} kept" in r.stdout, r.stdout + r.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before
    m = build_index(str(prepared["sharded"]), cache_path=str(tmp_path / "i.jsonl")).infos[1].source()
    assert isinstance(m, Member)
    data = Path(read_list(prepared["plain"])[1].path).read_bytes()
    with MemberFile(m.tar, m.offset, m.size) as f:
        assert f.read() == data and f.read(10) == b"" and f.tell() == m.size
        f.seek(-5, io.SEEK_END)
        assert f.read(100) == data[-5:]                    # never past the member's end
        f.seek(m.size + 1000)
        assert f.read(10) == b""
        with pytest.raises(OSError):
            f.seek(-1)
    assert read_array(m).tobytes() == data                 # what the DALI backend is fed


# --------------------------------------------------------------------------- frame-exact, loader
def test_frame_exact_through_shards(prepared, tmp_path):
    idx = build_index(str(prepared["sharded"]), cache_path=str(tmp_path / "i.jsonl"), full=True)
    plain = read_list(prepared["plain"])
    assert all(i.ok and i.verified and i.frames == N for i in idx.infos)
    want = [0, 17, 33, 39, 17, 2]                          # seeks (GOP 8) and repeats
    for info, e in zip(idx.infos, plain):
        got = decode_frames(info.source(), want)
        assert stamps(got) == want, info.path
        assert np.array_equal(got, decode_frames(e.path, want))
    with open_video(f"{idx.infos[0].path}") as c:          # a tar#member path alone is found in the tar
        assert stamps(f.to_ndarray(format="rgb24") for f in c.decode(video=0)) == list(range(N))


def test_same_batches_as_plain_list_and_exact_resume(prepared, tmp_path):
    plain = build_loader(cfg_for(prepared["plain"], tmp_path), rank=1, world_size=2)
    sharded = build_loader(cfg_for(prepared["sharded"], tmp_path), rank=1, world_size=2)
    assert sharded.path_of(0).endswith(".mp4") and "#" in sharded.path_of(0)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        sharded.set_epoch(epoch)
        a, b = list(plain), list(sharded)
        assert len(a) == len(b) == 2
        for x, y in zip(a, b):
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["video"], y["video"])
    # resume mid-epoch from the shards: the next batch, pixels included
    sharded.set_epoch(0)
    ref = [(b["index"].clone(), b["video"].clone()) for b in sharded]
    first = build_loader(cfg_for(prepared["sharded"], tmp_path), rank=1, world_size=2)
    it = iter(first)
    next(it)
    state = first.state_dict()
    resumed = build_loader(cfg_for(prepared["sharded"], tmp_path), rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    rest = list(resumed)
    assert len(rest) == 1 and torch.equal(rest[0]["index"], ref[1][0]) and torch.equal(rest[0]["video"], ref[1][1])


def test_dali_backend_is_fed_member_bytes(prepared, tmp_path):
    """DALI decodes bytes handed to it: for shard members those are read from the tar (simulated
    decoder: DALI is not installed here)."""
    loader = build_loader(cfg_for(prepared["sharded"], tmp_path))
    plain = read_list(prepared["plain"])
    fed = []

    class FakeDali:
        codecs = frozenset({"h264"})

        def decode(self, data, plans):
            fed.extend(d.tobytes() for d in data)
            return torch.zeros((len(plans), 3, 4, 56, 56), dtype=torch.uint8)

    loader.backend, loader.dali = "dali", FakeDali()
    ids = [i for b in loader for i in b["index"].tolist()]
    files = {Path(e.path).read_bytes() for e in plain}
    assert len(fed) == len(ids) == 6 and set(fed) <= files and len(set(fed)) == 5


# --------------------------------------------------------------------------- damage
def _copy_shards(prepared, dst: Path) -> tuple[Path, list]:
    """Pack the prepared files again into ``dst`` (one sample per shard), for damaging."""
    samples = [Entry(e.path, e.label, e.source) for e in read_list(prepared["plain"])]
    lst, _ = pack(samples, str(dst), shard_mb=1e-6, verify=False, progress=False)
    return Path(lst), read_list(lst)


def test_corrupt_member_is_a_bad_sample_and_cut_shard_a_bad_file(prepared, tmp_path, caplog):
    lst, entries = _copy_shards(prepared, tmp_path / "d")
    bad = entries[2]
    with open(bad.path.rsplit("#", 1)[0], "r+b") as f:   # scramble the middle of a member in place
        a, b = bad.offset + int(bad.size * 0.25), bad.offset + int(bad.size * 0.9)
        f.seek(a)
        f.write(np.random.default_rng(0).integers(0, 256, b - a, dtype=np.uint8).tobytes())
    loader = build_loader(cfg_for(lst, tmp_path, max_bad_fraction=0.5))
    assert loader.bad_summary()["samples"] == 5               # the quick probe passes it
    ids = [i for b in loader for i in b["index"].tolist()]
    s = loader.bad_summary()
    assert 2 not in ids and len(ids) == 6                      # replaced, batches keep their shape
    assert s["decode"].get("decode_error", 0) >= 1 and s["examples"]["decode_error"] == [bad.path]
    assert any(bad.path in r.message for r in caplog.records)
    # a shard cut short (an interrupted upload): that member is a bad file at index time
    cut = entries[4]
    tar = Path(cut.path.rsplit("#", 1)[0])
    tar.write_bytes(tar.read_bytes()[:cut.offset + cut.size // 2])
    loader = build_loader(cfg_for(lst, tmp_path, max_bad_fraction=0.5, index_cache=str(tmp_path / "i2.jsonl")))
    s = loader.bad_summary()
    assert s["index"] == {"truncated": 1} and s["samples"] == 4 and s["examples"]["truncated"] == [cut.path]
    r = subprocess.run([sys.executable, "-m", "ivfast.data", "inspect", str(lst), "--json"],
                       capture_output=True, text=True, timeout=120)
    recs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert r.returncode == 1 and recs[-1]["totals"]["bad_by_reason"] == {"decode_error": 1, "truncated": 1}


def test_missing_shard_is_one_line_error_and_cache_key_has_byte_range(prepared, tmp_path):
    lst, entries = _copy_shards(prepared, tmp_path / "d")
    cache = tmp_path / "c.jsonl"
    assert build_index(str(lst), cache_path=str(cache)).probed == 5
    # same path, another byte range (e.g. shards rewritten): probed again, not taken from the cache
    rows = lst.read_text().splitlines()
    head, first = rows[0], rows[1].split(",")
    first[5] = str(int(first[5]) + 512)
    moved = tmp_path / "moved.csv"
    moved.write_text("\n".join([head, ",".join(first)] + rows[2:]) + "\n")
    again = build_index(str(moved), cache_path=str(cache))
    assert again.probed == 1 and not again.infos[0].ok and all(i.ok for i in again.infos[1:])
    gone = Path(entries[3].path.rsplit("#", 1)[0])
    gone.unlink()
    with pytest.raises(DataError, match=f"shard {gone} does not exist") as e:
        build_loader(cfg_for(lst, tmp_path))
    assert "\n" not in str(e.value) and "1 of 5 shards" in str(e.value)
    shutil.rmtree(tmp_path / "d")


def test_train_with_a_missing_shard_ends_with_one_line(tmp_path):
    lst = tmp_path / "l.csv"
    lst.write_text(f"path,label,offset,size\n{tmp_path / 'gone' / 'shard-000000.tar'}#000000_a.mp4,1,512,100\n")
    r = subprocess.run([sys.executable, "-m", "ivfast.train", "--config", "demo", f"runtime.output_dir={tmp_path / 'run'}",
                        "demo=false", f"data.train_list={lst}"], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ivfast.train: data error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and "shard-000000.tar does not exist" in lines[0]


def test_shard_cli_packs_a_list_as_it_is(prepared, tmp_path):
    out = tmp_path / "packed"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "shard-000000.tar.tmp999").write_bytes(b"half a shard")   # an interrupted run
    (out / "shards" / "shard-000007.tar").write_bytes(b"")                      # from a longer plan
    r = subprocess.run([sys.executable, "-m", "ivfast.data", "shard", str(prepared["list"]), str(out),
                        "--shard-mb", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "packed 5 samples into 1 shards (1 written, 0 kept)" in r.stdout, r.stderr
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-000000.tar"]
    entries = read_list(out / "shards.csv")
    assert [e.label for e in entries] == list(range(5))
    m = build_index(str(out / "shards.csv"), cache_path=str(tmp_path / "i.jsonl")).infos[3].source()
    assert stamps(decode_frames(m, [39, 0, 20])) == [39, 0, 20]      # the raw file, B-frames, one keyframe
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{tmp_path / 'nope.mp4'} 1\n")
    r = subprocess.run([sys.executable, "-m", "ivfast.data", "shard", str(bad), str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0, r.stderr


def test_list_format_has_no_frames_column(tmp_path):
    """An entry's ``frames`` (what packing checks) is not a list column: shards.csv keeps its format."""
    lst = tmp_path / "shards.csv"
    write_list(str(lst), [Entry("/d/shard-000000.tar#000000_a.mp4", 3, "k400", -1.0, -1.0, 1536, 20480, frames=7),
                          Entry("/d/shard-000000.tar#000001_b.mp4", offset=23552, size=512)])
    assert lst.read_bytes() == (b"path,label,source,start_sec,end_sec,offset,size\r\n"
                                b"/d/shard-000000.tar#000000_a.mp4,3,k400,-1.0,-1.0,1536,20480\r\n"
                                b"/d/shard-000000.tar#000001_b.mp4,-1,,-1.0,-1.0,23552,512\r\n")
