"""Throughput levers on CPU: a sync-free training step, and the switches that must not
change the maths (predictor checkpointing, fused teacher qkv, FP8 teacher emulation, timed
attention-backend choice)."""
import contextlib

import pytest
import torch

from ivfast.config import load_config
from ivfast.train import demo_stage2_config
from ivfast.trainer import Trainer, compile_enabled, setup_distributed
from utils import tiny_cfg

SYNCING = ("item", "__bool__", "cpu", "tolist")


def six_steps_cfg(clip_list, out, *extra):
    """Two epochs, logging only at the end: steps 2-5 are plain steps."""
    return tiny_cfg(clip_list, out, "optim.epochs=2", "runtime.log_every=100", "runtime.max_steps=6", *extra)


@contextlib.contextmanager
def count_host_reads(calls: list, active):
    """Patch Tensor.item/__bool__/cpu/tolist to record a call while ``active()`` is true."""
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def wrap(name):
        real = saved[name]

        def patched(self, *a, **k):
            if active():
                import traceback
                calls.append((name, "".join(traceback.format_stack(limit=6)[:-1])))
            return real(self, *a, **k)
        return patched

    for name in SYNCING:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _run_counting(trainer):
    """Train; record host reads of tensors made during steps 2-5, outside the data loader (which
    works on host tensors before the upload; on CUDA those reads never wait for the GPU)."""
    calls, in_loader = [], [False]
    real_next = trainer._next_batch

    def next_batch():
        in_loader[0] = True
        try:
            return real_next()
        finally:
            in_loader[0] = False

    trainer._next_batch = next_batch
    with count_host_reads(calls, lambda: 1 <= trainer.step <= 4 and not in_loader[0]):
        trainer.fit()
    return calls


@pytest.mark.parametrize("stage", [1, 2])
def test_training_steps_2_to_5_make_no_host_reads(clip_list, tmp_path, stage):
    cfg = six_steps_cfg(clip_list, tmp_path)
    if stage == 2:   # the demo's stage 2: multi-block masks, two sets packed in the predictor
        stage1 = Trainer(six_steps_cfg(clip_list, tmp_path / "s1", "runtime.max_steps=1")).fit()
        cfg = demo_stage2_config(cfg, stage1)
    trainer = Trainer(cfg)
    assert trainer._sync_free, "fused AdamW (found_inf) should be in use"
    calls = _run_counting(trainer)
    assert trainer.step == 6
    assert not calls, f"{len(calls)} host reads in steps 2-5, first from:\n{calls[0][1]}"


def test_the_counter_sees_a_host_sync(clip_list, tmp_path):
    """The probe works: the old per-step ``bool(isfinite(...))`` is caught."""
    trainer = Trainer(six_steps_cfg(clip_list, tmp_path, "runtime.max_steps=3"))
    trainer._sync_free = False       # the host-checked path (optimisers without found_inf)
    calls = _run_counting(trainer)
    assert any(name == "__bool__" for name, _ in calls)


def test_nonfinite_step_skipped_on_device_and_counted_at_log(clip_list, tmp_path):
    trainer = Trainer(six_steps_cfg(clip_list, tmp_path, "runtime.max_steps=3", "runtime.max_nonfinite=5"))
    real_forward = trainer.model.forward
    calls = {"n": 0}

    def poisoned_once(video, seed):
        out = real_forward(video, seed)
        calls["n"] += 1
        if calls["n"] == 2:                      # step 2 only
            out["loss"] = out["loss"] * float("nan")
        return out

    trainer.model.forward = poisoned_once
    snap = {}
    real_step = trainer.train_step

    def step_and_snapshot():
        if trainer.step == 1:
            snap.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
            snap["_opt_step"] = next(iter(trainer.optimizer.state.values()))["step"].clone()
        res = real_step()
        if trainer.step == 1:
            for k, v in trainer.model.state_dict().items():
                assert torch.equal(v, snap[k]), f"{k} changed in a skipped step"
            assert torch.equal(next(iter(trainer.optimizer.state.values()))["step"], snap["_opt_step"])
        return res

    trainer.train_step = step_and_snapshot
    trainer.fit()
    assert trainer.nonfinite.total == 1 and trainer.nonfinite.in_row == 0


