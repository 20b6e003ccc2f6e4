"""Frozen-probe evaluation: protocols, views, probes, k-NN, labels, cache, outputs."""
import json

import pytest
import torch

from ivfast.config import ConfigError, EncoderConfig
from ivfast.eval import run as eval_run
from ivfast.eval.config import EvalConfig, ProbeConfig, ViewConfig, load_eval_config, resolve
from ivfast.eval.data import LabelError, _crop, _window_frames, ViewSpec, check_labels, read_label_map
from ivfast.eval.probes import HeadGrid, QueryProbe, build_head, knn_predict
from ivfast.models.vit import VisionTransformer
from utils import labelled_lists

TINY = EncoderConfig(dim=32, depth=1, heads=2, patch_size=8, drop_path=0.0)


def tiny_encoder(frames=4, size=32, seed=0):
    torch.manual_seed(seed)
    enc = VisionTransformer(TINY, frames, size, attn_backend="math").eval().requires_grad_(False)
    enc.source = f"tiny-test-encoder(seed={seed})"
    return enc


@pytest.fixture(scope="module")
def appearance_lists(tmp_path_factory):
    """Red square vs blue square, drifting in random directions: an appearance-only task."""
    return labelled_lists(tmp_path_factory.mktemp("labelled"), 8, 4, classes=[6, 7])


# --------------------------------------------------------------------------- protocols
@pytest.mark.parametrize("protocol,dataset,views,lr,epochs", [
    ("ivnext", "kinetics", (16, 1, 3, "segment"), [3e-4], 20),
    ("ivnext", "ssv2", (16, 1, 3, "segment"), [1e-3], 30),
    ("vjepa", "kinetics", (16, 8, 3, "stride"), [1e-3], 20),
    ("vjepa", "ssv2", (16, 2, 3, "stride"), [1e-3], 20),
    ("vjepa2", "ssv2", (16, 2, 3, "stride"), [5e-3, 3e-3, 1e-3, 3e-4, 1e-4], 20),
])
def test_protocol_numbers_and_views(protocol, dataset, views, lr, epochs):
    c = resolve(EvalConfig(protocol=protocol, dataset=dataset))
    assert (c.views.num_frames, c.views.test_clips, c.views.test_crops, c.views.sampling) == views
    assert c.probe.lr == lr and c.probe.epochs == epochs
    if protocol == "ivnext":
        assert c.probe.betas == [0.9, 0.999] and c.probe.warmup_epochs == 5 and c.probe.global_batch == 1024
    if protocol.startswith("vjepa"):
        assert c.views.stride == 4
    if protocol == "vjepa":
        assert c.probe.weight_decay == [0.01] and c.probe.blocks == 1
    if protocol == "vjepa2":
        assert len(c.probe.lr) * len(c.probe.weight_decay) == 20 and c.probe.blocks == 4


def test_user_values_win_over_the_protocol_and_bad_keys_fail():
    c = load_eval_config("", ["protocol=vjepa", "probe.epochs=3", "views.test_clips=1", "probe.lr=[2e-3]"])
    c = resolve(c)
    assert (c.probe.epochs, c.views.test_clips, c.probe.lr) == (3, 1, [2e-3])
    assert c.probe.weight_decay == [0.01]                     # not set by the user: the protocol's
    with pytest.raises(ConfigError, match="unknown eval config key"):
        load_eval_config("", ["probe.epoch=3"])
    with pytest.raises(ConfigError, match="linear works on cached"):
        resolve(load_eval_config("", ["protocol=linear", "probe.features=online"]))


@pytest.mark.parametrize("kind,blocks", [("attentive_pool", 1), ("vjepa", 1), ("vjepa2", 4)])
def test_head_shapes(kind, blocks):
    grid = HeadGrid(lambda: build_head(kind, 32, 4, 7, blocks), [1e-3, 3e-4], [0.1, 0.01])
    x = torch.randn(5, 17, 32)
    assert grid(x).shape == (4, 5, 7)                          # [heads of the grid, B, classes]
    assert len(grid.param_groups()) == 8                       # decay / no-decay per head
    if kind != "attentive_pool":
        assert isinstance(grid.heads[0], QueryProbe) and len(grid.heads[0].self_blocks) == blocks - 1
    lin = build_head("linear", 32, 4, 7, mean=torch.zeros(32), std=torch.ones(32))
    assert lin(torch.randn(5, 32)).shape == (5, 7)


