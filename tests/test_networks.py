"""The small CNN's geometry: what one unit of its second block sees of the input."""
import torch

from dihn_dist.models.networks import SmallCNN


def test_second_block_units_see_a_whole_small_object():
    """A second-block unit must see 14 px of the input: objects of 12-16 px anywhere in a 32 px frame
    (multi-label mosaics) are otherwise seen in pieces, which cost DIHN 0.025 mAP on the multi-label
    benchmark (docs/quality.md). The 3x3 network's units saw 8 px."""
    torch.manual_seed(0)
    network = SmallCNN(8)
    second_block = network.features[:5]   # conv, unit, pool, conv, unit: before the second pool
    # Max pooling passes the gradient to one pixel of each window: random images, so that together they
    # reach every pixel a unit depends on.
    images = torch.randn(16, 3, 32, 32, requires_grad=True)
    out = second_block(images)
    centre = out.shape[-1] // 2
    out[:, :, centre, centre].sum().backward()
    seen = images.grad.abs().sum(dim=(0, 1, 2)).nonzero().flatten()   # the columns the unit depends on
    assert int(seen.max() - seen.min()) + 1 >= 14
