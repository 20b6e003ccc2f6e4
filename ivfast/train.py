"""The training command: ``python -m ivfast.train --config NAME_OR_PATH [key.sub=value ...]``.

The command line and the demo; the loop itself is :class:`ivfast.trainer.Trainer`. ``--config demo``
(the default) generates a few hundred synthetic clips, runs stage 1 on a tiny model, then stage 2
initialised from it, on the CPU.

Multi-GPU / multi-node: ``torchrun --nproc-per-node 8 -m ivfast.train --config stage1_vitb ...``
(NCCL on GPUs, gloo on CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ivfast import checkpoint as ckpt
from ivfast.config import BlockSpec, Config, ConfigError, MaskingConfig, dump, load_config, presets
from ivfast.data import DataError
from ivfast.eval.recon import condition_check, describe_condition_check, eval_mode
from ivfast.eval.synth_labels import make_labelled_clips
from ivfast.trainer import Trainer, unwrap

log = logging.getLogger("ivfast.train")


# --------------------------------------------------------------------------- demo and CLI
def demo_stage2_config(cfg1: Config, stage1_ckpt: Path, epochs: int = 0) -> Config:
    """Stage 2 of the demo: same tiny model, multi-block masks, initialised from stage 1;
    ``epochs`` (0 = stage 1's) at a tenth of stage 1's lr."""
    masking = MaskingConfig(kind="multiblock", blocks=[BlockSpec(4, [0.15, 0.15]), BlockSpec(1, [0.5, 0.5])],
                            max_keep=0, trim=cfg1.masking.trim)
    return dataclasses.replace(
        cfg1, stage=2, masking=masking,
        model=dataclasses.replace(cfg1.model, init_from=str(stage1_ckpt)),
        optim=dataclasses.replace(cfg1.optim, base_lr=cfg1.optim.base_lr / 10, warmup_epochs=0.0,
                                  epochs=epochs or cfg1.optim.epochs),
        runtime=dataclasses.replace(cfg1.runtime, output_dir=str(Path(cfg1.runtime.output_dir).parent / "stage2")))


DEMO_CLIPS_PER_CLASS = 40     # x 8 classes: the demo's 320 unlabelled pretraining clips
# Stage 2 of the demo: 2 epochs (160 steps). At this scale stage 2 keeps stage 1's probe gain
# over 160 steps (linear +10.8 points) and loses most of it over 400 (+1.3 to +1.7), with either
# context trim (one pretraining seed each, bench/bench_learning.py measures it over seeds).
DEMO_STAGE2_EPOCHS = 2


def prepare_demo_data(cfg: Config) -> Config:
    """Generate (once, cached) the demo's unlabelled clips (the eval demo's classes, labels
    unused) and point data.train_list at them."""
    clip_dir = Path(cfg.runtime.output_dir).parent / "demo_unlabelled"
    listing = clip_dir / "train.csv"
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:     # under torchrun, local rank 0 writes them
        deadline = time.time() + 600
        while not listing.exists():
            if time.time() > deadline:
                raise TimeoutError(f"waited 10 minutes for local rank 0 to write {listing}")
            time.sleep(0.5)
    if not listing.exists():
        made = make_labelled_clips(clip_dir, DEMO_CLIPS_PER_CLASS, frames=max(16, 2 * cfg.model.num_frames), size=64,
                                   seed=cfg.runtime.seed, split="unlabelled")
        tmp = listing.with_suffix(".tmp")
        tmp.write_text("".join(f"{line.split(',')[0]}\n" for line in made.read_text().splitlines()[1:]))
        os.replace(tmp, listing)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_list=str(listing)))


def stage1_condition_check(trainer: Trainer, clips: int = 16, draws: int = 4) -> dict:
    """After stage 1: does its diffusion decoder use the predictor's per-patch conditions? Checked
    on ``clips`` training clips (masked as in training, the model in eval mode); logged as one line
    and written to ``decoder_condition.json`` in the run's output folder."""
    videos, have = [], 0
    # a finished run's loader iterator may be its last epoch's empty remainder; the next is a new epoch
    for batch in (b for _ in range(2) for b in trainer.loader):
        videos.append(batch["video"])
        have += batch["video"].shape[0]
        if have >= clips:
            break
    if have < 2:
        log.info("stage 1 decoder condition check skipped: it needs >= 2 clips, the loader gave %d", have)
        return {}
    with eval_mode(unwrap(trainer.model)) as model:
        res = condition_check(model, torch.cat(videos)[:clips], seed=trainer.cfg.runtime.seed, draws=draws)
    log.info("stage 1 %s", describe_condition_check(res))
    (trainer.out / "decoder_condition.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def run(cfg: Config, resume: str = "") -> Path:
    """Train ``cfg``; for the demo, stage 1 then stage 2 from its last checkpoint."""
    if cfg.demo:
        cfg = prepare_demo_data(cfg)
        cfg1 = dataclasses.replace(cfg, runtime=dataclasses.replace(
            cfg.runtime, output_dir=str(Path(cfg.runtime.output_dir) / "stage1")))
        trainer = Trainer(cfg1, resume)
        last1 = trainer.fit()
        if trainer.preempted:
            return last1
        if trainer.is_main and not (cfg.runtime.distributed == "fsdp" and trainer.world > 1):
            stage1_condition_check(trainer)     # FSDP's sharded forward would need every rank
        # an explicit checkpoint path belongs to one stage; "auto" finds each stage's own
        trainer2 = Trainer(demo_stage2_config(cfg1, last1, DEMO_STAGE2_EPOCHS), resume if resume == "auto" else "")
        return trainer2.fit()
    trainer = Trainer(cfg, resume)
    return trainer.fit()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ivfast.train",
        description="Train an InternVideo-Next style video encoder (stage 1 or 2).",
        epilog="Overrides: key.sub=value, e.g. optim.base_lr=5e-4 runtime.output_dir=runs/x")
    p.add_argument("--config", default="demo", help=f"preset ({', '.join(presets())}) or a YAML path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", default="", help="'auto' (newest valid checkpoint in the output dir) or a path")
    p.add_argument("--profile-steps", default="", help="A:B: nsys/torch.profiler capture window")
    p.add_argument("--rehearse", action="store_true",
                   help="no training: run two real steps on a simulated GPU (fake tensors, no GPU needed) and "
                        "report peak memory, FLOPs, dtypes and attention kernels; exit 3 if it would not fit")
    p.add_argument("--gpu", default="h100", help="--rehearse: the GPU to rehearse for (h100, h200, a100)")
    p.add_argument("--gpu-mem", type=float, default=None,
                   help="--rehearse: GiB a step may allocate (default: the GPU's memory less a stated margin)")
    p.add_argument("--rehearse-json", default="", help="--rehearse: also write the report as JSON here")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_intermixed_args(argv)   # overrides may come before and after the flags


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
    if args.rehearse:
        from ivfast.rehearse.run import run_in_subprocess
        extra = ["--gpu", args.gpu] + (["--gpu-mem", str(args.gpu_mem)] if args.gpu_mem else []) \
            + (["--json", args.rehearse_json] if args.rehearse_json else [])
        return run_in_subprocess(["--config", args.config, *extra, *args.overrides])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    resume = args.resume
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    saved = ckpt.list_checkpoints(Path(cfg.runtime.output_dir) / "checkpoints")
    if restarts > 0 and resume != "auto" and (saved or not resume):
        # torchrun --max-restarts restarted the worker group after a failure: go on from the newest
        # valid checkpoint, not from the command line's starting point (which stays the start when
        # the failed run saved none)
        log.warning("elastic restart %d: resuming from the newest valid checkpoint (--resume auto%s)", restarts,
                    f"; the command line's --resume {resume} is for the first start only" if resume else "")
        resume = "auto"
    try:
        last = run(cfg, resume)
    except DataError as e:
        # a data problem found at start-up or mid-run (missing list, too many bad videos) is the
        # user's to fix, like a config error: one line and exit 2, not a traceback
        print(f"ivfast.train: data error: {e}", file=sys.stderr)
        return 2
    except ckpt.CheckpointError as e:
        # a named checkpoint that is damaged or does not fit this run: the same, one line
        print(f"ivfast.train: checkpoint error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(cfg.runtime.output_dir).resolve()
        print(f"ivfast.train: done. Output in {out} (checkpoints, metrics.jsonl, tensorboard/); "
              f"last checkpoint {last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
