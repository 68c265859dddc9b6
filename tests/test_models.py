"""LongNet models: shapes, causality, padding, MAGNETO gammas, checkpointing, torch.compile of a training step."""

import math

import pytest
import torch
import torch.nn.functional as F

from dilated_compiler import reference
from dilated_compiler.models import LongNet, LongNetLM, longnet_spec, magneto_gamma
from dilated_compiler.nn import RotaryEmbedding

TINY = dict(dim=16, depth=2, heads=2, segment_lengths=(4, 16), dilation_rates=(1, 4), backend="torch")


def _lm(**kw):
    torch.manual_seed(0)
    return LongNetLM(40, **{**TINY, **kw})


def test_lm_shapes_tied_head_and_paper_defaults():
    lm = _lm()
    tokens = torch.randint(0, 40, (2, 21))
    logits = lm(tokens)
    assert logits.shape == (2, 21, 40) and logits.dtype == torch.float32
    assert lm.output_weight is lm.embed.weight
    # tied: the logits are the final norm's output times the embedding (captured by a hook on the norm), and no
    # other parameter has the head's shape
    seen = []
    hook = lm.norm.register_forward_hook(lambda mod, inp, out: seen.append(out))
    torch.testing.assert_close(lm(tokens), seen[0] @ lm.embed.weight.T)
    hook.remove()
    assert [name for name, p in lm.named_parameters() if p.shape == (40, 16)] == ["embed.weight"]
    assert lm.spec.causal and lm.spec.head_assignment == "all"
    paper = LongNetLM(10, depth=1, backend="torch", device="meta")
    assert [(b.segment_length, b.dilation) for b in paper.spec.branches] == [
        (2048, 1), (4096, 2), (8192, 4), (16384, 6), (32768, 12)]
    assert paper.dim == 768 and paper.heads == 12


