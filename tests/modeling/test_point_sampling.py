"""Point sampling of mask logits from their factors against sampling the logits, and against
a hand computation of bilinear sampling with zero padding."""

import torch

from di_maskdino.modeling.outputs import mask_logits
from di_maskdino.modeling.point_sampling import mask_logits_at_points, point_sample, sample_channels


def test_sample_channels_by_hand():
    # a 2 x 3 map with pixel (i, j) = 3 i + j + 1; pixel centres at ((j + 0.5) / 3, (i + 0.5) / 2)
    maps = torch.arange(1.0, 7.0, dtype=torch.float64).view(1, 2, 3).repeat(2, 1, 1)
    maps[1] *= -2
    points = torch.tensor([[0.5 / 3, 0.25], [1 / 3, 0.5], [0.0, 0.25], [1.2, 0.5]], dtype=torch.float64)
    # centre of pixel (0, 0); between pixels (0,0), (0,1), (1,0), (1,1); half a pixel left of
    # pixel (0, 0) (half of it is zero padding); outside the map
    expected = torch.tensor([1.0, (1 + 2 + 4 + 5) / 4, 0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(sample_channels(maps, points), torch.stack([expected, -2 * expected]))


def test_logits_at_points_equal_sampled_logits_even_outside_the_map():
    generator = torch.Generator().manual_seed(0)
    embed = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    features = torch.randn(4, 6, 7, generator=generator, dtype=torch.float64)
    points = torch.rand(50, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2
    logits = mask_logits(embed[None], features[None])[0]  # (5, 6, 7)
    expected = point_sample(logits[:, None], points.expand(5, -1, -1))
    torch.testing.assert_close(mask_logits_at_points(embed, features, points), expected, rtol=1e-12, atol=1e-12)
