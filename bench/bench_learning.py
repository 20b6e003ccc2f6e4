"""Does pretraining learn? A CPU convergence benchmark: pretrained encoders against random inits.

    python bench/bench_learning.py                       # 3 pretraining seeds, ~15 min on 2 cores
    python bench/bench_learning.py --quick               # a smoke run at toy sizes (a test runs it)

The demo's tiny model (``ivfast/configs/demo.yaml``) pretrains on unlabelled clips drawn like the
eval demo's labelled ones: stage 1 per seed, then stage 2 from it once per context trim
(``masking.trim`` lowest, the released default, and random). Frozen probes (linear, k-NN,
attentive) compare each pretrained arm with random-init encoders of the same architecture; the
gain carries a 95 % CI by a bootstrap over val clips and over the runs of both arms, overall and
per class group (appearance, motion). It also records whether the stage-1 diffusion decoder uses
its per-patch condition (``ivfast.train.stage1_condition_check`` on 16 clips: eps-MSE on the same
noise with the true conditions, shuffled across patches and zeroed, and the gap's 95 % CI).

Writes JSON (gains, CIs, per-run top-1, decoder diagnostics, targets met, runtime, versions) to
``bench/results/learning_cpu.json`` unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ivfast.config import load_config
from ivfast.eval.config import EvalConfig, ProbeConfig, ViewConfig
from ivfast.eval.data import label_groups
from ivfast.eval.metrics import gains_by_group
from ivfast.eval.recon import describe_condition_check
from ivfast.eval.run import run_protocol
from ivfast.eval.synth_labels import make_labelled_clips
from ivfast.models.release_weights import load_encoder
from ivfast.train import demo_stage2_config, stage1_condition_check
from ivfast.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"linear": 10.0, "knn": 5.0}     # stage-1 gain (points) whose CI must also exclude 0


def _base_overrides(args, seed: int, unlabelled: Path) -> list[str]:
    return ["demo=false", f"data.train_list={unlabelled}", f"runtime.seed={seed}", "runtime.log_every=50",
            f"optim.epochs={args.stage1_epochs}", "runtime.ckpt_every=100000", *args.set]


def pretrain(args, seed: int, unlabelled: Path, work: Path) -> tuple[Path, dict[str, Path], dict]:
    """Stage 1 (seed), then stage 2 from it per trim; returns the checkpoints and the diagnostics."""
    base = _base_overrides(args, seed, unlabelled)
    cfg1 = load_config("demo", base + [f"runtime.output_dir={work / f'seed{seed}' / 'stage1'}"])
    t1 = Trainer(cfg1)
    ck1 = t1.fit()
    diag = stage1_condition_check(t1)
    ck2 = {}
    for trim in args.trims:
        c = load_config("demo", base + [f"runtime.output_dir={work / f'seed{seed}' / f'stage2_{trim}' / 'stage1'}",
                                         f"masking.trim={trim}", f"optim.epochs={args.stage2_epochs}"])
        ck2[trim] = Trainer(demo_stage2_config(c, ck1)).fit()
    return ck1, ck2, diag


def pretrain_ablated(args, seed: int, unlabelled: Path, work: Path, override: str) -> Path:
    """Stage 1 of ``seed`` with one more override (``--ablate``): same data, seed and schedule."""
    name = override.replace("=", "_").replace("/", "_")
    cfg = load_config("demo", _base_overrides(args, seed, unlabelled)
                      + [override, f"runtime.output_dir={work / f'seed{seed}' / f'ablate_{name}'}"])
    return Trainer(cfg).fit()


def _gain_line(by_group: dict) -> str:
    return "   ".join(f"{k} {v['gain']:+5.1f} [{v['ci'][0]:+.1f}, {v['ci'][1]:+.1f}]" for k, v in by_group.items())


def probe(args, arm: str, checkpoint: Path, random_seed: int | None, lists, protocol: str, out: Path) -> dict:
    train, val, labels = lists
    cfg = EvalConfig(protocol=protocol, dataset="ssv2", checkpoint=str(checkpoint), train_list=str(train),
                     val_list=str(val), label_map=str(labels), output_dir=str(out), device="cpu", num_workers=0,
                     random_init=random_seed is not None, random_init_seed=random_seed or 1,
                     probe_seeds=list(range(args.probe_seeds)) if protocol not in ("linear", "knn") else [0],
                     views=ViewConfig(num_frames=4, img_size=56, test_crops=1),
                     probe=ProbeConfig(features="cached", epochs=args.attentive_epochs, warmup_epochs=2,
                                       global_batch=32, batch_per_gpu=32))
    enc = load_encoder(str(checkpoint), num_frames=4, img_size=56, random_init=random_seed is not None,
                       seed=random_seed or 1)
    res = run_protocol(cfg, encoder=enc, tag=f"{protocol}_{arm}")
    return {"top1": res["top1"], "top1_ci95": res["top1_ci95"], "val_correct": res["val_correct"],
            "val_labels": res["val_labels"], "group_top1": {g: v["top1"] for g, v in res["group_top1"].items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="pretraining seeds")
    ap.add_argument("--random-seeds", type=int, default=3, help="random-init encoders (seeds 1001...)")
    ap.add_argument("--probe-seeds", type=int, default=3, help="attentive-probe seeds per encoder")
    ap.add_argument("--stage1-epochs", type=int, default=5, help="epochs of the unlabelled clips (80 steps each)")
    ap.add_argument("--stage2-epochs", type=int, default=2)
    ap.add_argument("--trims", default="lowest,random", help="stage-2 context trims to compare")
    ap.add_argument("--protocols", default="linear,knn,ivnext")
    ap.add_argument("--unlabelled-per-class", type=int, default=40)
    ap.add_argument("--train-per-class", type=int, default=32)
    ap.add_argument("--val-per-class", type=int, default=128)
    ap.add_argument("--attentive-epochs", type=int, default=40)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a training-config override for every run (repeatable), e.g. model.decoder.adaln_init_std=0.02")
    ap.add_argument("--ablate", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra stage-1 arm per seed with this override (repeatable), reported against "
                         "random init and against the plain stage-1 arm, e.g. model.diffusion_loss_weight=0")
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks the pipeline, measures nothing")
    ap.add_argument("--work", default="", help="scratch folder (default: a new one under /tmp)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "learning_cpu.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.random_seeds, args.probe_seeds = 1, 2, 1
        args.stage1_epochs, args.stage2_epochs, args.attentive_epochs = 1, 1, 2
        args.unlabelled_per_class, args.train_per_class, args.val_per_class = 2, 3, 3
    args.trims = [t for t in args.trims.split(",") if t]
    protocols = [p for p in args.protocols.split(",") if p]
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.time()
    import tempfile
    work = Path(args.work or tempfile.mkdtemp(prefix="ivfast-learning-"))
    clips = work / "clips"
    unl = make_labelled_clips(clips, args.unlabelled_per_class, frames=16, size=64, split="unlabelled")
    unlabelled = work / "unlabelled.csv"
    unlabelled.write_text("".join(f"{ln.split(',')[0]}\n" for ln in unl.read_text().splitlines()[1:]))
    lists = (make_labelled_clips(clips, args.train_per_class, frames=16, size=64, split="train"),
             make_labelled_clips(clips, args.val_per_class, frames=16, size=64, split="val"), clips / "labels.txt")

    arms: dict[str, list[Path]] = {"stage1": []}
    arms.update({f"stage2_{t}": [] for t in args.trims})
    arms.update({f"stage1[{o}]": [] for o in args.ablate})
    diagnostics = []
    t_pre = time.time()
    for seed in range(args.seeds):
        ck1, ck2, diag = pretrain(args, seed, unlabelled, work)
        arms["stage1"].append(ck1)
        for t, ck in ck2.items():
            arms[f"stage2_{t}"].append(ck)
        diagnostics.append({"seed": seed, **diag})
        for o in args.ablate:
            arms[f"stage1[{o}]"].append(pretrain_ablated(args, seed, unlabelled, work, o))
        print(f"seed {seed}: {describe_condition_check(diag)}", flush=True)
    t_pre = time.time() - t_pre

    runs: dict[str, dict[str, list[dict]]] = {}
    t_probe = time.time()
    ck_any = arms["stage1"][0]
    for protocol in protocols:
        runs.setdefault("random", {})[protocol] = [
            probe(args, f"random{s}", ck_any, 1001 + s, lists, protocol, work / "eval") for s in range(args.random_seeds)]
        for arm, cks in arms.items():
            runs.setdefault(arm, {})[protocol] = [probe(args, f"{arm}_s{i}", ck, None, lists, protocol, work / "eval")
                                                  for i, ck in enumerate(cks)]
    t_probe = time.time() - t_probe

    def correct(arm: str, protocol: str) -> list:    # [runs, val clips] 0/1 of an arm
        return [row for r in runs[arm][protocol] for row in r["val_correct"]]

    labels = runs["random"][protocols[0]][0]["val_labels"]
    groups = label_groups(str(lists[2]), 8)
    gains: dict[str, dict] = {}
    for arm in arms:
        gains[arm] = {}
        for protocol in protocols:
            gains[arm][protocol] = gains_by_group(correct(arm, protocol), correct("random", protocol), labels, groups)
    # what each ablated override costs the plain stage-1 arm (same seeds: plain minus ablated)
    ablations = {o: {protocol: gains_by_group(correct("stage1", protocol), correct(f"stage1[{o}]", protocol),
                                              labels, groups) for protocol in protocols} for o in args.ablate}
    targets = {}
    for protocol, need in TARGETS.items():
        if protocol in protocols:
            g = gains["stage1"][protocol]["all"]
            targets[f"stage1 {protocol} gain >= {need} with CI above 0"] = g["gain"] >= need and g["ci"][0] > 0
    motion = [(arm, p) for arm in gains for p in protocols if gains[arm][p].get("motion", {}).get("ci", [0])[0] > 0]
    targets["stretch: a motion-class gain with CI above 0"] = bool(motion)

    top1 = {arm: {p: [r["top1"] for r in rs] for p, rs in by.items()} for arm, by in runs.items()}
    result = {
        "meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": "cpu",
                 "host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                 "torch": torch.__version__,
                 "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True).stdout.strip(),
                 "quick": args.quick, "args": {k: v for k, v in vars(args).items() if k not in ("work", "out")}},
        "setup": {"model": "demo preset (ViT dim 64, depth 4, LayerScale off)", "unlabelled_clips": 8 * args.unlabelled_per_class,
                  "train_clips": 8 * args.train_per_class, "val_clips": len(labels), "classes": 8,
                  "groups": groups, "random_init_seeds": [1001 + s for s in range(args.random_seeds)]},
        "gains": gains, "ablations": ablations, "top1": top1, "decoder_condition": diagnostics, "targets": targets,
        "runtime_s": {"total": round(time.time() - t0, 1), "pretraining": round(t_pre, 1), "probes": round(t_probe, 1)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nbench_learning: {len(labels)} val clips, {args.seeds} pretraining seeds vs {args.random_seeds} "
          f"random inits; gain in top-1 points, 95 % CI (clips and runs):")
    for arm in gains:
        for protocol in protocols:
            print(f"  {arm:14s} {protocol:7s} {_gain_line(gains[arm][protocol])}")
    for o, by in ablations.items():
        for protocol in protocols:
            print(f"  stage1 minus stage1[{o}] {protocol:7s} {_gain_line(by[protocol])}")
    for name, ok in targets.items():
        print(f"  target {'met    ' if ok else 'MISSED '} {name}")
    print(f"bench_learning: {result['runtime_s']['total']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
