"""The fp32 decoder (model.decoder.dtype=fp32, the released precision) runs every GEMM without
TF32, in forward AND backward, while the rest of the step keeps the trainer's TF32 setting.

A dispatch mode records the fp32 matmul precision (``torch.backends.cuda.matmul``) at every
mm / addmm the step runs, and whether autograd's backward was running it. On CPU, TF32 changes
no number, but the flag that cuBLAS would read is the same one, so its value at each GEMM is what
a GPU would compute with. The decoder's custom ops are run through their Python implementation
under the recorder, so the GEMMs inside them are recorded too.
"""
import copy

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

from ivfast.config import load_config
from ivfast.models import build_model
from ivfast.models.diffusion import DiffusionDecoder

aten = torch.ops.aten
GEMMS = {aten.mm.default, aten.addmm.default, aten.addmm_.default, aten.bmm.default, aten.baddbmm.default,
         aten._addmm_activation.default}


def fp32_precision() -> str:
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        return m.fp32_precision
    return "tf32" if m.allow_tf32 else "ieee"


class GemmRecorder(TorchDispatchMode):
    """Records (phase, operand shapes, fp32 precision) per GEMM; phase 'bwd' inside autograd's backward."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = OPDEFS.get(func._schema.name) if func.namespace == "ivfast" else None
        if opdef is not None:        # an ivfast custom op: run its implementation where we can see it
            with self:
                return opdef._init_fn(*args, **kwargs)
        if func in GEMMS:
            phase = "bwd" if torch._C._current_autograd_node() is not None else "fwd"
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            self.seen.append((phase, shapes, fp32_precision()))
        return func(*args, **kwargs)


@pytest.fixture
def tf32_on():
    """The trainer's global setting on a GPU (trainer.py turns TF32 on), restored after the test."""
    m = torch.backends.cuda.matmul
    old = m.fp32_precision
    m.fp32_precision = "tf32"
    yield
    m.fp32_precision = old


def _decoder(impl):
    torch.manual_seed(0)
    net = DiffusionDecoder(target_dim=13, cond_dim=20, width=24, depth=2, impl=impl, dtype="fp32")
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("z_grad", [True, False])
def test_fp32_decoder_gemms_have_tf32_off_in_forward_and_backward(impl, z_grad, tf32_on):
    """z_grad=False: only the parameters need a gradient (a frozen predictor)."""
    net = _decoder(impl)
    x, t = torch.randn(9, 13), torch.randint(0, 1000, (9,))
    z = torch.randn(9, 20, requires_grad=z_grad)
    rec = GemmRecorder()
    with rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):      # the step's autocast, as on a GPU
            out = net(x, t, z)
        assert fp32_precision() == "tf32"         # the forward's switch, if any, is over
        out.float().square().sum().backward()
    fwd = [s for s in rec.seen if s[0] == "fwd"]
    bwd = [s for s in rec.seen if s[0] == "bwd"]
    # 2 time-MLP + cond + input + adaLN + 2 per block + final linear; backward has at least as many
    assert len(fwd) >= 9 and len(bwd) >= len(fwd), rec.seen
    assert all(p == "ieee" for _, _, p in rec.seen), [s for s in rec.seen if s[2] != "ieee"]
    assert fp32_precision() == "tf32"              # restored after backward
    assert (z.grad is not None) == z_grad and all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_eager_and_triton_fp32_gradients_unchanged_by_the_precision_scope(impl):
    """The scope changes no number on CPU: same gradients as the same impl with dtype auto
    (which switches nothing), bit for bit."""
    net = _decoder(impl)
    x, t = torch.randn(9, 13), torch.randint(0, 1000, (9,))
    z0 = torch.randn(9, 20)
    grads = []
    for dtype in ("fp32", "auto"):
        m = copy.deepcopy(net)
        m.dtype = dtype
        z = z0.clone().requires_grad_()
        m(x, t, z).square().sum().backward()
        grads.append([z.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


DEC_W = 37       # odd: no other GEMM of the demo model (batch 2) has a dimension of 37, so it marks the decoder's


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_stage1_step_decoder_gemms_ieee_the_rest_tf32(impl, tf32_on):
    """One stage-1 step (forward + backward of the demo model, bf16 autocast as on a GPU):
    every decoder GEMM runs with TF32 off, every other GEMM under the trainer's TF32."""
    torch.manual_seed(0)
    cfg = load_config("demo", ["model.attn_backend=sdpa", f"model.decoder.width={DEC_W}",
                               f"model.decoder.impl={impl}", "model.decoder.dtype=fp32"])
    model = build_model(cfg)
    video = torch.randint(0, 256, (2, 3, 4, 56, 56), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    rec = GemmRecorder()
    with rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(video, step_seed=3)
        out["loss"].backward()
    dec = [s for s in rec.seen if any(DEC_W in shape for shape in s[1])]
    rest = [s for s in rec.seen if s not in dec]
    assert {p for p, _, _ in dec} == {"fwd", "bwd"} and {p for p, _, _ in rest} == {"fwd", "bwd"}, rec.seen
    assert all(p == "ieee" for _, _, p in dec), [s for s in dec if s[2] != "ieee"]
    assert all(p == "tf32" for _, _, p in rest), [s for s in rest if s[2] != "tf32"]
    assert all(p.grad is not None for p in model.decoder.parameters())
