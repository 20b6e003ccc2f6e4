"""``python -m ivfast.eval [--config PRESET_OR_YAML] [key.sub=value ...]``; ``--protocols a,b``
runs several protocols on the same encoder (features are cached and shared)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch.distributed as dist

from ivfast.config import ConfigError
from ivfast.eval.config import DATASETS, PROTOCOLS, eval_presets, load_eval_config, resolve


def run_demo(cfg) -> list[dict]:
    """Labelled synthetic clips; the demo's stage-2 encoder vs random inits, with CIs on the gap."""
    from ivfast.eval.data import label_groups
    from ivfast.eval.metrics import gains_by_group
    from ivfast.eval.run import run_protocol, summary_line
    from ivfast.eval.synth_labels import make_labelled_clips
    from ivfast.models.release_weights import load_encoder

    ck = Path(cfg.checkpoint)
    if not ck.exists():
        raise FileNotFoundError(f"demo checkpoint {ck} not found: run `python -m ivfast.train` first (it writes "
                                f"runs/demo/stage2), or set checkpoint=PATH")
    clip_dir = Path(cfg.output_dir) / "clips"
    train = make_labelled_clips(clip_dir, cfg.demo_per_class, frames=16, size=64, seed=cfg.seed, split="train")
    val = make_labelled_clips(clip_dir, cfg.demo_val_per_class, frames=16, size=64, seed=cfg.seed, split="val")
    cfg = dataclasses.replace(cfg, train_list=str(train), val_list=str(val), label_map=str(clip_dir / "labels.txt"))
    random_seeds = cfg.random_init_seeds or [cfg.random_init_seed]
    arms = [("pretrained", False, None)] + [(f"random_init_s{s}", True, s) for s in random_seeds]
    results, gains = [], {}
    for proto in cfg.demo_protocols:
        for tag, random_init, seed in arms:
            enc = load_encoder(cfg.checkpoint, num_frames=cfg.views.num_frames, img_size=cfg.views.img_size,
                               random_init=random_init, seed=seed if random_init else cfg.random_init_seed)
            c = dataclasses.replace(cfg, protocol=proto, random_init=random_init,
                                    random_init_seed=seed if random_init else cfg.random_init_seed)
            res = run_protocol(c, encoder=enc, tag=f"{proto}_{tag}")
            res["tag"] = tag
            results.append(res)
            print(summary_line(res), flush=True)
        mine = [r for r in results if r["protocol"] == proto]
        a = mine[0]["val_correct"]
        b = [row for r in mine[1:] for row in r["val_correct"]]
        groups = label_groups(cfg.label_map, mine[0]["num_classes"])
        gains[proto] = gains_by_group(a, b, mine[0]["val_labels"], groups)
    first = results[0]
    print(f"\nivfast.eval demo: pretrained (demo stage 2) vs {len(random_seeds)} random inits, top-1 % on "
          f"{first['num_val']} val clips, {first['num_classes']} classes (chance {first['chance_top1']:.1f}); "
          f"gain = pretrained - random, 95 % CI by bootstrap over val clips and seeds:")
    for proto in cfg.demo_protocols:
        mine = [r for r in results if r["protocol"] == proto]
        rnd = sum(r["top1"] for r in mine[1:]) / len(mine[1:])
        line = f"  {proto:7s} pretrained {mine[0]['top1']:5.1f}   random init {rnd:5.1f}   gain "
        line += "   ".join(f"{k} {v['gain']:+5.1f} [{v['ci'][0]:+.1f}, {v['ci'][1]:+.1f}]"
                           for k, v in gains[proto].items())
        print(line)
    (Path(cfg.output_dir) / "demo_summary.json").write_text(json.dumps({"gains": gains, "runs": results}, indent=1))
    return results


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "recon":
        from ivfast.eval.recon import main as recon_main
        return recon_main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m ivfast.eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Frozen-encoder probe evaluation.\n\n"
                    f"protocols (protocol=NAME): {', '.join(PROTOCOLS)}\n"
                    "  ivnext: the paper's attentive probe; vjepa / vjepa2: V-JEPA (2) probes;\n"
                    "  linear: logistic regression fitted by L-BFGS; knn: weighted k-NN on standardised features\n"
                    f"datasets (dataset=NAME, picks the protocol's numbers): {', '.join(DATASETS)}\n"
                    f"presets (--config NAME): {', '.join(eval_presets())}\n"
                    "python -m ivfast.eval recon --help: reconstructions of a stage-1 checkpoint",
        epilog="Overrides: key.sub=value, e.g. protocol=vjepa dataset=ssv2 "
               "checkpoint=runs/x/checkpoints/step_00010000 train_list=a.csv val_list=b.csv probe_seeds=[0,1,2]")
    ap.add_argument("--config", default="", help=f"eval preset ({', '.join(eval_presets())}) or YAML path")
    ap.add_argument("--protocols", default="", help="comma-separated protocols to run in turn (default: protocol)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved protocol values and exit")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = load_eval_config(args.config, args.overrides)
        protos = [p for p in args.protocols.split(",") if p] or [cfg.protocol]
        resolved = [resolve(cfg, p) for p in protos]
    except ConfigError as e:
        print(f"ivfast.eval: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        for r in resolved:
            print(json.dumps(dataclasses.asdict(r), indent=1))
        return 0
    from ivfast.data.index import DataError
    from ivfast.eval.run import run_protocol, summary_line
    try:
        if cfg.demo:
            run_demo(cfg)
        else:
            for r in resolved:
                res = run_protocol(r)
                print(summary_line(res))
                print(f"ivfast.eval: results in {Path(r.output_dir) / r.protocol}/results.json")
    except (ValueError, FileNotFoundError, DataError, KeyError) as e:   # bad input: one line, no traceback
        print(f"ivfast.eval: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
