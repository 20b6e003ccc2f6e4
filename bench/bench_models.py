"""The composed models over a list of batches: step time, clips/s, MFU and peak memory per clip.

    python bench/bench_models.py --preset stage1_vitb --batch 8 16
    python bench/bench_models.py --preset stage2_vitb --batch 4 8 14 model.stage2_pack_sets=true
    python bench/bench_models.py --dry-run --batch 1 2        # the demo model on the CPU

Each batch is one row of bench_train_step's step timer (the real ``Trainer.train_step`` with
random weights, eager unless an override says ``runtime.compile=true``). MFU uses
``ivfast.models.flops.flops_per_clip`` (useful FLOPs: windowed local attention) and the device's
dense bf16 peak from ``ivfast.metrics``. Rows are appended as JSON lines to ``--out`` (default
``bench/results/models.jsonl``) with the device and version stamp.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as T  # noqa: E402
import harness as H  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="stage1_vitb")
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="the demo model on the CPU (checks the script only)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "models.jsonl"))
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = ap.parse_args(argv)
    stamp = H.stamp(H.device(args.dry_run))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for b in args.batch:
        rec = H.Record()
        T.measure(rec, args.preset, [b], ["runtime.compile=false", *args.overrides], args.dry_run,
                  args.steps, args.warmup)
        row = dict(preset=args.preset, batch=b, overrides=args.overrides, **rec.data["result"],
                   attention=rec.data.get("attention_backends"), **stamp)
        print(json.dumps(row))
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
