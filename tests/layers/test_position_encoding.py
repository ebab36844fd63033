"""Sine position encodings and box positional queries against hand-computed values."""

import math

import torch

from di_maskdino.layers import BoxPositionalQuery, box_position_embedding, feature_map_position_embedding, sine_features


def test_sine_features_hand_computed():
    """num_feats 4: temperatures 10000^(0/4) = 1 and 10000^(2/4) = 100, interleaved sin/cos."""
    p = 0.7
    expected = [math.sin(p), math.cos(p), math.sin(p / 100), math.cos(p / 100)]
    torch.testing.assert_close(sine_features(torch.tensor([p]), 4)[0], torch.tensor(expected))


def test_feature_map_embedding_hand_computed():
    """2 x 3 map, 8 channels: the first 4 encode the row at (i + 1) / 2 * 2 pi, the last 4
    the column at (j + 1) / 3 * 2 pi (the 1e-6 of the normalisation aside)."""
    embedding = feature_map_position_embedding(2, 2, 3, 8, torch.device("cpu"))
    assert embedding.shape == (2, 8, 2, 3)
    row, col = 2 / 2 * 2 * math.pi, 2 / 3 * 2 * math.pi  # pixel (1, 1)
    expected = [f(x / t) for x in (row, col) for t in (1, 100) for f in (math.sin, math.cos)]
    torch.testing.assert_close(embedding[1, :, 1, 1], torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_box_embedding_orders_cy_cx_w_h():
    box = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    embedding = box_position_embedding(box, 4)
    assert embedding.shape == (1, 16)
    for slot, value in enumerate([0.2, 0.1, 0.3, 0.4]):
        x = value * 2 * math.pi
        expected = [math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
        torch.testing.assert_close(embedding[0, 4 * slot : 4 * slot + 4], torch.tensor(expected))
    points = box_position_embedding(torch.tensor([[0.1, 0.2]]), 4)
    torch.testing.assert_close(points[0, :4], embedding[0, :4])  # (y, x) order as well


def test_box_positional_query_is_an_mlp_of_the_sine_embedding():
    torch.manual_seed(0)
    module = BoxPositionalQuery(8)
    boxes = torch.rand(3, 5, 4)
    first, second = module.layers
    expected = second(torch.relu(first(box_position_embedding(boxes, 4))))
    torch.testing.assert_close(module(boxes), expected)
    assert first.in_features == 16 and second.out_features == 8
