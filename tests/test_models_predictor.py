"""ModernBERT predictor: equivalence with transformers' own layers, loading checks, assembly."""
import copy

import pytest
import torch

from ivfast.config import PredictorConfig
from ivfast.models.predictor import Predictor, load_modernbert_layers

transformers = pytest.importorskip("transformers")


def _tiny_bert(tmp_path, layers=6, **kw):
    conf = transformers.ModernBertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
        num_attention_heads=4, local_attention=8, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, **kw)
    torch.manual_seed(0)
    model = transformers.ModernBertModel(conf).eval()
    model.save_pretrained(tmp_path)
    # reload the way a user's checkpoint would be, with the eager attention path as the oracle
    ref = transformers.ModernBertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    return conf, ref


def _pcfg(n, first, **kw):
    return PredictorConfig(layers=n, dim=32, heads=4, mlp_hidden=40, first_layer_index=first,
                           local_window=8, global_every=3, **kw)


@pytest.mark.parametrize("n_layers", [3, 5])
def test_layers_equal_transformers(tmp_path, n_layers):
    from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask
    conf, ref = _tiny_bert(tmp_path)
    first = conf.num_hidden_layers - n_layers
    pred = Predictor(_pcfg(n_layers, first, init_from=str(tmp_path)), enc_dim=16, num_cls=4, grid=(2, 2, 2),
                     attn_backend="sdpa").eval()
    # global/local pattern and thetas follow the original layer indices (global when i % 3 == 0)
    assert [l.window is None for l in pred.layers] == [(first + j) % 3 == 0 for j in range(n_layers)]
    torch.manual_seed(1)
    h = torch.randn(2, 23, 32)          # longer than the local window, so the window matters
    pos_ids = torch.arange(h.shape[1])[None]
    masks = {"full_attention": create_bidirectional_mask(config=ref.config, inputs_embeds=h, attention_mask=None),
             "sliding_attention": create_bidirectional_sliding_window_mask(
                 config=ref.config, inputs_embeds=h, attention_mask=None)}
    with torch.no_grad():
        x = h
        for layer in ref.layers[first:]:
            pe = ref.rotary_emb(x, pos_ids, layer.attention_type)
            x = layer(x, attention_mask=masks[layer.attention_type], position_embeddings=pe)
        ours = pred.layers_forward(h)
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_first_layer_has_no_attention_norm(tmp_path):
    conf, ref = _tiny_bert(tmp_path, layers=3)
    pred = Predictor(_pcfg(3, 0, init_from=str(tmp_path)), enc_dim=16, num_cls=4, grid=(1, 2, 2))
    assert isinstance(pred.layers[0].attn_norm, torch.nn.Identity)
    torch.testing.assert_close(pred.layers[2].mlp.Wi.weight, ref.layers[2].mlp.Wi.weight)


def test_loading_fails_clearly(tmp_path):
    _tiny_bert(tmp_path)
    with pytest.raises(ValueError, match="first_layer_index=2 but the checkpoint has 3"):
        Predictor(_pcfg(3, 2, init_from=str(tmp_path)), enc_dim=16, num_cls=4, grid=(1, 2, 2))
    with pytest.raises(ValueError, match="mlp_hidden=48 but the checkpoint has 40"):
        cfg = _pcfg(3, 3, init_from=str(tmp_path))
        cfg.mlp_hidden = 48
        Predictor(cfg, enc_dim=16, num_cls=4, grid=(1, 2, 2))
    with pytest.raises(FileNotFoundError):
        Predictor(_pcfg(3, 3, init_from=str(tmp_path / "nope" / "x")), enc_dim=16, num_cls=4, grid=(1, 2, 2))
    # a checkpoint with a missing tensor names the key
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["layers.4.mlp.Wi.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['layers.4.mlp.Wi.weight'\]"):
        Predictor(_pcfg(3, 3, init_from=str(tmp_path)), enc_dim=16, num_cls=4, grid=(1, 2, 2))


def test_forward_assembles_visible_and_mask_tokens():
    torch.manual_seed(0)
    grid = (2, 2, 3)
    pred = Predictor(_pcfg(2, 0), enc_dim=16, num_cls=4, grid=grid, attn_backend="math")
    N = 12
    ids_keep = torch.tensor([[1, 5, 7], [0, 2, 11]])
    ids_mask = torch.stack([torch.tensor([i for i in range(N) if i not in r]) for r in ids_keep.tolist()])
    x = torch.randn(2, 4 + 3, 16, requires_grad=True)
    seq = pred.assemble(x, ids_keep, ids_mask)
    assert seq.shape == (2, 4 + N, 16)
    # explicit reference of the assembly
    ref = pred.mask_token.expand(2, N, 16).clone()
    for b in range(2):
        ref[b, ids_keep[b]] = x[b, 4:]
    ref = torch.cat([x[:, :4], ref], 1) + pred.pos_embed
    torch.testing.assert_close(seq, ref)
    out = pred(x, ids_keep, ids_mask)
    assert out.shape == (2, N, 32)
    out.square().mean().backward()
    assert x.grad is not None and pred.mask_token.grad is not None and pred.pos_embed.grad is not None
    assert all(p.grad is not None for p in pred.layers.parameters())


def test_predictor_no_graph_breaks():
    pred = Predictor(_pcfg(2, 0), enc_dim=16, num_cls=4, grid=(2, 2, 3), attn_backend="sdpa").eval()
    ids_keep = torch.tensor([[1, 5, 7], [0, 2, 11]])
    ids_mask = torch.stack([torch.tensor([i for i in range(12) if i not in r]) for r in ids_keep.tolist()])
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        pred(x, ids_keep, ids_mask)          # eager call pins the SDPA kernels first
    torch._dynamo.reset()
    exp = torch._dynamo.explain(pred)(x, ids_keep, ids_mask)
    assert exp.graph_break_count == 0, exp.break_reasons


def test_loads_masked_lm_checkpoint(tmp_path):
    """Hub checkpoints are ModernBertForMaskedLM: keys carry a 'model.' prefix."""
    conf = transformers.ModernBertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
        local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    torch.manual_seed(0)
    mlm = transformers.ModernBertForMaskedLM(conf)
    mlm.save_pretrained(tmp_path)
    pred = Predictor(_pcfg(2, 2, init_from=str(tmp_path)), enc_dim=16, num_cls=4, grid=(1, 2, 2))
    torch.testing.assert_close(pred.layers[1].attn.Wqkv.weight, mlm.model.layers[3].attn.Wqkv.weight)
    torch.testing.assert_close(pred.layers[0].attn_norm.weight, mlm.model.layers[2].attn_norm.weight)
