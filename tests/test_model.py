"""The model's parts against their definitions and against torch's own implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from export.model import (
    MASK_VALUE,
    ModelConfig,
    MultiHeadAttention,
    causal_bias,
    greedy_decode,
    make_model,
    padding_bias,
    scaled_dot_product_attention,
    sinusoidal_positions,
)

torch.manual_seed(0)


def tiny(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(
        vocab_size=40,
        d_model=16,
        n_heads=4,
        d_ff=32,
        n_encoder_layers=2,
        n_decoder_layers=2,
        dropout=0.0,
        max_positions=64,
    )
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def test_attention_matches_torch_reference_with_padding_and_causal_masks() -> None:
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    key_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    bias = padding_bias(key_mask) + causal_bias(5)  # (2, 1, 5, 5)
    out, probs = scaled_dot_product_attention(q, k, v, bias)
    allowed = (key_mask[:, None, None, :] == 1) & torch.ones(5, 5, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    # rows are distributions; masked keys and future positions get exactly zero weight
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 5))
    assert torch.all(probs[~allowed.expand_as(probs)] == 0.0)
    assert torch.all(probs[0, :, 0, 1:] == 0.0)  # first query sees only itself
    assert torch.all(probs[1, :, :, 3:] == 0.0)  # padding keys of row 1


def test_fully_masked_row_is_finite() -> None:
    q, k, v = (torch.randn(1, 1, 2, 4) for _ in range(3))
    out, probs = scaled_dot_product_attention(q, k, v, padding_bias(torch.tensor([[0, 0]])))
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()


def test_masks() -> None:
    c = causal_bias(3)[0, 0]
    assert c.shape == (3, 3)
    assert torch.equal(c == 0, torch.ones(3, 3, dtype=torch.bool).tril())
    assert torch.all(c[torch.ones(3, 3, dtype=torch.bool).triu(1)] == MASK_VALUE)
    p = padding_bias(torch.tensor([[1, 0, 1]]))
    assert p.shape == (1, 1, 1, 3)
    assert p.flatten().tolist() == [0.0, MASK_VALUE, 0.0]


def test_sinusoidal_positions_values() -> None:
    pe = sinusoidal_positions(50, 8)
    assert pe.shape == (50, 8)
    for pos in (0, 1, 7, 49):
        for i in range(4):
            angle = pos / (10000 ** (2 * i / 8))
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_multi_head_attention_equals_torch_module() -> None:
    d, h = 16, 4
    ours = MultiHeadAttention(d, h, 0.0).eval()
    ref = torch.nn.MultiheadAttention(d, h, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.w_q.weight, ours.w_k.weight, ours.w_v.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.w_q.bias, ours.w_k.bias, ours.w_v.bias]))
        ref.out_proj.weight.copy_(ours.w_o.weight)
        ref.out_proj.bias.copy_(ours.w_o.bias)
    x, mem = torch.randn(2, 3, d), torch.randn(2, 6, d)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    out, probs = ours(x, mem, padding_bias(mask))
    ref_out, ref_probs = ref(x, mem, mem, key_padding_mask=mask == 0, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-5)
    assert probs.shape == (2, h, 3, 6)


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("tie", [True, False])
def test_shapes_and_cached_steps_equal_full_decoding(norm: str, tie: bool) -> None:
    model = make_model(tiny(norm=norm, tie_embeddings=tie)).eval()
    src = torch.randint(4, 40, (3, 7))
    src_mask = torch.ones(3, 7, dtype=torch.long)
    src_mask[2, 4:] = 0
    tgt = torch.randint(4, 40, (3, 5))
    with torch.no_grad():
        logits, cross = model(src, src_mask, tgt, torch.ones(3, 5, dtype=torch.long))
        assert logits.shape == (3, 5, 40)
        assert len(cross) == 2 and cross[0].shape == (3, 4, 5, 7)
        assert torch.all(cross[0][2, :, :, 4:] == 0.0)  # padded source keys
        enc = model.encode(src, src_mask)
        assert enc.memory.shape == (3, 7, 16)
        assert enc.cross_kv[1][0].shape == (3, 4, 7, 4)
        assert enc.self_attentions[0].shape == (3, 4, 7, 7)
        past = model.empty_past(3)
        self_mask = torch.ones(3, 1, dtype=torch.long)
        for t in range(5):
            step = model.decode_step(
                tgt[:, t], torch.full((3,), t), past, self_mask, enc.cross_kv, src_mask
            )
            torch.testing.assert_close(step.logits, logits[:, t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step.cross_attentions[1], cross[1][:, :, t])
            assert step.present[0][0].shape == (3, 4, t + 1, 4)
            past = step.present
            self_mask = torch.cat([self_mask, torch.ones(3, 1, dtype=torch.long)], 1)


def test_tied_embeddings_share_one_matrix() -> None:
    model = make_model(tiny())
    assert model.generator.weight is model.src_embed.weight is model.tgt_embed.weight
    untied = make_model(tiny(tie_embeddings=False))
    assert untied.generator.weight is not untied.src_embed.weight


def test_config_validation_and_round_trip() -> None:
    cfg = tiny(norm="pre")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="not divisible"):
        tiny(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_greedy_decode_respects_limits_and_returns_attention() -> None:
    model = make_model(tiny()).eval()
    src = torch.randint(4, 40, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    out, attn = greedy_decode(model, src, mask, torch.tensor([3, 0]), return_attention=True)
    assert len(out[0]) <= 3 and out[1] == []
    assert attn is not None
    assert attn[0].shape == (2, 4, len(out[0]), 6)
    assert attn[1].shape == (2, 4, 0, 6)
    if out[0]:
        torch.testing.assert_close(attn[0].sum(-1), torch.ones(2, 4, len(out[0])))


def test_halves_layout_is_all_sines_then_all_cosines() -> None:
    ours = sinusoidal_positions(50, 8)
    halves = sinusoidal_positions(50, 8, "halves")
    assert torch.equal(halves, torch.cat([ours[:, 0::2], ours[:, 1::2]], 1))


def test_defaults_of_the_pretrained_model_fields_are_the_model_as_before() -> None:
    """A config written before the fields existed loads with the old computation: shared and
    tied embeddings, start at bos, and the same config after a round trip."""
    old = {k: v for k, v in tiny().to_dict().items() if k in OLD_FIELDS}
    cfg = ModelConfig.from_dict(old)
    assert (cfg.share_embeddings, cfg.decoder_start_id, cfg.target_vocab) == (True, 2, 40)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict({**old, "tie_embeddings": False}).share_embeddings is False
    model = make_model(cfg)
    assert model.logits_bias is None and "logits_bias" not in model.state_dict()


OLD_FIELDS = (
    "vocab_size", "d_model", "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers",
    "dropout", "max_positions", "norm", "tie_embeddings", "pad_id", "bos_id", "eos_id",
)  # fmt: skip


def _logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 30, (2, 6), generator=gen)
    tgt = torch.randint(4, 30, (2, 4), generator=gen)
    with torch.no_grad():
        return model(src, torch.ones(2, 6, dtype=torch.long), tgt, torch.ones(2, 4))[0]


@pytest.mark.parametrize(
    "field",
    [
        {"positions": "halves"},
        {"scale_embedding": False},
        {"activation": "swish"},
        {"activation": "gelu"},
        {"activation": "gelu_tanh"},
        {"layer_norm_eps": 1e-1},
    ],
)
def test_every_pretrained_model_field_changes_the_computation(field: dict[str, object]) -> None:
    torch.manual_seed(1)
    base = make_model(tiny()).eval()
    changed = make_model(tiny(**field)).eval()
    changed.load_state_dict(base.state_dict())
    assert not torch.allclose(_logits(base), _logits(changed), atol=1e-4)


def test_final_logits_bias_is_added_to_every_logit() -> None:
    torch.manual_seed(1)
    base = make_model(tiny()).eval()
    biased = make_model(tiny(final_logits_bias=True)).eval()
    state = {**base.state_dict(), "logits_bias": torch.arange(40.0)[None]}
    biased.load_state_dict(state)
    torch.testing.assert_close(_logits(biased) - _logits(base), torch.arange(40.0).expand(2, 4, 40))


def test_separate_target_vocabulary_and_start_token() -> None:
    cfg = tiny(share_embeddings=False, tgt_vocab_size=25, decoder_start_id=24, pad_id=24)
    model = make_model(cfg).eval()
    assert model.tgt_embed.weight.shape == (25, 16) and model.src_embed.weight.shape == (40, 16)
    assert model.generator.weight is model.tgt_embed.weight
    src = torch.randint(4, 40, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        logits, _ = model(src, mask, torch.full((2, 1), 24), torch.ones(2, 1))
        enc = model.encode(src, mask)
        step = model.decode_step(
            torch.full((2,), 24), torch.zeros(2, dtype=torch.long), model.empty_past(2),
            torch.ones(2, 1, dtype=torch.long), enc.cross_kv, mask,
        )  # fmt: skip
    assert logits.shape == (2, 1, 25)
    torch.testing.assert_close(step.logits, logits[:, 0])
    # greedy decoding starts from decoder_start_id: its first step is that of token 24
    out, _ = greedy_decode(model, src, mask, 1)
    first = [[t] if t != cfg.eos_id else [] for t in logits[:, 0].argmax(-1).tolist()]
    assert out == first
    with pytest.raises(ValueError, match="share_embeddings needs"):
        tiny(share_embeddings=True, tgt_vocab_size=25)
    with pytest.raises(ValueError, match="decoder_start_id must be"):
        tiny(tgt_vocab_size=25, share_embeddings=False, decoder_start_id=30)
    with pytest.raises(ValueError, match="activation must be one of"):
        tiny(activation="mish")
