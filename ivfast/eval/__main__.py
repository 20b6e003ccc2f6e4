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


def run_demo(cfg) -> list[dict]:
    """Labelled synthetic clips; the demo's stage-2 encoder vs a random init, side by side."""
    from ivfast.eval.run import run_protocol, summary_line
    from ivfast.eval.synth_labels import APPEARANCE_CLASSES, CLASS_NAMES, make_labelled_clips
    from ivfast.models.release_weights import load_encoder

    ck = Path(cfg.checkpoint)
    if not ck.exists():
        raise FileNotFoundError(f"demo checkpoint {ck} not found: run `python -m ivfast.train` first (it writes "
                                f"runs/demo/stage2), or set checkpoint=PATH")
    clip_dir = Path(cfg.output_dir) / "clips"
    train = make_labelled_clips(clip_dir, cfg.demo_per_class, frames=16, size=64, seed=cfg.seed, split="train")
    val = make_labelled_clips(clip_dir, cfg.demo_val_per_class, frames=16, size=64, seed=cfg.seed, split="val")
    cfg = dataclasses.replace(cfg, train_list=str(train), val_list=str(val), label_map=str(clip_dir / "labels.txt"))
    results = []
    for proto in cfg.demo_protocols:
        for tag, random_init in (("pretrained", False), ("random_init", True)):
            enc = load_encoder(cfg.checkpoint, num_frames=cfg.views.num_frames, img_size=cfg.views.img_size,
                               random_init=random_init, seed=cfg.random_init_seed)
            c = dataclasses.replace(cfg, protocol=proto, random_init=random_init)
            res = run_protocol(c, encoder=enc, tag=f"{proto}_{tag}")
            res["tag"] = tag
            pc = res["per_class_top1"]
            app = [pc[CLASS_NAMES[i]] for i in APPEARANCE_CLASSES if pc[CLASS_NAMES[i]] is not None]
            mot = [v for n, v in pc.items() if n not in {CLASS_NAMES[i] for i in APPEARANCE_CLASSES} and v is not None]
            res["motion_top1"] = sum(mot) / max(1, len(mot))
            res["appearance_top1"] = sum(app) / max(1, len(app))
            results.append(res)
            print(summary_line(res) + f"  [motion classes {res['motion_top1']:.1f}, "
                  f"appearance classes {res['appearance_top1']:.1f}]", flush=True)
    print("\nivfast.eval demo: pretrained (demo stage 2) vs random init, top-1 % on "
          f"{results[0]['num_val']} val clips, {results[0]['num_classes']} classes "
          f"(chance {results[0]['chance_top1']:.1f}):")
    for proto in cfg.demo_protocols:
        a, b = [r for r in results if r["protocol"] == proto]
        print(f"  {proto:7s} pretrained {a['top1']:5.1f}   random init {b['top1']:5.1f}   "
              f"(motion {a['motion_top1']:.1f} vs {b['motion_top1']:.1f}, "
              f"appearance {a['appearance_top1']:.1f} vs {b['appearance_top1']:.1f})")
    (Path(cfg.output_dir) / "demo_summary.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "recon":
        from ivfast.eval.recon import main as recon_main
        return recon_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m ivfast.eval", description="Frozen-encoder probe evaluation.",
                                 epilog="Overrides: key.sub=value, e.g. protocol=vjepa dataset=ssv2 "
                                        "checkpoint=runs/x/checkpoints/step_00010000 train_list=a.csv val_list=b.csv")
    ap.add_argument("--config", default="", help="eval preset (ivfast/eval/configs: demo) or YAML path")
    ap.add_argument("--protocols", default="", help="comma-separated protocols to run in turn (default: protocol)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved protocol values and exit")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    from ivfast.eval.config import load_eval_config, resolve
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