def test_test_views_cover_the_clip_in_time_and_space():
    spec = ViewSpec(num_frames=4, size=32, sampling="stride", stride=2, test_clips=2, test_crops=3)
    a, b = _window_frames(0, 40, spec, 0, 2), _window_frames(0, 40, spec, 1, 2)
    assert (a == [8, 10, 12, 14]).all() and (b == [25, 27, 29, 31]).all()     # room 33: starts 8 and 25
    seg = ViewSpec(num_frames=4, size=32, sampling="segment", test_clips=1)
    assert (_window_frames(0, 16, seg, 0, 1) == [2, 6, 10, 14]).all()
    assert [_crop(96, 80, k, 3) for k in range(3)] == [(0, 0, 80, 80), (8, 0, 80, 80), (16, 0, 80, 80)]
    assert _crop(80, 96, 0, 1) == (0, 8, 80, 80)


# --------------------------------------------------------------------------- k-NN, labels
def test_knn_matches_a_hand_computed_vote():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([[2.0, 0.2]])
    s = knn_predict(train, labels, q, num_classes=3, k=2, temperature=0.5)
    # cosines with q: 0.995, 0.0995, 0.7761, -0.995 -> neighbours 0 (class 0) and 2 (class 1)
    c0 = torch.tensor(2.0) / torch.tensor([2.0, 0.2]).norm()
    c2 = torch.tensor(2.2) / (torch.tensor([2.0, 0.2]).norm() * 2 ** 0.5)
    expected = torch.tensor([[torch.exp(c0 / 0.5), torch.exp(c2 / 0.5), 0.0]])
    torch.testing.assert_close(s, expected)
    assert knn_predict(train, labels, q, 3, k=20, temperature=0.5).shape == (1, 3)   # k capped at 4


def test_label_errors_name_the_cause(tmp_path):
    assert check_labels([0, 1, 2, 1], [2, 0, 1]) == 3
    with pytest.raises(LabelError, match="no label"):
        check_labels([0, -1, 1], [0, 1])
    with pytest.raises(LabelError, match="not contiguous"):
        check_labels([0, 2, 2], [0, 2])
    with pytest.raises(LabelError, match="class count differs"):
        check_labels([0, 1, 2], [0, 1, 3])
    with pytest.raises(LabelError, match="class count differs"):
        check_labels([0, 1, 2], [0, 1])
    with pytest.raises(LabelError, match="num_classes=5"):
        check_labels([0, 1], [0, 1], num_classes=5)
    m = tmp_path / "map.txt"
    m.write_text("0 walk\n1 run\n")
    assert read_label_map(str(m), 2) == ["walk", "run"]
    with pytest.raises(LabelError, match="one name per class"):
        read_label_map(str(m), 3)


def test_missing_labels_in_a_list_fail_clearly(appearance_lists, tmp_path):
    train, val, _ = appearance_lists
    unlabelled = tmp_path / "nolabels.csv"
    unlabelled.write_text("".join(l.split(",")[0] + "\n" for l in train.read_text().splitlines()[1:]))
    cfg = EvalConfig(protocol="knn", train_list=str(unlabelled), val_list=str(val), output_dir=str(tmp_path),
                     device="cpu", num_workers=0, views=ViewConfig(num_frames=4, img_size=32))
    with pytest.raises(LabelError, match="have no label"):
        eval_run.run_protocol(cfg, encoder=tiny_encoder())


