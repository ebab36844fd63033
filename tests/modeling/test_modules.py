"""Shapes and dtypes of the individual modules."""
import torch

from di_maskdino.modeling import BalanceAwareTokensOptimization, DeImbalance, PredictionHeads
from di_maskdino.modeling.decoder import EncoderTokens
from di_maskdino.modeling.query_selection import QuerySelection

from .tiny import TinyBackbone, tiny_images, tiny_model


def encoder_output():
    model = tiny_model()
    batch, _ = model.preprocess(tiny_images())  # padded to 64 x 96
    return model, batch, model.encoder(model.backbone(batch))


def test_encoder_levels_strides_and_mask_features():
    _, batch, out = encoder_output()
    assert [tuple(f.shape) for f in out.features] == [(2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3), (2, 32, 1, 2)]  # strides 8..64
    assert tuple(out.mask_features.shape) == (2, 32, 16, 24)  # stride 4
    assert all(f.dtype == torch.float32 for f in out.features)


def test_backbone_maps():
    features = TinyBackbone()(torch.zeros(1, 3, 64, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {"res2": (16, 24), "res3": (8, 12), "res4": (4, 6), "res5": (2, 3)}


def test_query_selection_and_de_imbalance_shapes():
    model, _, out = encoder_output()
    memory: EncoderTokens = model.head.encoder_tokens(out)
    assert memory.shapes == [[1, 2], [2, 3], [4, 6], [8, 12]]  # the decoder reads low resolution first
    assert tuple(memory.tokens.shape) == (2, 2 + 6 + 24 + 96, 32) and memory.finest_level() == (32, 8, 12)
    heads = PredictionHeads(32, 5, 32)
    selected = QuerySelection(32)(memory, out.mask_features, heads, k=20)
    assert tuple(selected.content.shape) == (2, 20, 32) and not selected.content.requires_grad
    assert tuple(selected.box_logits.shape) == (2, 20, 4)
    assert tuple(selected.predictions.masks.shape) == (2, 20, 16, 24)
    tokens, box_logits, stages = DeImbalance(32, 4, 64, 0.0, 2, [10])(selected.content, selected.box_logits, heads)
    assert tuple(tokens.shape) == (2, 10, 32) and tuple(box_logits.shape) == (2, 10, 4)
    assert len(stages) == 1 and [tuple(l.shape) for l in stages[0].logits] == [(2, 20, 5)] * 2


def test_bato_shapes():
    model, _, out = encoder_output()
    memory = model.head.encoder_tokens(out)
    heads = PredictionHeads(32, 5, 32)
    bato = BalanceAwareTokensOptimization(32, 4, 64, 0.0, num_guiding_tokens=3, num_groups=8)
    queries = torch.randn(2, 12, 32)
    guide = bato.guiding_tokens(queries, torch.randn(2, 12, 32), heads)
    assert tuple(guide.values.shape) == tuple(guide.pos.shape) == (2, 3, 32)
    balanced, mask_features = bato(memory.tokens, memory.pos, guide, out.mask_features, memory.finest_level())
    assert balanced.shape == memory.tokens.shape and mask_features.shape == out.mask_features.shape
