"""SigLIP / SigLIP2 teacher: ivfast's forward equals transformers' own on tiny random configs."""
import pytest
import torch
import torch.nn.functional as F

from ivfast.config import TeacherConfig
from ivfast.models.teacher import SiglipTeacher, build_hf_vision_model, build_teacher

transformers = pytest.importorskip("transformers")


def _tcfg(arch, **kw):
    return TeacherConfig(tiny=True, arch=arch, img_size=32, patch_size=8, middle_layers=[1, 2],
                         student_layers=[0, 1], **kw)


@pytest.mark.parametrize("arch", ["siglip", "siglip2"])
def test_teacher_matches_transformers(tmp_path, arch):
    tcfg = _tcfg(arch)
    hf = build_hf_vision_model(tcfg, align_dim=16)
    hf.save_pretrained(tmp_path)          # and reload it as a user's checkpoint directory
    cls = transformers.SiglipVisionModel if arch == "siglip" else transformers.Siglip2VisionModel
    ref = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    loaded = TeacherConfig(init_from=str(tmp_path), img_size=32, patch_size=8, middle_layers=[1, 2],
                           dim=16, depth=3, heads=4, mlp_hidden=32)
    teacher = build_teacher(loaded, align_dim=16, attn_backend="sdpa")
    assert all(not p.requires_grad for p in teacher.parameters())

    torch.manual_seed(0)
    video = torch.rand(2, 3, 3, 24, 24)                         # resized 24 -> 32 px inside the teacher
    out = teacher(video)
    frames = F.interpolate(video.transpose(1, 2).reshape(6, 3, 24, 24), size=(32, 32), mode="bicubic",
                           align_corners=False)
    pix = (frames - 0.5) / 0.5
    with torch.no_grad():
        if arch == "siglip":
            r = ref(pixel_values=pix, output_hidden_states=True)
        else:   # NaFlex input: (ph, pw, c) patches, a full attention mask and the grid shape
            p = pix.reshape(6, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(6, 16, 8 * 8 * 3)
            r = ref(pixel_values=p, pixel_attention_mask=torch.ones(6, 16, dtype=torch.long),
                    spatial_shapes=torch.tensor([[4, 4]] * 6), output_hidden_states=True)
        h = r.last_hidden_state
        probe = ref.head.probe.expand(6, 1, 16)
        _, w = ref.head.attention(probe, h, h, need_weights=True, average_attn_weights=True)
    n = 16
    assert out.tokens.shape == (2, 3 * n, 16) and out.pooled.shape == (2, 3, 16) and out.scores.shape == (2, 3 * n)
    torch.testing.assert_close(out.tokens, h.reshape(2, 3 * n, 16), atol=1e-5, rtol=1e-4)
    for got, i in zip(out.middle, [1, 2]):
        torch.testing.assert_close(got, r.hidden_states[i].reshape(2, 3 * n, 16), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.pooled, r.pooler_output.reshape(2, 3, 16), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.scores, w[:, 0].reshape(2, 3 * n), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(out.scores.reshape(6, n).sum(-1), torch.ones(6))


def test_teacher_checks():
    tcfg = _tcfg("siglip")
    hf = build_hf_vision_model(tcfg, align_dim=16)
    with pytest.raises(ValueError, match="middle_layers"):
        SiglipTeacher(hf, 32, middle_layers=[5])
    t = SiglipTeacher(hf, 32, middle_layers=[1])
    t.train()
    assert not t.training          # frozen teacher stays in eval mode
    with pytest.raises(ValueError, match="init_from is empty"):
        build_hf_vision_model(TeacherConfig(tiny=False), 16)


def test_random_teacher_has_configured_architecture():
    tcfg = TeacherConfig(init_from="random", img_size=32, patch_size=8, middle_layers=[1],
                         dim=24, depth=2, heads=3, mlp_hidden=40)
    t = build_teacher(tcfg, align_dim=24)
    conf = t.hf.config
    assert (conf.hidden_size, conf.num_hidden_layers, conf.num_attention_heads, conf.intermediate_size) == (24, 2, 3, 40)
    out = t(torch.rand(1, 3, 2, 32, 32))
    assert out.tokens.shape == (1, 2 * 16, 24)
