"""Frozen-encoder evaluation: features (online or cached), probe training, metrics and outputs.

Outputs of one protocol run in ``OUTPUT_DIR/<protocol>/``: ``results.json`` (protocol, every
resolved number, top-1/top-5, per-class accuracy), ``metrics.jsonl`` (one line per epoch),
``confusion.png``, ``tensorboard/``. Under torchrun the clips are sharded over ranks; cached
features and val scores are gathered on every rank (gloo or NCCL), attentive heads are DDP.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ivfast import ops
from ivfast.checkpoint import CheckpointError, load_plain
from ivfast.eval.config import EvalConfig, overridden, resolve
from ivfast.eval.data import (LabelledClips, ViewSpec, check_labels, label_groups, make_loader, read_label_map,
                              shard)
from ivfast.eval.metrics import bootstrap_ci, confusion, per_class_accuracy, save_confusion_png, topk_accuracy
from ivfast.eval.probes import HeadGrid, build_head, fit_linear, knn_predict

log = logging.getLogger("ivfast.eval")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- distributed helpers
def dist_info() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def setup_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's rows (CPU), ordered by sample id (so all ranks hold the same)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (x.cpu(), ids.cpu()))
        x = torch.cat([p[0] for p in parts])
        ids = torch.cat([p[1] for p in parts])
    order = ids.argsort()
    return x[order], ids[order]


# --------------------------------------------------------------------------- features
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible; use device=cpu or auto")
    return torch.device(name)


@torch.no_grad()
def encode(encoder, clips: torch.Tensor, device: torch.device, pool: str = "") -> torch.Tensor:
    """clips [B, V, 3, T, S, S] uint8 -> tokens [B, V, num_cls + N, d] (or pooled [B, V, d] when
    ``pool`` is 'mean' (patch tokens) or 'cls'). bf16 autocast on CUDA, fp32 on CPU; output fp32."""
    B, V = clips.shape[:2]
    video = clips.flatten(0, 1).to(device, non_blocking=True)
    N = encoder.num_tokens
    ids = torch.arange(N, device=device).expand(video.shape[0], N)
    p, tub = encoder.cfg.patch_size, encoder.cfg.tubelet
    patches = ops.patch_targets(video, ids, p, tub, IMAGENET_MEAN, IMAGENET_STD, impl="eager")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        x, _ = encoder(patches, ids)
    x = x.float()
    if pool == "mean":
        x = x[:, encoder.num_cls:].mean(1)
    elif pool == "cls":
        x = x[:, :encoder.num_cls].mean(1)
    return x.reshape(B, V, *x.shape[1:]).cpu()


def cache_key(cfg: EvalConfig, encoder, ds: LabelledClips, what: str) -> str:
    """Checkpoint (path, size, mtime, random/seed), view settings, list file and mode -> a hash."""
    src = encoder.source
    stat = []
    f = Path(getattr(encoder, "weights_file", "") or "")
    if f.is_file():    # the resolved weights file (a run dir's newest checkpoint): a rewrite changes the key
        st = f.stat()
        stat = [str(f), st.st_size, st.st_mtime_ns]
    lst = Path(ds.list_path)
    info = {"encoder": src, "file": stat, "random_init": cfg.random_init, "seed": cfg.random_init_seed,
            "views": ds.spec.key(), "mode": ds.mode, "list": [str(lst.resolve()), lst.stat().st_mtime_ns],
            "what": what, "grid": list(encoder.grid)}
    return hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def extract(cfg: EvalConfig, encoder, ds: LabelledClips, device, pool: str, cache_dir: Path | None,
            desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every clip of ``ds`` ([n, V, ...]) and labels, from the cache when present."""
    rank, world = dist_info()
    path = None
    if cache_dir is not None:
        path = cache_dir / f"{cache_key(cfg, encoder, ds, pool or 'tokens')}.pt"
        if path.exists():
            try:
                d = load_plain(path)        # tensors only: a planted file cannot run code
            except CheckpointError as e:
                raise ValueError(f"feature cache: {e}; delete it to recompute the features") from None
            log.info("%s: features from cache %s", desc, path)
            return d["feats"], d["labels"]
    from tqdm import tqdm
    feats, labels, ids = [], [], []
    loader = make_loader(ds, max(1, cfg.probe.batch_per_gpu // max(1, ds.num_views)), shard(len(ds), rank, world),
                         cfg.num_workers)
    for clips, y, i in tqdm(loader, desc=desc, disable=rank != 0, leave=False):
        feats.append(encode(encoder, clips, device, pool))
        labels.append(y)
        ids.append(i)
    x, order_ids = gather_rows(torch.cat(feats), torch.cat(ids))
    y, _ = gather_rows(torch.cat(labels), torch.cat(ids))
    if path is not None and rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"feats": x, "labels": y}, tmp)
        os.replace(tmp, path)
    return x, y


