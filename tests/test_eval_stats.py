"""Evaluation statistics: CIs, seeds, the converged linear fit, standardised k-NN, class groups,
the demo's pretrained-vs-random gap."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ivfast.config import EncoderConfig
from ivfast.eval import run as eval_run
from ivfast.eval.config import EvalConfig, ProbeConfig, ViewConfig, load_eval_config, overridden
from ivfast.eval.data import label_groups, read_label_map
from ivfast.eval.metrics import bootstrap_ci, gain_ci
from ivfast.eval.probes import LinearProbe, fit_linear
from ivfast.models.vit import VisionTransformer
from utils import labelled_lists


def test_bootstrap_ci_brackets_the_mean_with_the_binomial_width():
    c = np.array([1, 0] * 500)                     # 1000 clips, 50 %
    lo, hi = bootstrap_ci(c)
    half = 1.96 * np.sqrt(0.25 / 1000) * 100       # 3.1 points
    assert lo < 50 < hi and abs((hi - lo) / 2 - half) < 0.5
    assert bootstrap_ci(np.ones(50)) == (100.0, 100.0)
    two_seeds = np.stack([c, 1 - c])                # every clip right for one seed of two: 50 % each
    assert bootstrap_ci(two_seeds) == (50.0, 50.0)


def test_gain_ci_is_paired_over_clips_and_counts_seed_spread():
    rng = np.random.default_rng(0)
    base = (rng.random((1, 400)) < 0.5).astype(int)
    same = gain_ci(base, base)
    assert same["gain"] == 0 and same["ci"] == [0.0, 0.0]           # paired: no clip noise
    better = gain_ci(np.ones((3, 400)), base)
    assert better["ci"][0] > 40
    # seeds that disagree widen the interval even over the same clips
    noisy_a = np.stack([np.ones(400), np.zeros(400)])
    wide = gain_ci(noisy_a, np.full((2, 400), 0.5))
    assert wide["ci"][0] < -10 and wide["ci"][1] > 10
    with pytest.raises(ValueError, match="same clips"):
        gain_ci(np.ones((2, 10)), np.ones((2, 11)))


def test_linear_fit_converges_is_seed_free_and_beats_a_short_adamw_run():
    """L-BFGS reaches max |grad| <= 1e-6 on the regularised logistic loss; 160 AdamW steps (the
    old demo schedule) stop well above that objective."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    y = torch.randint(0, 8, (256,), generator=g)
    x[:, :8] += 1.5 * torch.nn.functional.one_hot(y, 8)
    fits = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        head = LinearProbe(64, 8, x.mean(0), x.std(0))
        fits.append((fit_linear(head, x, y, 1e-3), head.fc.weight.clone()))
    (f, w0), (_, w1) = fits
    assert f["converged"] and f["grad_max"] <= 1e-6 and torch.equal(w0, w1)
    head = LinearProbe(64, 8, x.mean(0), x.std(0))
    opt = torch.optim.AdamW(head.fc.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(160):
        idx = torch.randperm(256, generator=g)[:32]
        loss = torch.nn.functional.cross_entropy(head(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        adam = torch.nn.functional.cross_entropy(head(x), y) + 0.5e-3 * head.fc.weight.pow(2).sum()
    assert f["loss"] < float(adam) - 0.1


def test_label_groups_from_a_text_map(tmp_path):
    m = tmp_path / "labels.txt"
    m.write_text("0 move right @motion\n1 red square @appearance\n2 move left @motion\n")
    assert read_label_map(str(m), 3) == ["move right", "red square", "move left"]
    assert label_groups(str(m), 3) == {"motion": [0, 2], "appearance": [1]}
    m.write_text("0 walk\n1 run\n")
    assert label_groups(str(m), 2) == {}


def test_replaced_protocol_values_are_listed():
    cfg = load_eval_config("", ["protocol=ivnext", "dataset=ssv2", "probe.epochs=40", "probe.lr=[1e-3]"])
    assert overridden(cfg) == {"probe.epochs": [30, 40]}          # lr equals the protocol's: not listed


def test_help_names_protocols_and_datasets():
    out = subprocess.run([sys.executable, "-m", "ivfast.eval", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in ("ivnext", "vjepa2", "linear", "knn", "kinetics", "ssv2", "demo"):
        assert name in out


@pytest.fixture(scope="module")
def two_class_lists(tmp_path_factory):
    return labelled_lists(tmp_path_factory.mktemp("two"), 6, 6, classes=[0, 6])


def test_knn_votes_on_standardised_features(two_class_lists, tmp_path, monkeypatch):
    """k-NN compares features standardised with the train set's mean and std (a large shared
    offset, such as a background direction, would otherwise dominate every cosine); the result
    carries a CI and the label map's class groups."""
    train, val, labels = two_class_lists
    seen = {}

    def fake_extract(cfg, encoder, ds, device, pool, cache_dir, desc):
        y = torch.tensor(ds.labels)
        g = torch.Generator().manual_seed(len(desc))
        x = torch.randn(len(y), 1, 16, generator=g)
        x[:, 0, 0] += 4 * (2 * y - 1).float()                               # class signal
        x[:, 0, 1] += 100                                                   # shared offset
        return x, y

    real_knn = eval_run.knn_predict
    monkeypatch.setattr(eval_run, "extract", fake_extract)
    monkeypatch.setattr(eval_run, "knn_predict",
                        lambda tr, *a, **k: seen.setdefault("train", tr) is None or real_knn(tr, *a, **k))
    enc = VisionTransformer(EncoderConfig(dim=16, depth=1, heads=2, patch_size=8, drop_path=0.0), 4, 32, "math")
    enc.source = "fake"
    cfg = EvalConfig(protocol="knn", train_list=str(train), val_list=str(val), label_map=str(labels),
                     output_dir=str(tmp_path), device="cpu", num_workers=0,
                     views=ViewConfig(num_frames=4, img_size=32, test_crops=1), probe=ProbeConfig(knn_k=3))
    res = eval_run.run_protocol(cfg, encoder=enc)
    tr = seen["train"]
    assert tr.mean(0).abs().max() < 1e-4 and (tr.std(0) - 1).abs().max() < 1e-4
    lo, hi = res["top1_ci95"]
    assert lo <= res["top1"] <= hi
    assert set(res["group_top1"]) == {"motion", "appearance"}


@pytest.mark.slow
def test_eval_demo_prints_the_gap_with_a_ci_per_group(tmp_path):
    """The eval demo end to end at toy size: one pretrained and two random-init encoders, two
    probe protocols, a gain with its CI overall and per class group, written to demo_summary.json."""
    from ivfast.checkpoint import save_checkpoint
    from ivfast.config import load_config

    cfg = load_config("demo")
    torch.manual_seed(0)
    enc = VisionTransformer(cfg.model.encoder, cfg.model.num_frames, cfg.model.img_size, "math")
    ck = save_checkpoint(tmp_path / "ck", 1, {f"encoder.{k}": v for k, v in enc.state_dict().items()}, {}, cfg)
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "ivfast.eval", "--config", "demo", f"checkpoint={ck}",
                        f"output_dir={out}", "demo_per_class=3", "demo_val_per_class=3",
                        "demo_protocols=[linear,knn]", "random_init_seeds=[1,2]", "probe.knn_k=3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gain all" in r.stdout and "motion" in r.stdout and "appearance" in r.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    for proto in ("linear", "knn"):
        g = summary["gains"][proto]
        assert set(g) == {"all", "motion", "appearance"}
        assert g["all"]["ci"][0] <= g["all"]["gain"] <= g["all"]["ci"][1] and g["all"]["runs"] == [1, 2]
    assert sum(1 for r in summary["runs"] if r["protocol"] == "linear") == 3
