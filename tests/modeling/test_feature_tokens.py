"""Feature tokens: flattening of multi-level maps and their level bookkeeping."""

import torch

from di_maskdino.layers import feature_map_position_embedding
from di_maskdino.modeling import FeatureTokens
from di_maskdino.modeling.feature_tokens import level_sizes_tensor, level_start_index_of, pixel_centres


def test_flattening_order_positions_and_round_trip():
    maps = [torch.randn(2, 4, 3, 5), torch.randn(2, 4, 2, 2), torch.randn(2, 4, 1, 3)]
    tokens = FeatureTokens.from_maps(maps)
    assert tokens.shapes == [(3, 5), (2, 2), (1, 3)] and tokens.sizes == [15, 4, 3]
    assert tokens.level_start_index.tolist() == [0, 15, 19]
    assert tokens.spatial_shapes.tolist() == [[3, 5], [2, 2], [1, 3]]
    assert tokens.level_sizes.dtype == torch.float32 and tokens.level_sizes.tolist() == [[5, 3], [2, 2], [3, 1]]
    # token 15 + 2 is row 1, column 0 of level 1
    torch.testing.assert_close(tokens.tokens[:, 17], maps[1][:, :, 1, 0])
    torch.testing.assert_close(
        tokens.pos[:, 17], feature_map_position_embedding(2, 2, 2, 4, torch.device("cpu"))[:, :, 1, 0]
    )
    for original, restored in zip(maps, tokens.level_maps()):
        torch.testing.assert_close(restored, original)
    assert tokens.finest_level() == 0
    assert torch.equal(tokens.with_tokens(tokens.tokens * 2).pos, tokens.pos)


def test_reference_points_are_pixel_centres():
    tokens = FeatureTokens.from_maps([torch.zeros(1, 4, 2, 4), torch.zeros(1, 4, 1, 1)])
    points = tokens.reference_points()
    assert points.shape == (1, 9, 2, 2)
    torch.testing.assert_close(points[0, 5, 0], torch.tensor([1.5 / 4, 1.5 / 2]))  # row 1, column 1
    torch.testing.assert_close(points[0, 8, 1], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(pixel_centres(1, 2, torch.device("cpu")), torch.tensor([[0.25, 0.5], [0.75, 0.5]]))
    assert level_start_index_of(torch.tensor([[2, 3], [4, 1], [1, 1]])).tolist() == [0, 6, 10]
    assert level_sizes_tensor([(2, 3), (4, 1)], torch.device("cpu")).tolist() == [[3.0, 2.0], [1.0, 4.0]]