@pytest.mark.gpu
def test_cuda_steps_2_to_5_do_not_synchronise(clip_list, tmp_path):
    """On a GPU: torch.cuda.set_sync_debug_mode('error') raises on any synchronising call in
    steps 2-5 (the first step compiles, autotunes and probes attention backends)."""
    trainer = Trainer(six_steps_cfg(clip_list, tmp_path, "runtime.device=cuda", "runtime.max_steps=5"))
    trainer.train_step()
    trainer.step += 1
    trainer._next_batch()   # warm the loader's first epoch plan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            trainer.train_step()
            trainer.step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# --------------------------------------------------------------------------- compile
def test_compile_auto_means_cuda_only():
    assert load_config("demo", []).runtime.compile == "auto"
    cfg = load_config("demo", [])
    assert compile_enabled(cfg, torch.device("cuda")) and not compile_enabled(cfg, torch.device("cpu"))
    assert compile_enabled(load_config("demo", ["runtime.compile=true"]), torch.device("cpu"))
    assert not compile_enabled(load_config("demo", ["runtime.compile=false"]), torch.device("cuda"))


def test_student_compiles_without_graph_breaks_and_bounded_recompiles():
    """Encoder and predictor layers trace as one graph each (dynamo's eager backend: graph
    breaks and recompiles are decided before inductor, so this is fast on CPU); stage 2's
    visible count K changes every batch and must not recompile past automatic-dynamic's one."""
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter

    from ivfast.models.epd import build_model
    from ivfast.models.predictor import rope_cos_sin

    cfg = load_config("demo", ["demo=false"])
    torch.manual_seed(0)
    model = build_model(cfg)
    enc, pred = model.encoder, model.predictor
    N, B = enc.num_tokens, 2

    def visible(K):
        ids = torch.stack([torch.randperm(N)[:K].sort().values for _ in range(B)]).int()
        return torch.randn(B, K, enc.patch_dim), ids

    dynamo.reset()
    e = dynamo.explain(enc)(*visible(N // 4))
    assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons
    h = torch.randn(B, N + model.num_cls, cfg.model.predictor.dim)
    windows = set()
    for layer in pred.layers:
        cos, sin = rope_cos_sin(h.shape[1], pred.head_dim, layer.rope_theta, h.device)
        e = dynamo.explain(layer)(h, cos, sin)
        assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons
        windows.add(layer.window)
    assert None in windows and len(windows) == 2, "the demo predictor has global and local layers"

    dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(enc, backend=counter)
    for K in (N // 4, N // 2, N // 3, N // 5, N // 6):
        compiled(*visible(K))
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for 5 visible counts"
    dynamo.reset()

    # stage 2 packed (model.stage2_pack_sets): both mask sets in one traced pass, the two visible
    # counts changing every batch
    def packed(K0, K1):
        (p0, i0), (p1, i1) = visible(K0), visible(K1)
        return [p0, p1], [i0, i1]
    e = dynamo.explain(enc)(*packed(N // 4, N // 7))
    assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons
    dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(enc, backend=counter)
    for K0, K1 in ((N // 4, N // 7), (N // 2, N // 5), (N // 3, N // 9), (N // 5 + 1, N // 6), (N // 2 + 1, N // 8 + 3)):
        compiled(*packed(K0, K1))
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for 5 packed visible-count pairs"
    dynamo.reset()


# --------------------------------------------------------------------------- predictor checkpointing
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_predictor_matches_plain(mode):
    """Same outputs and the same gradients (inputs and every weight), and it does save memory:
    fewer bytes held by autograd after the forward."""
    from ivfast.models.epd import build_model

    cfg = load_config("demo", ["demo=false"])
    torch.manual_seed(0)
    pred = build_model(cfg).predictor.train()
    N, B = pred.num_tokens, 2
    seq = torch.randn(B, pred.num_cls + N, cfg.model.encoder.dim, requires_grad=True)

    def run(m):
        pred.set_act_checkpoint(m)
        pred.zero_grad(set_to_none=True)
        seq.grad = None
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = pred.run(seq)
        (out.square().mean() + out.sum() * 1e-3).backward()
        grads = {n: p.grad.clone() for n, p in pred.named_parameters() if p.grad is not None}
        return out.detach(), seq.grad.clone(), grads, sum(saved)

    ref_out, ref_gin, ref_grads, ref_bytes = run("none")
    assert len(ref_grads) >= 4 * len(pred.layers)
    out, gin, grads, nbytes = run(mode)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(gin, ref_gin, rtol=1e-6, atol=1e-7)
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-6, atol=1e-7, msg=n)
    assert nbytes < (0.75 if mode == "selective" else 0.35) * ref_bytes, (mode, nbytes, ref_bytes)

    # and a compiled layer traces the checkpoint as one graph (runtime.compile=auto on CUDA)
    import torch._dynamo as dynamo

    from ivfast.models.predictor import rope_cos_sin

    layer = pred.layers[1]
    h = torch.randn(B, pred.num_cls + N, cfg.model.predictor.dim, requires_grad=True)
    dynamo.reset()
    e = dynamo.explain(layer)(h, *rope_cos_sin(h.shape[1], pred.head_dim, layer.rope_theta, h.device))
    assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons
    dynamo.reset()


def test_predictor_checkpoint_mode_checked():
    from ivfast.config import ConfigError

    with pytest.raises(ConfigError, match="act_checkpoint"):
        load_config("demo", ["model.predictor.act_checkpoint=layers"])


def test_flops_cli_prints_predicted_peak_memory(capsys):
    from ivfast.models.flops import main, predicted_peak_memory

    assert main(["--config", "stage2_vitb"]) == 0
    out = capsys.readouterr().out
    assert "model TFLOP per clip" in out and "predicted peak memory" in out and "total" in out
    cfg = load_config("stage2_vitb", ["model.predictor.act_checkpoint=none"])
    plain = predicted_peak_memory(cfg)["total"]
    sel = predicted_peak_memory(load_config("stage2_vitb", ["model.predictor.act_checkpoint=selective"]))["total"]
    full = predicted_peak_memory(load_config("stage2_vitb", ["model.predictor.act_checkpoint=full"]))["total"]
    assert full < sel < plain
    # the review's hand count for stage 2 ViT-B at 14 clips is 72-80 GiB (+-20 %)
    assert 60 < plain < 90
    assert predicted_peak_memory(cfg, batch=7)["total"] < plain
    # the preset's own default fits an 80 GB GPU with room: under 70 GiB allocated
    assert load_config("stage2_vitb").model.predictor.act_checkpoint == "selective"
    assert predicted_peak_memory(load_config("stage2_vitb"))["total"] < 70 < plain


def test_expandable_segments_set_before_cuda_init(monkeypatch):
    """setup_distributed sets PYTORCH_CUDA_ALLOC_CONF before touching CUDA (simulated: a visible
    but uninitialised CUDA device; set_device patched out), and keeps a user's own value."""
    cfg = load_config("demo", ["runtime.device=cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    setup_distributed(cfg)
    import os
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    setup_distributed(cfg)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"


# --------------------------------------------------------------------------- teacher
def _tiny_teacher(**kw):
    from ivfast.config import TeacherConfig
    from ivfast.models.teacher import build_teacher

    tcfg = TeacherConfig(tiny=True, img_size=64, patch_size=8, middle_layers=[1, 3], student_layers=[0, 1], **kw)
    torch.manual_seed(0)
    return build_teacher(tcfg, align_dim=64, attn_backend="math")


def _unfused_layers(teacher, video):
    """Readable reference of the teacher forward: separate q/k/v projections, math attention and
    the MLP module's own GELU pass (no fused qkv GEMM, no GEMM-epilogue GELU)."""
    from ivfast.models.attention import attention

    def layer_fn(layer, x, i):
        B, N, D = x.shape
        h = layer.layer_norm1(x)
        a = layer.self_attn
        shape = (B, N, teacher.heads, D // teacher.heads)
        o = attention(a.q_proj(h).view(shape), a.k_proj(h).view(shape), a.v_proj(h).view(shape), backend="math")
        x = x + a.out_proj(o.reshape(B, N, D))
        return x + layer.mlp(layer.layer_norm2(x))

    teacher._layer = layer_fn
    try:
        return teacher(video)
    finally:
        del teacher._layer


def test_teacher_fused_qkv_equals_unfused_and_shares_memory():
    teacher = _tiny_teacher()
    a = teacher.hf.encoder.layers[0].self_attn
    w, _ = teacher._qkv[0]
    assert a.q_proj.weight.data_ptr() == w.data_ptr() and a.k_proj.weight.untyped_storage().data_ptr() == \
        w.untyped_storage().data_ptr(), "q/k/v weights should be views of the fused weight"
    video = torch.rand(2, 3, 2, 56, 56)
    fused, plain = teacher(video), _unfused_layers(teacher, video)
    for x, y in zip(fused.middle + [fused.tokens, fused.pooled, fused.scores],
                    plain.middle + [plain.tokens, plain.pooled, plain.scores]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    teacher = teacher.to(torch.float64)            # .to() re-fuses: still views, still equal
    a = teacher.hf.encoder.layers[0].self_attn
    assert a.v_proj.weight.untyped_storage().data_ptr() == teacher._qkv[0][0].untyped_storage().data_ptr()
    torch.testing.assert_close(teacher(video.double()).tokens, _unfused_layers(teacher, video.double()).tokens)


def test_teacher_ignores_autocast():
    """Under the step's autocast the teacher still computes in its weights' dtype (here bf16 on
    CPU): LayerNorm outputs are not promoted to fp32 and re-cast."""
    teacher = _tiny_teacher(dtype="bf16").to(torch.bfloat16)
    video = torch.rand(1, 3, 2, 56, 56)
    seen = []
    hook = teacher.hf.encoder.layers[0].layer_norm1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = teacher(video)
    hook.remove()
    assert seen == [torch.bfloat16] and out.tokens.dtype == torch.bfloat16


def test_fp8_rowwise_matmul_emulation():
    """The maths of FP8Linear: row-wise e4m3 quantisation of both operands, fp32 accumulation.
    Exact against an independent dequantise-then-matmul, and within e4m3's error of the fp32 GEMM."""
    from ivfast.models.teacher import FP8_MAX, FP8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48)
    x = torch.randn(5, 7, 96) * torch.logspace(-2, 2, 7)[None, :, None]   # rows of very different scale
    y = FP8Linear(lin)(x)
    xs = x.reshape(-1, 96).abs().amax(1, keepdim=True) / FP8_MAX
    ws = lin.weight.abs().amax(1, keepdim=True) / FP8_MAX
    xq = (x.reshape(-1, 96) / xs).to(torch.float8_e4m3fn).float() * xs
    wq = (lin.weight / ws).to(torch.float8_e4m3fn).float() * ws
    torch.testing.assert_close(y.reshape(-1, 48), xq @ wq.t() + lin.bias, rtol=1e-5, atol=1e-6)
    ref = lin(x).detach()
    rel = (y - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert rel.max() < 0.1, rel.max()            # e4m3 carries 3 mantissa bits: a few % per GEMM
    assert rel.max() > 1e-4                      # and it is really quantised


def test_fp8_teacher_agreement_with_bf16():
    """The FP8 teacher (emulated on CPU) against the bf16 one, on what stage 1 uses: semantic-mask
    scores and kept sets, middle-layer and pooled alignment targets. A random tiny teacher; the
    measured agreement of the real SigLIP2 comes from bench/bench_train_step.py on a GPU."""
    from ivfast.models.teacher import teacher_agreement

    ref = _tiny_teacher(dtype="bf16").to(torch.bfloat16)
    fp8 = _tiny_teacher(dtype="bf16", fp8=True).to(torch.bfloat16)
    assert type(fp8.hf.encoder.layers[0].mlp.fc1).__name__ == "FP8Linear"
    torch.manual_seed(1)
    video = torch.rand(2, 3, 4, 56, 56)
    agree = teacher_agreement(ref(video), fp8(video), frames=4)
    print("fp8 vs bf16 (tiny random teacher, emulated):", {k: round(v, 4) for k, v in agree.items()})
    assert agree["middle_cos_min"] > 0.97 and agree["pooled_cos_min"] > 0.97, agree
    assert agree["score_corr_min"] > 0.9 and agree["mask_overlap_mean"] > 0.8, agree


# --------------------------------------------------------------------------- attention by timing
def test_pick_fastest_skips_rejected_and_wrong_kernels():
    from ivfast.models.attention import pick_fastest

    ms = {"cudnn": 0.5, "flash": 1.0, "efficient": 1.5, "broken_fast": 0.1}

    def run(b):
        if b == "rejects":
            raise RuntimeError("No available kernel. Aborting execution.\nmore")
        return b

    best, report = pick_fastest(run, ["flash", "rejects", "broken_fast", "cudnn", "efficient"],
                                lambda b, out: "max error 3 > 0.02" if b == "broken_fast" else None,
                                lambda fn: ms[fn()])
    assert best == "cudnn"
    assert report["flash"] == 1.0 and report["rejects"].startswith("rejected: No available kernel")
    assert report["broken_fast"] == "rejected: max error 3 > 0.02"
    assert pick_fastest(run, ["rejects"], lambda b, o: None, lambda fn: 1.0)[0] is None


def test_attention_uses_the_timed_backend(monkeypatch):
    """The timed path end to end on CPU: CUDA faked (device check, timer), kernels that run on
    CPU as candidates, fake timings that make the one tried second the fastest; the choice is
    cached per shape bucket, recorded in used_backends(), and the output stays right."""
    from torch.nn.attention import SDPBackend

    from ivfast.models import attention as A

    for name in ("_timed_choice", "_timings", "_sdpa_choice", "_resolved"):   # fresh caches
        monkeypatch.setattr(A, name, {})
    monkeypatch.setattr(A, "_timing_device_ok", lambda t: True)
    monkeypatch.setattr(A, "TIMED_CANDIDATES", (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                                 SDPBackend.MATH))
    timings = iter([3.0, 1.0])       # FLASH 3 ms, (CUDNN rejected on CPU), MATH 1 ms
    calls = []

    def fake_timer(fn):
        calls.append(1)
        fn()
        return next(timings)

    monkeypatch.setattr(A, "_cuda_timer", fake_timer)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 50, 4, 16, requires_grad=True) for _ in range(3))
    out = A.attention(q, k, v, backend="sdpa")
    torch.testing.assert_close(out, A.attention_reference(q, k, v), rtol=1e-5, atol=1e-5)
    assert list(A._timed_choice.values()) == [SDPBackend.MATH]
    rep = A.timed_report()
    (entry,) = rep.values()
    assert entry["FLASH_ATTENTION"] == 3.0 and entry["MATH"] == 1.0
    assert entry["CUDNN_ATTENTION"].startswith("rejected")
    assert "sdpa:MATH" in A.used_backends().values()
    A.attention(q[:, :40], k[:, :40], v[:, :40], backend="sdpa")   # N 40 and 50: the same bucket (64)
    assert len(calls) == 2
    out.sum().backward()                                            # timing left the real graph intact
    assert q.grad is not None


# --------------------------------------------------------------------------- bench CLI
def _bench_train_step():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_train_step_dry_run_names_the_levers(tmp_path):
    import json

    bench = _bench_train_step()
    assert [sorted(k for k, v in r.items() if v) for r in bench.plan_runs(["compile", "pred_ckpt"], "cumulative")] \
        == [[], ["compile"], ["compile", "pred_ckpt"]]
    assert bench.lever_overrides(dict.fromkeys(bench.LEVERS, False) | {"pack_sets": True}, 2) == [
        "runtime.compile=false", "model.predictor.act_checkpoint=none", "model.stage2_pack_sets=true"]
    assert bench.main(["--dry-run", "--levers", "pred_ckpt", "--steps", "1", "--warmup", "0",
                       "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "train_step_dryrun_cpu.json").read_text())
    assert res["meta"]["measured"] is False and res["meta"]["torch"] and res["meta"]["ivfast"]
    assert [r["levers_on"] for r in res["rows"]] == [["none"], ["pred_ckpt"]]
    assert "model.predictor.act_checkpoint=selective" in res["rows"][1]["overrides"]
    assert res["rows"][1]["result"]["step_ms"] > 0 and res["rows"][1]["attention_backends"]


def test_step_timer_runs_the_trainers_train_step(monkeypatch):
    """The bench's step timer is ivfast.trainer.Trainer.train_step itself, fed device clips through
    the Trainer's ``loader`` argument (no data file read)."""
    import ivfast.data
    import ivfast.trainer

    bench = _bench_train_step()
    calls = []
    real_step = ivfast.trainer.Trainer.train_step
    monkeypatch.setattr(ivfast.trainer.Trainer, "train_step", lambda self: calls.append(1) or real_step(self))
    cfg = bench.preset_config("stage1", 2, dry=True)
    step = bench.TrainStep(cfg, torch.device("cpu"))
    out = step()
    step.close()
    assert calls == [1] and isinstance(step.trainer, ivfast.trainer.Trainer)
    assert isinstance(step.trainer.loader, ivfast.data.DeviceClips)
    assert torch.isfinite(out["loss"]) and out["grad_norm"] > 0 and step.trainer.step == 0


@pytest.mark.gpu
def test_cuda_teacher_fast_path_matches_the_unfused_reference():
    """On a GPU: bias+tanh-GELU in the cuBLASLt epilogue, fused qkv and autocast off give the
    unfused reference's outputs to bf16 accuracy, and FP8 runs through torch._scaled_mm where
    available."""
    from ivfast.models.teacher import teacher_agreement

    teacher = _tiny_teacher(dtype="bf16").to("cuda", torch.bfloat16)
    video = torch.rand(2, 3, 4, 56, 56, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        new = teacher(video.bfloat16())
    old = _unfused_layers(teacher, video.bfloat16())
    agree = teacher_agreement(old, new, frames=4)
    assert agree["middle_cos_min"] > 0.999 and agree["pooled_cos_min"] > 0.999, agree
    if torch.cuda.get_device_capability() >= (8, 9):
        fp8 = _tiny_teacher(dtype="bf16", fp8=True).to("cuda", torch.bfloat16)
        agree = teacher_agreement(new, fp8(video.bfloat16()), frames=4)
        assert agree["middle_cos_min"] > 0.97, agree


def test_mask_ids_travel_in_one_buffer_per_dtype():
    """Stage 2's mask arrays are packed into one host buffer per dtype (one pinned H2D copy on
    CUDA) and unpacked to exactly the arrays that went in."""
    import numpy as np
    from ivfast.models.epd import ids_to_device, pack_ids, unpack_ids

    rng = np.random.default_rng(0)
    groups = [(rng.integers(0, 99, (3, 7)), rng.integers(0, 99, (3, 5)).astype(np.int32),
               rng.integers(0, 99, (3,))),
              (rng.integers(0, 99, (2, 4)), np.zeros((0,), np.int64), rng.integers(0, 9, (3, 1, 2)))]
    flat, layout = pack_ids(groups)
    assert sorted(str(t) for t in flat) == ["torch.int32", "torch.int64"]
    assert flat[torch.int64].numel() == 21 + 3 + 8 + 0 + 6 and flat[torch.int32].numel() == 15
    for got, want in ((unpack_ids(flat, layout), groups), (ids_to_device(groups, torch.device("cpu")), groups)):
        for gg, wg in zip(got, want):
            assert len(gg) == len(wg)
            for g, w in zip(gg, wg):
                assert g.shape == w.shape and g.dtype == torch.from_numpy(w).dtype
                assert torch.equal(g, torch.from_numpy(w))
