"""``python -m ivfast.rehearse --config X [--gpu h100] [--gpu-mem GiB] [key=value ...]``."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ivfast.rehearse import shim
from ivfast.rehearse.gpu import GPUS
from ivfast.rehearse.run import rehearse, report_json, run_in_subprocess


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ivfast.rehearse", description=__doc__)
    p.add_argument("--config", default="stage1_vitb")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="the GPU to rehearse for")
    p.add_argument("--gpu-mem", type=float, default=None,
                   help="GiB the step may allocate (default: the GPU's memory less the stated margin)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json", default="", help="also write the report as JSON here")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("IVFAST_REHEARSAL") != "1":
        return run_in_subprocess(sys.argv[1:] if argv is None else list(argv))
    shim.activate()
    rep = rehearse(args.config, args.overrides, gpu=args.gpu, gpu_mem=args.gpu_mem, steps=args.steps)
    print(rep.text())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report_json(rep), f, indent=1)
    if not rep.fits:
        print(f"ivfast rehearse: {args.config} needs {rep.peak_gib:.1f} GiB allocated per GPU, more than the "
              f"{rep.budget_gib:.1f} GiB that fit a {rep.gpu.name}: lower optim.batch_per_gpu or set "
              f"model.predictor.act_checkpoint=selective", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