# --------------------------------------------------------------------------- probe training
def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_heads(cfg: EvalConfig, grid: HeadGrid, batches_per_epoch: int, epoch_batches, writer, jsonl) -> None:
    """AdamW with per-head (lr, wd) groups, warm-up + cosine per optimiser step, gradient
    accumulation up to probe.global_batch. ``epoch_batches(epoch)`` yields (x, y) micro-batches."""
    p = cfg.probe
    rank, world = dist_info()
    model = grid
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(grid)
    opt = torch.optim.AdamW(grid.param_groups(), betas=tuple(p.betas))
    accum = max(1, round(p.global_batch / (p.batch_per_gpu * world)))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / accum))
    total, warm = p.epochs * steps_per_epoch, int(p.warmup_epochs * steps_per_epoch)
    step = 0
    from tqdm import tqdm
    bar = tqdm(total=p.epochs, desc=f"{cfg.protocol} probe", unit="epoch", disable=rank != 0, leave=False)
    for epoch in range(p.epochs):
        losses, n = 0.0, 0
        for i, (x, y) in enumerate(epoch_batches(epoch)):
            logits = model(x)                                        # [H, B, C]
            loss = sum(F.cross_entropy(l, y) for l in logits)        # heads are independent: sum
            (loss / accum).backward()
            losses += loss.item() / len(grid.heads)
            n += 1
            if (i + 1) % accum == 0 or i + 1 == batches_per_epoch:
                f = lr_factor(step, warm, total)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * f
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
        rec = {"epoch": epoch, "loss": losses / max(1, n), "lr_factor": lr_factor(max(0, step - 1), warm, total)}
        if rank == 0:
            jsonl.write(json.dumps(rec) + "\n")
            jsonl.flush()
            if writer is not None:
                writer.add_scalar(f"{cfg.protocol}/train_loss", rec["loss"], epoch)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
    bar.close()


def _batches_cached(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int, device):
    def gen(epoch):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), batch):
            idx = perm[s:s + batch]
            yield x[idx].to(device), y[idx].to(device)
    return gen


def _batches_online(cfg, encoder, ds: LabelledClips, device):
    rank, world = dist_info()
    # the same number of batches on every rank (DDP's backward is collective): the last few clips
    # are repeated on the ranks that would otherwise run short, as the training loader pads
    per_rank = math.ceil(len(ds) / world)
    ids = [(rank + k * world) % len(ds) for k in range(per_rank)]

    def gen(epoch):
        ds.epoch = epoch
        loader = make_loader(ds, cfg.probe.batch_per_gpu, ids, cfg.num_workers, shuffle_seed=cfg.seed * 1000 + epoch)
        for clips, y, _ in loader:
            yield encode(encoder, clips, device)[:, 0].to(device), y.to(device)
    return gen, math.ceil(len(ids) / cfg.probe.batch_per_gpu)


@torch.no_grad()
def view_scores(grid: HeadGrid, tokens: torch.Tensor, device, batch: int = 64) -> torch.Tensor:
    """Softmax averaged over views: tokens [n, V, ...] -> [H, n, C]."""
    grid.eval()
    out = []
    for s in range(0, tokens.shape[0], batch):
        t = tokens[s:s + batch].to(device)
        n, V = t.shape[:2]
        logits = grid(t.flatten(0, 1))                              # [H, n*V, C]
        out.append(logits.softmax(-1).reshape(logits.shape[0], n, V, -1).mean(2).cpu())
    grid.train()
    return torch.cat(out, 1)