def test_lm_first_layer_is_the_reference_attention_with_rotary():
    # the LM's attention is reference dilated attention of rotary-rotated q and k
    lm = _lm(depth=1).double()
    layer = lm.layers[0]
    attn = layer.self_attn
    tokens = torch.randint(0, 40, (1, 19))
    x = lm.embed(tokens)
    h = F.layer_norm(x, (16,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    B, N = tokens.shape
    q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(B, N, 2, 8)
    k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(B, N, 2, 8)
    v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(B, N, 2, 8)
    q, k = RotaryEmbedding(8)(q, k)
    o = reference.attention(q, k, v, lm.spec).reshape(B, N, 16)
    o = F.linear(F.layer_norm(o, (16,), attn.sub_ln.weight, attn.sub_ln.bias), attn.out_proj.weight,
                 attn.out_proj.bias)
    torch.testing.assert_close(attn(h, h, h)[0], o, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("position", ["rotary", "xpos"])
def test_lm_is_causal_and_ignores_padding(position):
    lm = _lm(position=position).eval()
    tokens = torch.randint(0, 40, (1, 24))
    changed = tokens.clone()
    changed[0, 15:] = (changed[0, 15:] + 1) % 40
    with torch.no_grad():
        a, b = lm(tokens), lm(changed)
    torch.testing.assert_close(a[0, :15], b[0, :15])
    assert not torch.allclose(a[0, 15:], b[0, 15:])
    # padded tokens are never attended to: changing them changes no other position's logits
    kpm = torch.zeros(1, 24, dtype=torch.bool)
    kpm[0, 3] = kpm[0, 9] = True
    other = tokens.clone()
    other[0, 3] = (other[0, 3] + 5) % 40
    other[0, 9] = (other[0, 9] + 7) % 40
    with torch.no_grad():
        pa, pb = lm(tokens, key_padding_mask=kpm), lm(other, key_padding_mask=kpm)
    keep = ~kpm[0]
    torch.testing.assert_close(pa[0, keep], pb[0, keep])


def test_magneto_gammas_follow_torchscale():
    assert magneto_gamma("decoder-only", 12) == pytest.approx(math.sqrt(math.log(24)))
    assert magneto_gamma("encoder", 6, 4) == pytest.approx(math.sqrt(math.log(12) * math.log(12) / 3))
    assert magneto_gamma("decoder", 4, 4) == pytest.approx(math.sqrt(math.log(12)))
    lm = _lm(depth=3)
    g = math.sqrt(math.log(6))
    assert lm.gamma == pytest.approx(g)
    for layer in lm.layers:
        assert layer.self_attn.gamma_init == pytest.approx(g) and layer.ffn.gamma_init == pytest.approx(g)
    torch.manual_seed(0)
    big = LongNetLM(10, dim=512, depth=4, heads=8, segment_lengths=(8,), dilation_rates=(1,), backend="torch")
    xavier = math.sqrt(2.0 / 1024)
    attn = big.layers[0].self_attn
    assert attn.v_proj.weight.std().item() == pytest.approx(math.sqrt(math.log(8)) * xavier, rel=0.03)
    assert attn.q_proj.weight.std().item() == pytest.approx(xavier, rel=0.03)
    net = LongNet(16, 2, 3, 2, 32, (4, 8), (1, 2), backend="torch")
    assert net.encoder_layers[0].self_attn.gamma_init == pytest.approx(magneto_gamma("encoder", 3, 2))
    assert net.decoder_layers[0].self_attn.gamma_init == pytest.approx(magneto_gamma("decoder", 2, 2))
    assert net.decoder_layers[0].cross_attn.gamma_init == 1.0


def test_checkpointing_gives_the_same_gradients():
    tokens = torch.randint(0, 40, (2, 20))
    grads, calls = [], []
    for ckpt in (False, True):
        lm = _lm(dropout=0.1, checkpointing=ckpt).train()
        count = [0]
        lm.layers[0].ffn.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        torch.manual_seed(123)  # same dropout masks; checkpoint replays the RNG state in recomputation
        loss = F.cross_entropy(lm(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        grads.append([p.grad.clone() for p in lm.parameters()])
        calls.append(count[0])
    assert calls == [1, 2]  # checkpointing really recomputed the layer in backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_compiled_training_step_matches_eager():
    # one tiny torch.compile(fullgraph=True) test: CPU inductor compilation is slow
    lm = _lm(depth=1)
    tokens = torch.randint(0, 40, (2, 17))

    def step(model, tokens):
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 40), tokens[:, 1:].reshape(-1))

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(lm, tokens)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()
    eager = step(lm, tokens)
    eager.backward()
    torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-5)
    for a, p in zip(compiled_grads, lm.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


def test_longnet_encoder_decoder():
    torch.manual_seed(0)
    net = LongNet(16, 2, 2, 2, 32, (4, 8), (1, 2), dropout=0.0, backend="torch").eval()
    src = torch.randn(2, 14, 16)
    tgt = torch.randn(2, 9, 16)
    skpm = torch.zeros(2, 14, dtype=torch.bool)
    skpm[1, 10:] = True
    with torch.no_grad():
        out = net(src, tgt, src_key_padding_mask=skpm)
        assert out.shape == (2, 9, 16) and not out.isnan().any()
        # padded source positions reach nothing
        src2 = src.clone()
        src2[1, 10:] = 50.0
        torch.testing.assert_close(net(src2, tgt, src_key_padding_mask=skpm), out)
        # the decoder is causal in the target
        tgt2 = tgt.clone()
        tgt2[:, 6:] += 1.0
        torch.testing.assert_close(net(src, tgt2, src_key_padding_mask=skpm)[:, :6], out[:, :6])


def test_model_errors():
    with pytest.raises(ValueError, match=r"segment_lengths \(2: \[4, 8\]\) and dilation_rates \(1: \[1\]\) must be "
                                         r"non-empty and of equal length"):
        LongNetLM(10, dim=16, heads=2, segment_lengths=(4, 8), dilation_rates=(1,))
    with pytest.raises(ValueError, match=r"segment_lengths\[1\]=8, dilation_rates\[1\]=16: need integers with "
                                         r"1 <= dilation <= segment length"):
        longnet_spec((4, 8), (1, 16))
    with pytest.raises(ValueError, match=r"heads \(5\) must divide dim \(16\)"):
        LongNetLM(10, dim=16, heads=5)
    with pytest.raises(ValueError, match=r"position: got 'alibi'; allowed: 'rotary', 'xpos'"):
        LongNetLM(10, dim=16, heads=2, position="alibi")
    with pytest.raises(ValueError, match=r"tokens must be an integer tensor of shape \(batch, seq\)"):
        _lm()(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"kind: got 'both'"):
        magneto_gamma("both", 2)
    # each argument by its own name
    with pytest.raises(ValueError, match=r"num_encoder_layers: got 0; allowed: an integer >= 1"):
        LongNet(d_model=16, nhead=2, num_encoder_layers=0, num_decoder_layers=1, dim_feedforward=32)
    with pytest.raises(ValueError, match=r"num_decoder_layers: got 0; allowed: an integer >= 1"):
        LongNet(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=0, dim_feedforward=32)


# LongNetLM embedding init and xpos positions
def test_lm_embedding_init_and_xpos_position():
    torch.manual_seed(0)
    lm = LongNetLM(1000, dim=256, depth=1, heads=4, segment_lengths=(8,), dilation_rates=(1,), backend="torch")
    assert lm.embed.weight.std().item() == pytest.approx(256 ** -0.5, rel=0.03)
    assert lm.layers[0].self_attn.rotary.xpos_scale_base is None
    tiny = dict(dim=16, depth=1, heads=2, segment_lengths=(4, 16), dilation_rates=(1, 4), backend="torch")
    torch.manual_seed(0)
    rot = LongNetLM(40, **tiny)
    torch.manual_seed(0)
    xpos = LongNetLM(40, position="xpos", **tiny)
    assert xpos.layers[0].self_attn.rotary.xpos_scale_base == 512.0
    tokens = torch.randint(0, 40, (1, 24))
    assert not torch.allclose(rot(tokens), xpos(tokens))


# LongNet forward is the composition encoder stack -> encoder_norm -> decoder stack -> decoder_norm
def test_longnet_forward_is_the_layer_composition():
    torch.manual_seed(0)
    net = LongNet(16, 2, 2, 2, 32, (4, 8), (1, 2), backend="torch").eval()
    src, tgt = torch.randn(2, 14, 16), torch.randn(2, 9, 16)
    skpm = torch.zeros(2, 14, dtype=torch.bool)
    skpm[1, 10:] = True
    with torch.no_grad():
        m = src
        for layer in net.encoder_layers:
            m = layer(m, src_key_padding_mask=skpm)
        m = F.layer_norm(m, (16,), net.encoder_norm.weight, net.encoder_norm.bias, net.encoder_norm.eps)
        x = tgt
        for layer in net.decoder_layers:
            x = layer(x, m, memory_key_padding_mask=skpm)
        x = F.layer_norm(x, (16,), net.decoder_norm.weight, net.decoder_norm.bias, net.decoder_norm.eps)
        torch.testing.assert_close(net(src, tgt, src_key_padding_mask=skpm), x)


# LongNet(encoder_causal=True) makes the encoder causal
def test_longnet_encoder_causal():
    torch.manual_seed(0)
    net = LongNet(16, 2, 1, 1, 32, (4, 8), (1, 2), encoder_causal=True, backend="torch").eval()
    assert net.encoder_layers[0].spec.causal
    src = torch.randn(1, 16, 16)
    src2 = src.clone()
    src2[:, 10:] += 2.0
    with torch.no_grad():
        torch.testing.assert_close(net.encode(src)[:, :10], net.encode(src2)[:, :10])


# LongNetLM(num_kv_heads=...) reaches every layer (grouped-query attention)
def test_lm_num_kv_heads():
    lm = LongNetLM(40, dim=16, depth=2, heads=4, segment_lengths=(4, 16), dilation_rates=(1, 4), num_kv_heads=2,
                   backend="torch")
    for layer in lm.layers:
        assert layer.self_attn.num_kv_heads == 2 and layer.self_attn.k_proj.weight.shape == (8, 16)
    assert lm(torch.randint(0, 40, (1, 12))).shape == (1, 12, 40)


# LongNet(checkpointing=True) recomputes encoder and decoder layers in backward, same gradients
def test_longnet_checkpointing_recomputes_and_matches():
    src, tgt = torch.randn(2, 12, 16), torch.randn(2, 8, 16)
    grads, calls = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = LongNet(16, 2, 1, 1, 32, (4, 8), (1, 2), dropout=0.1, checkpointing=ckpt, backend="torch").train()
        count = [0, 0]
        net.encoder_layers[0].ffn.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        net.decoder_layers[0].ffn.register_forward_hook(lambda *_: count.__setitem__(1, count[1] + 1))
        torch.manual_seed(5)
        net(src, tgt).square().sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
        calls.append(count)
    assert calls == [[1, 1], [2, 2]]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
