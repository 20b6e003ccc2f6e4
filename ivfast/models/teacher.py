"""Frozen SigLIP / SigLIP2 vision tower, the stage-1 teacher.

The weights come from ``transformers`` (``SiglipVisionModel`` for the fixed-resolution SigLIP2
checkpoints such as ``google/siglip2-giant-opt-patch16-256``, whose ``model_type`` is ``siglip``;
``Siglip2VisionModel`` for the NaFlex ones), loaded from a local directory or hub id. The forward
pass is ivfast's own, over those modules' weights, so that:

* the position table is resized to the token grid ONCE at load time (HF re-interpolates it on
  every call for SigLIP2), and the patch embedding is one strided conv for both variants;
* attention goes through ``ivfast.models.attention`` (flash-attn / SDPA flash on GPU);
* it returns what stage 1 needs in one pass: the hidden states ENTERING the requested layers
  (HF's ``hidden_states[i]``), the final (post-LayerNorm) tokens, the attention-pooling head's
  pooled vector per frame, and that head's attention over the frame's tokens averaged over heads
  (the semantic-masking score).

It is frozen (``requires_grad=False``), always in eval mode, runs under ``no_grad``, and each frame
of the clip is an image: frames are resized (bicubic) to ``img_size`` so the token grid equals the
student's (224 px / patch 14 = 256 px / patch 16 = 16 x 16), normalised with mean = std = 0.5.
Equality with ``transformers``' own forward is tested on tiny random configs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention


# --------------------------------------------------------------------------- FP8 (row-wise scaled)
FP8_MAX = 448.0   # largest finite float8_e4m3fn


def fp8_quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise scaled e4m3: ``t ~= q.float() * scale`` with ``scale [rows, 1]`` fp32 (amax / 448)."""
    scale = t.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    q = (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


@functools.lru_cache(maxsize=None)
def _has_fp8_gemm(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


class FP8Linear(nn.Module):
    """A frozen Linear with e4m3 weights, row-wise scales on both operands (per token for the
    activation, per output channel for the weight), fp32 accumulation, bf16 (input dtype) out.

    On CUDA with compute capability >= 8.9 this is one ``torch._scaled_mm``; elsewhere (CPU tests)
    it is emulated with the same quantisation and fp32 maths, so the numbers match the GPU's up to
    accumulation order."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        q, scale = fp8_quantize_rows(lin.weight)
        self.register_buffer("weight_fp8", q, persistent=False)           # [N, K]
        self.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)   # [1, N]
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().clone(), persistent=False)
        self.out_features = lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs = fp8_quantize_rows(x2)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
        if x.is_cuda and _has_fp8_gemm(x.device.index or 0):
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale,
                                 bias=None if self.bias is None else self.bias.to(out_dtype), out_dtype=out_dtype)
        else:
            y = (xq.float() * xs) @ (self.weight_fp8.float() * self.weight_scale.t()).t()
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.to(out_dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def teacher_agreement(ref: "TeacherOutput", other: "TeacherOutput", frames: int, ratio: float = 0.75) -> dict:
    """How far ``other`` (e.g. the FP8 teacher) moves from ``ref`` (bf16) on what stage 1 uses:
    the semantic-mask scores (Pearson correlation; overlap of the kept sets of a per-frame top-k
    mask at ``ratio``) and the alignment targets (cosine of middle-layer tokens and of the pooled
    per-frame vectors: mean and worst)."""
    from ivfast.masking import semantic_mask

    a, b = ref.scores.float(), other.scores.float()
    ac, bc = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (ac * bc).sum(1) / (ac.norm(dim=1) * bc.norm(dim=1)).clamp(min=1e-12)
    keep_a, _ = semantic_mask(a, ratio, frames=frames)
    keep_b, _ = semantic_mask(b, ratio, frames=frames)
    overlap = [len(set(x.tolist()) & set(y.tolist())) / max(1, len(x)) for x, y in zip(keep_a, keep_b)]
    mid = torch.cat([F.cosine_similarity(x.float(), y.float(), dim=-1).flatten()
                     for x, y in zip(ref.middle, other.middle)])
    pooled = F.cosine_similarity(ref.pooled.float(), other.pooled.float(), dim=-1).flatten()
    return dict(score_corr_min=corr.min().item(), mask_overlap_mean=sum(overlap) / len(overlap),
                mask_overlap_min=min(overlap), middle_cos_mean=mid.mean().item(), middle_cos_min=mid.min().item(),
                pooled_cos_mean=pooled.mean().item(), pooled_cos_min=pooled.min().item())


@dataclass
class TeacherOutput:
    middle: list          # [B, T*n, D] hidden states entering each requested layer
    tokens: torch.Tensor  # [B, T*n, D] final tokens (after post_layernorm)
    pooled: torch.Tensor  # [B, T, D] attention-pooling head output per frame (raw; stage 1 L2-normalises per frame)
    scores: torch.Tensor  # [B, T*n] pooling-head attention over each frame's tokens (mean over heads)


def tiny_teacher_arch(align_dim: int, middle_layers) -> dict:
    """The tiny random teacher used by the demo and tests: width ``align_dim``, just deep enough."""
    return dict(dim=align_dim, depth=max(list(middle_layers) + [0]) + 1,
                heads=4 if align_dim % 4 == 0 else 1, mlp_hidden=2 * align_dim)


def teacher_arch(tcfg, align_dim: int) -> dict:
    """Width, depth, heads and MLP width of the configured teacher (for building and FLOPs)."""
    if tcfg.tiny:
        return tiny_teacher_arch(align_dim, tcfg.middle_layers)
    return dict(dim=tcfg.dim, depth=tcfg.depth, heads=tcfg.heads, mlp_hidden=tcfg.mlp_hidden)


def build_hf_vision_model(tcfg, align_dim: int, dtype=torch.float32, seed: int = 0):
    """The transformers vision model: a tiny random one (``tcfg.tiny``), ``tcfg.init_from`` (a local
    directory or hub id), or ``init_from="random"``: random weights of the configured architecture."""
    import transformers
    if tcfg.tiny or tcfg.init_from == "random":
        # tiny: the demo/test teacher; "random": the configured architecture with random weights
        # (benchmarks and FLOP checks on machines without the checkpoint; never for training)
        a = teacher_arch(tcfg, align_dim)
        common = dict(hidden_size=a["dim"], intermediate_size=a["mlp_hidden"], num_hidden_layers=a["depth"],
                      num_attention_heads=a["heads"], patch_size=tcfg.patch_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if tcfg.arch == "siglip2":
                conf = transformers.Siglip2VisionConfig(num_patches=(tcfg.img_size // tcfg.patch_size) ** 2, **common)
                model = transformers.Siglip2VisionModel(conf)
            else:
                conf = transformers.SiglipVisionConfig(image_size=tcfg.img_size, **common)
                model = transformers.SiglipVisionModel(conf)
        return model.to(dtype)
    if not tcfg.init_from:
        raise ValueError("model.teacher.init_from is empty: give a SigLIP/SigLIP2 checkpoint directory or hub id "
                         "(e.g. google/siglip2-giant-opt-patch16-256), or set model.teacher.tiny=true for a demo")
    try:
        conf = transformers.AutoConfig.from_pretrained(tcfg.init_from)
    except Exception as e:
        raise FileNotFoundError(f"model.teacher.init_from={tcfg.init_from!r}: cannot read its config "
                                f"({type(e).__name__}: {e})") from e
    kind = conf.model_type
    if kind in ("siglip", "siglip_vision_model"):
        cls = transformers.SiglipVisionModel
    elif kind in ("siglip2", "siglip2_vision_model"):
        cls = transformers.Siglip2VisionModel
    else:
        raise ValueError(f"model.teacher.init_from={tcfg.init_from!r} is a {kind!r} model; expected a "
                         f"SigLIP or SigLIP2 checkpoint")
    model = cls.from_pretrained(tcfg.init_from, dtype=dtype, attn_implementation="sdpa")
    vc = model.config
    checks = {"dim": (tcfg.dim, vc.hidden_size), "depth": (tcfg.depth, vc.num_hidden_layers),
              "heads": (tcfg.heads, vc.num_attention_heads), "mlp_hidden": (tcfg.mlp_hidden, vc.intermediate_size),
              "patch_size": (tcfg.patch_size, vc.patch_size)}
    bad = [f"model.teacher.{k}={ours} but the checkpoint has {theirs}" for k, (ours, theirs) in checks.items()
           if ours != theirs]
    if bad:
        raise ValueError(f"teacher checkpoint {tcfg.init_from!r} does not match the config "
                         f"(these fields also drive the FLOP count):\n  " + "\n  ".join(bad))
    return model


class SiglipTeacher(nn.Module):
    """``forward(video01 [B, 3, T, H, W] in 0..1) -> TeacherOutput`` for a frozen HF SigLIP(2) vision model."""

    def __init__(self, hf_model: nn.Module, img_size: int, middle_layers=(), attn_backend: str = "auto",
                 fp8: bool = False):
        super().__init__()
        conf = hf_model.config
        self.hf = hf_model
        self.img_size, self.patch = img_size, conf.patch_size
        self.middle_layers = list(middle_layers)
        self.heads = conf.num_attention_heads
        self.backend = attn_backend
        depth = conf.num_hidden_layers
        if any(not 0 <= i < depth for i in self.middle_layers):
            raise ValueError(f"model.teacher.middle_layers={self.middle_layers} must index the hidden states "
                             f"entering layers 0..{depth - 1} of this {depth}-layer teacher")
        if img_size % self.patch:
            raise ValueError(f"model.teacher.img_size={img_size} must be a multiple of its patch {self.patch}")
        if not getattr(conf, "vision_use_head", True):
            raise ValueError("the teacher has no attention-pooling head (vision_use_head=False); "
                             "semantic masking needs it")
        g = img_size // self.patch
        self.grid = g
        emb = hf_model.embeddings
        D = conf.hidden_size
        with torch.no_grad():
            if isinstance(emb.patch_embedding, nn.Conv2d):          # SigLIP: conv, square table
                w = emb.patch_embedding.weight.detach().clone()
                table = emb.position_embedding.weight.detach()
                side = int(round(table.shape[0] ** 0.5))
                pos = table.reshape(side, side, D)
                if side != g:   # as HF's interpolate_pos_encoding (bicubic), done once here
                    pos = F.interpolate(pos.permute(2, 0, 1)[None].float(), size=(g, g), mode="bicubic",
                                        align_corners=False)[0].permute(1, 2, 0).to(table.dtype)
            else:                                                    # SigLIP2: linear over (ph, pw, c) patches
                p = self.patch
                w = emb.patch_embedding.weight.detach().reshape(D, p, p, 3).permute(0, 3, 1, 2).clone()
                side = emb.position_embedding_size
                table = emb.position_embedding.weight.detach().reshape(side, side, D)
                # as HF's resize_positional_embeddings (bilinear, antialias), done once here
                pos = F.interpolate(table.permute(2, 0, 1)[None].float(), size=(g, g), mode="bilinear",
                                    align_corners=False, antialias=True)[0].permute(1, 2, 0).to(table.dtype)
        self.register_buffer("patch_weight", w, persistent=False)
        self.register_buffer("patch_bias", emb.patch_embedding.bias.detach().clone(), persistent=False)
        self.register_buffer("pos", pos.reshape(g * g, D).contiguous(), persistent=False)
        self.requires_grad_(False)
        self.eval()
        # GELU in the GEMM epilogue: cuBLASLt's is the tanh form, i.e. gelu_pytorch_tanh only
        self._tanh_gelu = getattr(conf, "hidden_act", "") == "gelu_pytorch_tanh"
        self.fp8 = fp8
        self._qkv: list = []
        self._fuse_qkv()
        if fp8:
            self._to_fp8()

    # ---- load-time rewrites
    def _fuse_qkv(self) -> None:
        """q, k, v projections as one [3D, D] GEMM: the fused weight is built once and the HF
        modules' q/k/v weights become views into it (no extra memory). Redone after .to()."""
        self._qkv = []
        for layer in self.hf.encoder.layers:
            a = layer.self_attn
            if not hasattr(a, "q_proj") or isinstance(a.q_proj, FP8Linear):
                self._qkv.append(None)
                continue
            w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().contiguous()
            b = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach().contiguous()
            D = a.q_proj.weight.shape[0]
            for i, proj in enumerate((a.q_proj, a.k_proj, a.v_proj)):
                proj.weight = nn.Parameter(w[i * D:(i + 1) * D], requires_grad=False)
                proj.bias = nn.Parameter(b[i * D:(i + 1) * D], requires_grad=False)
            self._qkv.append((w, b))

    def _to_fp8(self) -> None:
        """model.teacher.fp8: every encoder-layer Linear (fused qkv, out, fc1, fc2) in row-wise FP8.
        The patch embedding, pooling head and norms stay in the weights' dtype."""
        for i, layer in enumerate(self.hf.encoder.layers):
            a = layer.self_attn
            w, b = self._qkv[i] if self._qkv[i] is not None else (None, None)
            if w is not None:
                qkv = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
                qkv.weight, qkv.bias = nn.Parameter(w, requires_grad=False), nn.Parameter(b, requires_grad=False)
                a.qkv_fp8 = FP8Linear(qkv)
                del a.q_proj, a.k_proj, a.v_proj
            a.out_proj = FP8Linear(a.out_proj)
            layer.mlp.fc1 = FP8Linear(layer.mlp.fc1)
            layer.mlp.fc2 = FP8Linear(layer.mlp.fc2)
        self._qkv = [None] * len(self._qkv)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if getattr(self, "_qkv", None):
            self._fuse_qkv()       # .to()/.cuda() copied each view separately: fuse again
        return out

    def train(self, mode: bool = True):
        return super().train(False)        # frozen: always eval

    @property
    def dim(self) -> int:
        return self.hf.config.hidden_size

    def _layer(self, layer, x, i: int):
        B, N, D = x.shape
        h = layer.layer_norm1(x)
        a = layer.self_attn
        shape = (B, N, self.heads, D // self.heads)
        # one GEMM for q, k and v
        qkv = F.linear(h, *self._qkv[i]) if self._qkv[i] is not None else a.qkv_fp8(h)
        q, k, v = qkv.view(B, N, 3, *shape[2:]).unbind(2)
        x = x + a.out_proj(attention(q, k, v, backend=self.backend).reshape(B, N, D))
        return x + self._mlp(layer.mlp, layer.layer_norm2(x))

    def _mlp(self, mlp, h):
        fc1 = mlp.fc1
        if h.is_cuda and self._tanh_gelu and isinstance(fc1, nn.Linear) and fc1.bias is not None:
            # bias + tanh-GELU in cuBLASLt's epilogue: no separate pass over [rows, mlp_hidden]
            h2 = torch._addmm_activation(fc1.bias, h.reshape(-1, h.shape[-1]), fc1.weight.t(), use_gelu=True)
            return mlp.fc2(h2.view(*h.shape[:-1], -1))
        return mlp(h)

    def _head(self, x):
        """Attention pooling with one learned probe; also returns its attention averaged over heads."""
        head = self.hf.head
        mha = head.attention
        B, N, D = x.shape
        H, hd = self.heads, D // self.heads
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        q = F.linear(head.probe.expand(B, 1, D), wq, bq).reshape(B, H, hd)   # same probe for every image
        k = F.linear(x, wk, bk).reshape(B, N, H, hd)
        v = F.linear(x, wv, bv).reshape(B, N, H, hd)
        with torch.autocast(x.device.type, enabled=False):   # the masking scores: fp32 logits
            logits = torch.einsum("bhd,bnhd->bhn", q.float(), k.float()) * hd ** -0.5
            attn = logits.softmax(-1)                                        # [B, H, N]
        o = torch.einsum("bhn,bnhd->bhd", attn.to(v.dtype), v).reshape(B, 1, D)
        o = mha.out_proj(o)
        o = o + head.mlp(head.layernorm(o))
        return o[:, 0], attn.mean(1)

    @torch.no_grad()
    def forward(self, video01: torch.Tensor) -> TeacherOutput:
        # Autocast off: the frozen weights' dtype (bf16 on CUDA) is the compute dtype, so each
        # LayerNorm returns bf16 (fp32 statistics inside the kernel) instead of an fp32 tensor
        # that autocast re-casts for q, k, v and fc1 (~100 ms/step of traffic in stage 1, predicted).
        with torch.autocast(video01.device.type, enabled=False):
            return self._forward(video01)

    def _forward(self, video01: torch.Tensor) -> TeacherOutput:
        if video01.dim() != 5 or video01.shape[1] != 3:
            raise ValueError(f"teacher input must be [B, 3, T, H, W] pixels in 0..1, got {tuple(video01.shape)}")
        B, _, T, H, W = video01.shape
        frames = video01.transpose(1, 2).reshape(B * T, 3, H, W).to(self.patch_weight.dtype)
        if (H, W) != (self.img_size, self.img_size):
            frames = F.interpolate(frames, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False)
        frames = (frames - 0.5) / 0.5
        x = F.conv2d(frames, self.patch_weight, self.patch_bias, stride=self.patch)
        x = x.flatten(2).transpose(1, 2) + self.pos
        want = {i: None for i in self.middle_layers}
        for i, layer in enumerate(self.hf.encoder.layers):
            if i in want:
                want[i] = x
            x = self._layer(layer, x, i)
        x = self.hf.post_layernorm(x)
        pooled, scores = self._head(x)
        n, D = x.shape[1], x.shape[2]
        return TeacherOutput(
            middle=[want[i].reshape(B, T * n, D) for i in self.middle_layers],
            tokens=x.reshape(B, T * n, D),
            pooled=pooled.reshape(B, T, D),
            scores=scores.float().reshape(B, T * n))


def build_teacher(tcfg, align_dim: int, attn_backend: str = "auto", dtype=torch.float32) -> SiglipTeacher:
    hf = build_hf_vision_model(tcfg, align_dim, dtype=dtype)
    fp8 = getattr(tcfg, "fp8", False)
    if fp8 and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        raise ValueError(f"model.teacher.fp8=true needs FP8 GEMMs (compute capability >= 8.9: Ada, Hopper); this "
                         f"GPU is sm_{''.join(map(str, torch.cuda.get_device_capability()))}. Set model.teacher.fp8=false")
    return SiglipTeacher(hf, tcfg.img_size, tcfg.middle_layers, attn_backend, fp8=fp8)
