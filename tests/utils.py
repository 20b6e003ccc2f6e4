"""Helpers shared by the tests: the tolerance rule for low-precision kernels, the tiny training
config, and generated labelled clips. Test modules import them as ``from utils import ...``
(pytest puts tests/ on sys.path, as for kernel_compile)."""
import torch

from ivfast.config import Config, load_config
from ivfast.eval.synth_labels import make_labelled_clips

# --------------------------------------------------------------------------- tolerance
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}   # relative to max |ref|


def check_close(out: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor, name: str = "") -> None:
    """Flash-attention's rule: a kernel's error against a high-precision reference ``ref`` may be at
    most 2x the error of the same computation done by PyTorch in the kernel's dtype (``lowp``),
    plus ``ATOL[dtype]`` x max|ref|. Max norms over all elements, in fp64."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    ref = ref.double()
    scale = ref.abs().max().item() or 1.0
    err = (out.double() - ref).abs().max().item()
    base = (lowp.double() - ref).abs().max().item()
    tol = 2 * base + ATOL[out.dtype] * scale
    assert err <= tol, f"{name}: error {err:.3g} > 2 x torch's {base:.3g} + atol (max|ref| {scale:.3g})"


# --------------------------------------------------------------------------- tiny training config
def tiny_overrides(clip_list, out, *extra: str) -> list[str]:
    """Overrides of the demo preset for a training test: the demo's tiny model on ``clip_list``
    (no clip generation), 2 clips a step, one epoch, output in ``out``; ``extra`` wins over these."""
    return [f"data.train_list={clip_list}", "demo=false", f"runtime.output_dir={out}",
            "optim.batch_per_gpu=2", "optim.global_batch=2", "optim.epochs=1", *extra]


def tiny_cfg(clip_list, out, *extra: str) -> Config:
    return load_config("demo", tiny_overrides(clip_list, out, *extra))


# --------------------------------------------------------------------------- labelled clips
def labelled_lists(directory, train_per_class: int, val_per_class: int, classes: list[int]):
    """Train and val lists of generated labelled clips (8 frames, 32 px) of ``classes``
    (ivfast.eval.synth_labels), and the label map: (train.csv, val.csv, labels.txt)."""
    train = make_labelled_clips(directory, train_per_class, frames=8, size=32, split="train", classes=classes)
    val = make_labelled_clips(directory, val_per_class, frames=8, size=32, split="val", classes=classes)
    return train, val, directory / "labels.txt"