@torch.no_grad()
def stream_val_scores(cfg, encoder, grid: HeadGrid, ds: LabelledClips, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the val views batch by batch and score them at once: a val set's tokens (clips x
    views x tokens x width) would not fit in memory at real scale. Returns [H, n, C] and labels,
    gathered over ranks in sample order."""
    from tqdm import tqdm
    rank, world = dist_info()
    loader = make_loader(ds, max(1, cfg.probe.batch_per_gpu // ds.num_views), shard(len(ds), rank, world),
                         cfg.num_workers)
    scores, labels, ids = [], [], []
    for clips, y, i in tqdm(loader, desc="val", disable=rank != 0, leave=False):
        scores.append(view_scores(grid, encode(encoder, clips, device), device).transpose(0, 1))   # [B, H, C]
        labels.append(y)
        ids.append(i)
    s, _ = gather_rows(torch.cat(scores), torch.cat(ids))
    y, _ = gather_rows(torch.cat(labels), torch.cat(ids))
    return s.transpose(0, 1), y


# --------------------------------------------------------------------------- one protocol
def run_protocol(cfg: EvalConfig, encoder=None, tag: str = "") -> dict:
    """Resolve ``cfg`` for its protocol, evaluate, write the outputs; returns the results dict."""
    from ivfast.models.release_weights import load_encoder

    replaced = overridden(cfg)
    cfg = resolve(cfg)
    v, p = cfg.views, cfg.probe
    device = pick_device(cfg.device)
    setup_distributed(device)
    rank, _ = dist_info()
    torch.manual_seed(cfg.seed)
    if encoder is None:
        if not cfg.checkpoint:
            raise ValueError("no checkpoint given: set checkpoint=PATH (an ivfast checkpoint or run directory, "
                             "or a released .safetensors)")
        encoder = load_encoder(cfg.checkpoint, num_frames=v.num_frames, img_size=v.img_size,
                               random_init=cfg.random_init, seed=cfg.random_init_seed)
    encoder = encoder.to(device).eval().requires_grad_(False)
    if encoder.grid[0] * encoder.cfg.tubelet != v.num_frames and v.num_frames:
        raise ValueError(f"encoder built for {encoder.grid[0] * encoder.cfg.tubelet} frames, views want {v.num_frames}")
    size = v.img_size or encoder.grid[1] * encoder.cfg.patch_size
    spec = ViewSpec(v.num_frames, size, v.sampling, v.stride, v.test_clips, v.test_crops, tuple(v.scales), v.flip)
    online = p.features == "online"
    train_mode = "train" if (online and v.train_augment == "on") else "center"
    train_ds = LabelledClips(cfg.train_list, spec, cfg.root, train_mode, cfg.seed, cfg.num_workers or 1)
    val_ds = LabelledClips(cfg.val_list, spec, cfg.root, "test", cfg.seed, cfg.num_workers or 1)
    k = check_labels(train_ds.labels, val_ds.labels, cfg.num_classes, cfg.train_list, cfg.val_list)
    names = read_label_map(cfg.label_map, k)
    out = Path(cfg.output_dir) / (tag or cfg.protocol)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "feature_cache"
    writer = jsonl = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        jsonl = open(out / "metrics.jsonl", "w")
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        except ImportError:
            log.warning("tensorboard not installed: no TensorBoard logs")
    if rank == 0 and replaced:
        log.info("protocol %s: values replaced by the config (protocol's -> used): %s", cfg.protocol,
                 ", ".join(f"{k} {a} -> {b}" for k, (a, b) in replaced.items()))
    if rank == 0:   # every number of the run, before it starts (results.json repeats them)
        log.info("protocol %s (%s), encoder %s: views %s; probe %s", cfg.protocol, cfg.dataset, encoder.source,
                 json.dumps(dataclasses.asdict(v)), json.dumps(dataclasses.asdict(p)))
    t0 = time.time()
    pooled = p.head in ("linear", "knn")
    pool = p.pool if pooled else ""
    d = encoder.dim
    heads = p.heads or encoder.cfg.heads
    if pooled:   # pooled features are small: cached; attentive heads stream the val tokens (below)
        val_x, val_y = extract(cfg, encoder, val_ds, device, pool, cache_dir, f"val features ({tag or cfg.protocol})")
    note = ""
    seeds = cfg.probe_seeds or [cfg.seed]
    runs = []            # one per probe seed: (scores [H, n, C], grid description, fit records)
    if p.head == "knn":
        tr_x, tr_y = extract(cfg, encoder, train_ds, device, pool, cache_dir, "train features")
        mean, std = tr_x[:, 0].mean(0), tr_x[:, 0].std(0).clamp_min(1e-6)
        q = (val_x.flatten(0, 1) - mean) / std
        s = knn_predict(((tr_x[:, 0] - mean) / std).to(device), tr_y.to(device), q.to(device), k, p.knn_k,
                        p.knn_temperature).cpu()
        s = s / s.sum(-1, keepdim=True)                                   # each view's vote shares
        scores = s.reshape(val_x.shape[0], val_x.shape[1], k).mean(1)[None]   # averaged over views
        runs.append((scores, [{"k": p.knn_k, "temperature": p.knn_temperature}], None))
        seeds = seeds[:1]                # deterministic
    elif p.head == "linear":
        tr_x, tr_y = extract(cfg, encoder, train_ds, device, pool, cache_dir, "train features")
        x0 = tr_x[:, 0]
        grid = HeadGrid(lambda: build_head("linear", d, heads, k, mean=x0.mean(0), std=x0.std(0)), [0.0],
                        p.weight_decay).to(device)
        fits = [fit_linear(h, x0.to(device), tr_y.to(device), wd, p.max_iter) for h, (_, wd) in zip(grid.heads, grid.grid)]
        for f, (_, wd) in zip(fits, grid.grid):
            level = logging.INFO if f["converged"] else logging.WARNING
            log.log(level, "linear probe (wd %g): L-BFGS %s after %d iterations (loss %.4f, max |grad| %.1e)", wd,
                    "converged" if f["converged"] else "did NOT converge", f["iterations"], f["loss"], f["grad_max"])
            if rank == 0:
                jsonl.write(json.dumps({"fit": f, "weight_decay": wd}) + "\n")
        runs.append((view_scores(grid, val_x, device), [{"weight_decay": wd} for _, wd in grid.grid], fits))
        seeds = seeds[:1]                # a strictly convex fit: the seed changes nothing
    else:
        if online:
            gen_for = lambda seed: _batches_online(dataclasses.replace(cfg, seed=seed), encoder, train_ds, device)
        else:
            if not pooled:
                tr_x, tr_y = extract(cfg, encoder, train_ds, device, "", cache_dir, "train tokens")
                note = "fast mode: cached features of the centre view, no augmentation"
            nb = math.ceil(len(tr_y) / p.batch_per_gpu)
            gen_for = lambda seed: (_batches_cached(tr_x[:, 0], tr_y, p.batch_per_gpu, seed, device), nb)
        for seed in seeds:
            torch.manual_seed(seed)        # same head init whether features came from the cache or not
            grid = HeadGrid(lambda: build_head(p.head, d, heads, k, p.blocks), p.lr, p.weight_decay).to(device)
            gen, nb = gen_for(seed)
            train_heads(dataclasses.replace(cfg, seed=seed), grid, nb, gen, writer, jsonl)
            if pooled:
                scores = view_scores(grid, val_x, device)
            else:
                scores, val_y = stream_val_scores(cfg, encoder, grid, val_ds, device)
            runs.append((scores, [{"lr": lr, "weight_decay": wd} for lr, wd in grid.grid], None))
    # per seed: the head with the best val top-1 (one head unless a grid was asked for)
    per_seed, correct, preds = [], [], []
    for seed, (scores, grid_desc, fits) in zip(seeds, runs):
        per_head = [topk_accuracy(s, val_y) for s in scores]
        best = max(range(len(per_head)), key=lambda i: per_head[i]["top1"])
        pred = scores[best].argmax(1)
        preds.append(pred)
        correct.append((pred == val_y).to(torch.uint8))
        rec = {"seed": seed, **per_head[best], "head": grid_desc[best]}
        if fits is not None:
            rec["fit"] = fits[best]
        if len(per_head) > 1:
            rec["grid"] = [g | a for g, a in zip(grid_desc, per_head)]
        per_seed.append(rec)
    correct_t = torch.stack(correct)                                     # [seeds, n]
    top1s = [r["top1"] for r in per_seed]
    cm = confusion(preds[0], val_y, k)
    groups = label_groups(cfg.label_map, k)
    res = {"protocol": cfg.protocol, "dataset": cfg.dataset, "encoder": encoder.source, "tag": tag,
           "top1": sum(top1s) / len(top1s), "top5": sum(r["top5"] for r in per_seed) / len(per_seed),
           "top1_ci95": bootstrap_ci(correct_t.numpy()), "top1_seed_std": float(torch.tensor(top1s).std())
           if len(top1s) > 1 else 0.0, "probe_seeds": seeds, "seeds": per_seed,
           "num_val": int(len(val_y)), "num_train": len(train_ds), "num_classes": k,
           "chance_top1": 100.0 / k, "per_class_top1": dict(zip(names, per_class_accuracy(cm))),
           "group_top1": {g: {"top1": 100.0 * float(correct_t[:, m].float().mean()),
                              "top1_ci95": bootstrap_ci(correct_t[:, m].numpy()), "num_val": int(m.sum())}
                          for g, m in ((g, _in_classes(val_y, c)) for g, c in groups.items()) if m.any()},
           "val_correct": correct_t.tolist(), "val_labels": val_y.tolist(),
           "features": p.features + (f" ({note})" if note else ""), "train_views": train_mode,
           "views": dataclasses.asdict(v) | {"img_size": size}, "probe": dataclasses.asdict(p),
           "overridden": replaced, "seconds": round(time.time() - t0, 1)}
    if "grid" in per_seed[0]:
        res["selection"] = (f"best of {len(per_seed[0]['grid'])} heads chosen ON THE VAL SET per seed "
                            f"({', '.join(str(r['head']) for r in per_seed)}): optimistic")
        res["grid"] = per_seed[0]["grid"]
    if per_seed[0].get("fit") is not None:
        res["fit"] = per_seed[0]["fit"]
    if rank == 0:
        (out / "results.json").write_text(json.dumps(res, indent=1))
        jsonl.write(json.dumps({"final": True, "top1": res["top1"], "top5": res["top5"]}) + "\n")
        jsonl.close()
        save_confusion_png(cm, out / "confusion.png", names)
        if writer is not None:
            writer.add_scalar(f"{cfg.protocol}/val_top1", res["top1"], max(p.epochs, 1))
            writer.add_scalar(f"{cfg.protocol}/val_top5", res["top5"], max(p.epochs, 1))
            writer.add_text(f"{cfg.protocol}/settings", json.dumps({"views": res["views"], "probe": res["probe"]}))
            writer.close()
    return res


def _in_classes(labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    return torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))


def summary_line(res: dict) -> str:
    lo, hi = res["top1_ci95"]
    seeds = len(res.get("probe_seeds", [0]))
    spread = f" +- {res['top1_seed_std']:.1f} over {seeds} probe seeds" if seeds > 1 else ""
    s = (f"{res['protocol']:7s} {res.get('tag', ''):14s} top1 {res['top1']:5.1f} [{lo:.1f}, {hi:.1f}]{spread}  "
         f"top5 {res['top5']:5.1f}  (chance {res['chance_top1']:.1f}; {res['features']}; {res['seconds']} s)")
    if res.get("fit"):
        f = res["fit"]
        s += (f"\n        L-BFGS {'converged' if f['converged'] else 'did NOT converge'} in {f['iterations']} "
              f"iterations (max |grad| {f['grad_max']:.1e})")
    if "selection" in res:
        s += f"\n        {res['selection']}"
    return s
