"""``python -m ivfast.train --config NAME_OR_PATH [key.sub=value ...] [--print-config]``."""
from __future__ import annotations

import argparse
import sys

from ivfast.config import ConfigError, dump, load_config, presets


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ivfast.train",
        description="Train an InternVideo-Next style video encoder (stage 1 or 2).",
        epilog="Overrides: key.sub=value, e.g. optim.base_lr=5e-4 runtime.output_dir=runs/x")
    p.add_argument("--config", default="demo", help=f"preset ({', '.join(presets())}) or a YAML path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", default="", help="'auto' (newest valid checkpoint in the output dir) or a path")
    p.add_argument("--profile-steps", default="", help="A:B: nsys/torch.profiler capture window")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        overrides = list(args.overrides)
        if args.profile_steps:
            overrides.append(f"runtime.profile_steps={args.profile_steps}")
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"ivfast.train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump(cfg), end="")
        return 0
    print("ivfast.train: the training loop is not available yet in this version; "
          "use --print-config to inspect a configuration.", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
