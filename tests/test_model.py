"""The model's invariants, and the reference design's defects it must not repeat."""
import copy

import pytest
import torch

from captioning.config import ModelConfig, load_config
from captioning.model.backbone import Encoder
from captioning.model.caption_model import build_model, count_parameters
from captioning.model.layers import PositionalEncoding, grid_encoding

V = 50


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", pretrained=False, d_model=32, num_heads=4, num_encoder_layers=1,
                      num_decoder_layers=1, dim_feedforward=64, dropout=0.1, max_tokens=16)
    # one decoder layer: with more, the causal mask alone leaks some word order, which would hide the bug below
    return build_model(cfg, V).eval()


def _memory(b=2, length=4, d=32):
    return torch.randn(b, length, d, generator=torch.Generator().manual_seed(1))


def _tokens(*rows):
    return torch.tensor(rows)


def test_word_order_changes_next_word_logits(model):
    memory = _memory(1)
    a = model.decode(memory, _tokens([1, 7, 8, 9, 10]))[:, -1]
    b = model.decode(memory, _tokens([1, 9, 8, 7, 10]))[:, -1]   # same words, other order, same last word
    assert not torch.allclose(a, b, atol=1e-4)


def test_batch_axis_positions_would_be_caught(model, monkeypatch):
    """The reference added pe[batch index] to every word: the decoder then ignores word order."""
    def buggy(self, x, offset=0):
        return x + self.pe[: x.size(0)][:, None, :]
    monkeypatch.setattr(PositionalEncoding, "forward", buggy)
    memory = _memory(1)
    a = model.decode(memory, _tokens([1, 7, 8, 9, 10]))[:, -1]
    b = model.decode(memory, _tokens([1, 9, 8, 7, 10]))[:, -1]
    assert torch.allclose(a, b, atol=1e-5)  # so test_word_order_changes_next_word_logits fails on that bug


def test_positions_run_along_the_word_axis(model):
    x = model.embed_tokens(torch.full((3, 4), 5))            # (B, T, D): one word repeated
    assert torch.allclose(x[0], x[2])                          # every sequence gets the same positions
    assert not torch.allclose(x[:, 0], x[:, 1])                # successive words get different ones


def test_later_words_do_not_change_earlier_logits(model):
    memory = _memory(1)
    a = model.decode(memory, _tokens([1, 7, 8, 9, 10, 11]))
    b = model.decode(memory, _tokens([1, 7, 8, 20, 21, 22]))
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-5)
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-4)


def test_padding_changes_nothing(model):
    memory = _memory(2)
    short = model.decode(memory[:1], _tokens([1, 7, 8, 2]))
    padded = model.decode(memory, _tokens([1, 7, 8, 2, 0, 0], [1, 5, 6, 7, 8, 2]))
    assert torch.allclose(short, padded[:1, :4], atol=1e-5)
    longer = model.decode(memory[1:], _tokens([1, 5, 6, 7, 8, 2]))
    assert torch.allclose(longer, padded[1:], atol=1e-5)


def test_image_index_equals_repeated_images(model):
    images = torch.randn(2, 3, 64, 64)
    tokens = _tokens([1, 7, 8, 2], [1, 5, 2, 0], [1, 9, 9, 2])
    index = torch.tensor([0, 0, 1])
    a = model(tokens, index, images=images)
    b = model(tokens, images=images[index])
    assert a.shape == (3, 4, V)
    assert torch.allclose(a, b, atol=1e-5)


def test_grid_positions_are_distinct():
    pe = grid_encoding(7, 7, 64)
    assert pe.shape == (49, 64)
    assert torch.cdist(pe, pe).add(torch.eye(49) * 1e3).min() > 0.1


def test_frozen_encoder_stays_frozen_and_in_eval_mode():
    model = build_model(ModelConfig(backbone="resnet18", pretrained=False, d_model=32, num_heads=4,
                                    num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32), V)
    model.train()
    assert not model.encoder.training and model.transformer.training
    assert all(not p.requires_grad for p in model.encoder.parameters())
    running = model.encoder.body.bn1.running_mean.clone()
    model(_tokens([1, 4, 2], [1, 5, 2]), images=torch.randn(2, 3, 64, 64)).sum().backward()
    assert torch.equal(running, model.encoder.body.bn1.running_mean)
    assert all(p.grad is None for p in model.encoder.parameters())


def test_encoder_keeps_torchvision_names_for_strict_loading():
    import torchvision
    resnet = torchvision.models.resnet18(weights=None)
    model = build_model(ModelConfig(backbone="resnet18", pretrained=False, d_model=32, num_heads=4,
                                    num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32), V)
    state = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    model.encoder.body.load_state_dict(state, strict=True)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "resnext50_32x4d"])   # BasicBlock, Bottleneck, grouped