# --------------------------------------------------------------------------- end to end
def test_attentive_probe_beats_chance_on_appearance_and_writes_outputs(appearance_lists, tmp_path):
    train, val, names = appearance_lists
    cfg = load_eval_config("", [f"train_list={train}", f"val_list={val}", f"label_map={names}",
                                f"output_dir={tmp_path}", "device=cpu", "num_workers=0", "protocol=ivnext",
                                "views.num_frames=4", "views.img_size=32", "views.test_crops=1",
                                "probe.features=cached", "probe.epochs=30", "probe.warmup_epochs=1",
                                "probe.lr=[3e-3]", "probe.global_batch=16", "probe.batch_per_gpu=16"])
    res = eval_run.run_protocol(cfg, encoder=tiny_encoder())
    assert res["num_classes"] == 2 and res["chance_top1"] == 50.0
    assert res["top1"] >= 87.5, res                            # 8 val clips: at most one wrong
    assert "no augmentation" in res["features"]
    out = tmp_path / "ivnext"
    saved = json.loads((out / "results.json").read_text())
    assert saved["probe"]["lr"] == [3e-3] and saved["views"]["num_frames"] == 4 and saved["protocol"] == "ivnext"
    assert set(saved["per_class_top1"]) == {"red_square", "blue_square"}
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 31 and lines[-1]["final"]
    from PIL import Image
    assert Image.open(out / "confusion.png").size[0] > 0
    assert any((out / "tensorboard").iterdir())