def test_folded_encoder_gives_the_same_features_without_batchnorm(backbone):
    torch.manual_seed(0)
    encoder = Encoder(backbone, pretrained=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # statistics far from the defaults, so that a BatchNorm left out or folded wrong shows
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.25)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    folded = encoder.folded()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert not folded.training and all(not p.requires_grad for p in folded.parameters())
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        expected, got = encoder(x), folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    state = encoder.state_dict()                  # the encoder itself is untouched
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    # bf16 weights are folded in fp32 and rounded once, not folded in bf16
    encoder.to(torch.bfloat16)
    from_bf16, in_fp32 = encoder.folded(), copy.deepcopy(encoder).float().folded()
    assert next(from_bf16.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(from_bf16.parameters(), in_fp32.parameters()))
    with pytest.raises(ValueError, match="frozen"):
        Encoder("resnet18", pretrained=False, trainable=True).folded()


def test_reference_parameter_counts():
    """configs/flickr30k.yaml with the reference's 7,736 words: 53.1 M trainable + 58.1 M frozen."""
    cfg = load_config("configs/flickr30k.yaml", ["model.pretrained=false"], check_paths=False)
    trainable, frozen = count_parameters(build_model(cfg.model, 7736))
    assert round(trainable / 1e6, 1) == 53.1 and round(frozen / 1e6, 1) == 58.1


def test_dmodel128_variant():
    cfg = load_config("configs/dmodel128.yaml", ["model.pretrained=false"], check_paths=False)
    assert (cfg.model.d_model, cfg.model.num_heads) == (128, 4)
    trainable, frozen = count_parameters(build_model(cfg.model, 7736))
    assert trainable < 12e6 and round(frozen / 1e6, 1) == 58.1


@pytest.mark.parametrize("stages, grid, channels", [(2, 8 * 8, 128), (3, 4 * 4, 256), (4, 2 * 2, 512)])
def test_fewer_stages_give_a_finer_grid(stages, grid, channels):
    cfg = ModelConfig(backbone="resnet18", pretrained=False, backbone_stages=stages, d_model=32, num_heads=4,
                      num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32)
    model = build_model(cfg, V).eval()
    assert model.encoder(torch.randn(1, 3, 64, 64)).shape == (1, grid, channels)
    assert model(_tokens([1, 4, 2]), images=torch.randn(1, 3, 64, 64)).shape == (1, 3, V)


def test_words_positions_and_image_start_at_the_same_scale(model):
    words = model.embed.weight[4:] * model.cfg.d_model ** 0.5      # (V-4, D) as embed_tokens scales them
    assert 0.8 < words.std().item() < 1.2                          # positions are sin/cos: std ~0.7
    assert torch.count_nonzero(model.embed.weight[model.pad_id]) == 0


def _nn_decode(model, memory, tokens):
    """The plain nn.TransformerDecoder call on memory (N, L, D) copied per caption, with both masks."""
    x = model.transformer.decoder(model.embed_tokens(tokens), memory,
                                  tgt_mask=torch.triu(torch.ones(tokens.size(1), tokens.size(1), dtype=torch.bool), 1),
                                  tgt_is_causal=True, tgt_key_padding_mask=tokens == model.pad_id)
    return model.head(x)


@pytest.mark.parametrize("norm_first", [False, True])
def test_shared_cross_attention_equals_nn_transformer_decoder(norm_first):
    """decode() projects each image's cross-attention keys/values once for all of its captions; the
    logits and every gradient equal nn.TransformerDecoder's on memory copied to each caption."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", pretrained=False, d_model=32, num_heads=4, num_encoder_layers=1,
                      num_decoder_layers=2, dim_feedforward=64, dropout=0.1, max_tokens=16)
    model = build_model(cfg, V).eval()              # no dropout: the two paths draw their masks differently
    for layer in model.transformer.decoder.layers:
        layer.norm_first = norm_first
    memory = _memory(3, length=5).requires_grad_()
    # the last row has a <pad> mid-caption: only a padding mask keeps the words after it from seeing it
    tokens = _tokens([1, 7, 8, 2, 0, 0], [1, 5, 6, 7, 8, 2], [1, 9, 2, 0, 0, 0], [1, 4, 4, 4, 4, 2], [1, 6, 0, 6, 9, 2])
    index = torch.tensor([0, 0, 2, 1, 1])
    real = tokens != model.pad_id                   # what <pad> positions compute, the loss ignores

    def logits_and_grads(fn):
        model.zero_grad()
        memory.grad = None
        logits = fn()
        (logits[real] * torch.linspace(-1, 1, V)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits[real].detach(), grads, memory.grad.clone()

    ours, ours_grads, ours_memory = logits_and_grads(lambda: model.decode(memory, tokens, index))
    ref, ref_grads, ref_memory = logits_and_grads(lambda: _nn_decode(model, memory[index], tokens))
    assert not torch.allclose(ours[:4], ours[4:8], atol=1e-3)        # the captions do differ
    assert torch.allclose(ours, ref, atol=1e-5)
    assert ours_grads.keys() == ref_grads.keys() and len(ref_grads) > 20
    for name, grad in ref_grads.items():
        assert torch.allclose(ours_grads[name], grad, atol=1e-5), name
    assert torch.allclose(ours_memory, ref_memory, atol=1e-5)
    assert ours_memory[1].abs().sum() > 0                            # image 1 gets its caption's gradient