def test_knn_and_linear_reuse_cached_features(appearance_lists, tmp_path, monkeypatch):
    train, val, _ = appearance_lists
    base = dict(train_list=str(train), val_list=str(val), output_dir=str(tmp_path), device="cpu", num_workers=0)
    views = ViewConfig(num_frames=4, img_size=32, test_crops=1)
    calls = []
    real = eval_run.encode
    monkeypatch.setattr(eval_run, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    r1 = eval_run.run_protocol(EvalConfig(protocol="knn", **base, views=views, probe=ProbeConfig(knn_k=3)),
                               encoder=tiny_encoder())
    n_first = len(calls)
    assert n_first > 0 and r1["probe"]["knn_k"] == 3
    r2 = eval_run.run_protocol(EvalConfig(protocol="linear", **base, views=views, probe=ProbeConfig(epochs=5)),
                               encoder=tiny_encoder())
    assert len(calls) == n_first                               # same checkpoint + views: cache hit
    eval_run.run_protocol(EvalConfig(protocol="knn", **base, views=views, probe=ProbeConfig(knn_k=3)),
                          encoder=tiny_encoder(seed=1))          # other weights: a new key
    assert len(calls) > n_first
    assert 0.0 <= r2["top1"] <= 100.0


def test_online_vjepa2_grid_trains_on_augmented_views_and_says_best_of_val(appearance_lists, tmp_path):
    """The paper-style path: the encoder runs every step on augmented clips (train_augment=on),
    test views 2 clips x 3 crops, a 2 x 2 grid of heads; the pick is labelled as chosen on val."""
    train, val, _ = appearance_lists
    cfg = load_eval_config("", [f"train_list={train}", f"val_list={val}", f"output_dir={tmp_path}", "device=cpu",
                                "num_workers=0", "protocol=vjepa2", "dataset=ssv2", "views.num_frames=4",
                                "views.img_size=32", "views.stride=2", "probe.epochs=2", "probe.lr=[1e-3,1e-4]",
                                "probe.weight_decay=[0.1,0.01]", "probe.global_batch=8", "probe.batch_per_gpu=4",
                                "probe.blocks=2"])
    seen = []
    real = eval_run.encode
    eval_run_encode = lambda enc, clips, *a, **k: seen.append(tuple(clips.shape)) or real(enc, clips, *a, **k)
    import unittest.mock as um
    with um.patch.object(eval_run, "encode", eval_run_encode):
        res = eval_run.run_protocol(cfg, encoder=tiny_encoder())
    assert res["features"] == "online" and res["train_views"] == "train"
    assert sum(s[0] for s in seen if s[1:] == (6, 3, 4, 32, 32)) == 8   # every val clip: 2 clips x 3 crops
    assert sum(1 for s in seen if s[1] == 1) == 2 * 4            # 16 train clips / 4 per batch, 2 epochs
    assert len(res["grid"]) == 4 and "best of 4 heads chosen ON THE VAL SET" in res["selection"]
    assert res["top1"] == max(g["top1"] for g in res["grid"])
    assert eval_run.summary_line(res).count("ON THE VAL SET") == 1


@pytest.mark.slow
def test_torchrun_two_ranks_gloo_match_one_process(appearance_lists, tmp_path):
    """``torchrun -m ivfast.eval`` on 2 CPU ranks (gloo): clips sharded, features gathered, the
    same k-NN / linear numbers as one process; an online attentive probe runs with DDP heads."""
    import os
    import subprocess
    import sys
    from ivfast.checkpoint import save_checkpoint
    from ivfast.config import load_config

    train, val, _ = appearance_lists
    cfg = load_config("demo")
    torch.manual_seed(0)
    enc = VisionTransformer(cfg.model.encoder, cfg.model.num_frames, cfg.model.img_size, "math")
    ck = save_checkpoint(tmp_path / "ck", 1, {f"encoder.{k}": v for k, v in enc.state_dict().items()}, {}, cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    common = [f"checkpoint={ck}", f"train_list={train}", f"val_list={val}", "device=cpu", "num_workers=0",
              "views.num_frames=4", "views.img_size=28", "views.test_crops=1", "probe.epochs=3", "probe.knn_k=3"]
    results = {}
    for name, launcher in (("one", [sys.executable, "-m", "ivfast.eval"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                    "--master-port", "29561", "-m", "ivfast.eval"])):
        out = tmp_path / name
        res = subprocess.run(launcher + ["--protocols", "knn,linear"] + common + [f"output_dir={out}"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        results[name] = {p: json.loads((out / p / "results.json").read_text()) for p in ("knn", "linear")}
    for p in ("knn", "linear"):
        assert results["one"][p]["top1"] == results["two"][p]["top1"], p
        assert results["one"][p]["num_val"] == results["two"][p]["num_val"] == 8
    # 15 train clips, 7 a batch: unpadded shards would be 8 (2 batches) and 7 (1 batch) clips, and
    # rank 0's second DDP backward would wait for rank 1 forever
    odd = tmp_path / "train_odd.csv"
    odd.write_text("\n".join(train.read_text().splitlines()[:16]) + "\n")      # header + 15 clips
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29562", "-m", "ivfast.eval", "protocol=ivnext", "probe.global_batch=14",
                          "probe.batch_per_gpu=7", "probe.epochs=2", "probe.warmup_epochs=0"] + common
                         + [f"train_list={odd}", f"output_dir={tmp_path / 'ddp'}"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert json.loads((tmp_path / "ddp" / "ivnext" / "results.json").read_text())["num_val"] == 8


def test_cache_key_follows_the_weights_file(tmp_path, appearance_lists):
    """A run directory resolves to its newest checkpoint; rewriting the weights changes the key."""
    import os
    from safetensors.torch import save_file
    from ivfast.eval.data import LabelledClips
    enc = tiny_encoder()
    w = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(w))
    enc.weights_file = str(w)
    ds = LabelledClips(str(appearance_lists[0]), ViewSpec(4, 32), mode="center")
    cfg = EvalConfig()
    k1 = eval_run.cache_key(cfg, enc, ds, "mean")
    assert eval_run.cache_key(cfg, enc, ds, "mean") == k1
    assert eval_run.cache_key(cfg, enc, ds, "tokens") != k1
    os.utime(w, ns=(1, 1))
    assert eval_run.cache_key(cfg, enc, ds, "mean") != k1


def test_planted_feature_cache_is_refused_without_running_it(appearance_lists, tmp_path):
    """A cache file carrying a pickled payload: one-line refusal, the payload never runs."""
    import os
    train, val, _ = appearance_lists
    base = dict(train_list=str(train), val_list=str(val), output_dir=str(tmp_path), device="cpu", num_workers=0)
    cfg = EvalConfig(protocol="knn", **base, views=ViewConfig(num_frames=4, img_size=32, test_crops=1),
                     probe=ProbeConfig(knn_k=3))
    eval_run.run_protocol(cfg, encoder=tiny_encoder())
    cached = sorted((tmp_path / "feature_cache").glob("*.pt"))
    assert cached
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    for f in cached:
        torch.save({"feats": Payload(), "labels": torch.zeros(1)}, f)
    with pytest.raises(ValueError, match=r"feature cache: .*\.pt holds pickled objects other than tensors") as e:
        eval_run.run_protocol(cfg, encoder=tiny_encoder())
    assert "\n" not in str(e.value) and "delete it" in str(e.value)
    assert not marker.exists(), "the pickled payload ran"
