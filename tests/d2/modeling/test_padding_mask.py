"""MODEL.DI_MASKDINO.PADDING_MASK through detectron2's meta-architecture, on the quick-start
model (detectron2's ResNet-18 with GroupNorm), in float64: an image's detections alone equal
its detections in a batch with a larger image, and a batch's losses and gradients (fixed
normaliser) are the sums of its images' own, from detectron2 inputs (boxes in pixels, bitmasks).
Random draws are made batch-independent as in test_accumulation.py; denoising queries are off
(their groups span the batch)."""

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see INSTALL.md)")

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402

from di_maskdino.d2 import ConfigError, load_config  # noqa: E402
from tests.d2.engine.test_accumulation import FixedRandom  # noqa: E402
from tests.tooling import QUICK  # noqa: E402

SETTING = [
    "MODEL.DI_MASKDINO.PADDING_MASK",
    "True",
    "MODEL.DI_MASKDINO.DN.ENABLED",
    "False",
    "MODEL.DI_MASKDINO.LOSS.TRAIN_NUM_POINTS",
    "64",
]


def example(seed: int, height: int, width: int):
    """A detectron2 input of the given size with two rectangles."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
    boxes, masks = [], []
    for k, (x0, y0, x1, y1) in enumerate([(3, 5, width // 2, height // 2), (width // 3, height // 4, width, height)]):
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[y0:y1, x0:x1] = True
        image[:, y0:y1, x0:x1] = 60 + 90 * k
        boxes.append([x0, y0, x1, y1])
        masks.append(mask)
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.gt_classes = torch.tensor([seed % 3, (seed + 1) % 3])
    instances.gt_masks = BitMasks(torch.stack(masks))
    return {"image": image, "instances": instances, "height": height, "width": width}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    built = build_model(load_config(QUICK, SETTING)).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised heads take part
        for p in built.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.02)
    return built


INPUTS = {"image": (0, 70, 90), "larger": (1, 130, 110)}


def losses_and_grads(model, names):
    model.train()
    model.zero_grad()
    with FixedRandom():
        losses = model([example(*INPUTS[n]) for n in names], num_objects=1.0)
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}, {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def test_targets_are_normalised_by_each_image(model):
    item = example(*INPUTS["image"])
    target = model.targets([item], (160, 128))[0]
    x0, y0, x1, y1 = item["instances"].gt_boxes.tensor[1].tolist()
    expected = [(x0 + x1) / 2 / 90, (y0 + y1) / 2 / 70, (x1 - x0) / 90, (y1 - y0) / 70]
    torch.testing.assert_close(target["boxes"][1], torch.tensor(expected, dtype=torch.float64))
    assert target["masks"].shape == (2, 160, 128)


def test_a_batch_trains_as_its_images_one_by_one(model):
    singles = [losses_and_grads(model, [name]) for name in INPUTS]
    losses, grads = losses_and_grads(model, list(INPUTS))
    for key, value in losses.items():
        torch.testing.assert_close(value, singles[0][0][key] + singles[1][0][key], rtol=0, atol=1e-9, msg=key)
    for key, value in grads.items():
        expected = sum(s[1].get(key, torch.zeros_like(value)) for s in singles)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-9, msg=key)


def test_inference_alone_and_in_a_batch(model):
    model.eval()
    with torch.no_grad():
        alone = model([example(*INPUTS["image"])])[0]["instances"]
        batched = model([example(*INPUTS["image"]), example(*INPUTS["larger"])])[0]["instances"]
    assert alone.image_size == batched.image_size == (70, 90)
    assert torch.equal(alone.pred_classes, batched.pred_classes)
    torch.testing.assert_close(batched.scores, alone.scores, rtol=0, atol=1e-9)
    # boxes are scaled to pixels, and masks pasted, in float32
    torch.testing.assert_close(batched.pred_boxes.tensor, alone.pred_boxes.tensor, rtol=0, atol=1e-4)
    assert (batched.pred_masks == alone.pred_masks).float().mean() >= 0.9999


def test_the_padding_mask_refuses_what_it_does_not_cover():
    with pytest.raises(ConfigError) as error:
        load_config(QUICK, SETTING + ["MODEL.DI_MASKDINO.ACTIVATION_CHECKPOINTING.DECODER", "True"])
    assert "PADDING_MASK" in str(error.value)


def test_batchnorm_in_training_is_refused():
    """detectron2's ResNet with BatchNorm (inside its Conv2d) would take statistics over the
    padding in training."""
    torch.manual_seed(0)
    model = build_model(load_config(QUICK, SETTING + ["MODEL.RESNETS.NORM", "BN"])).train()
    with pytest.raises(ValueError, match="BatchNorm in training"):
        model([example(*INPUTS["image"])])
    model.eval()
    with torch.no_grad():
        assert len(model([example(*INPUTS["image"])])[0]["instances"]) > 0


def test_frozen_batchnorm_resnet_alone_and_in_a_batch():
    """The release's backbone norm (FrozenBN, applied inside detectron2's Conv2d): an image's
    detections alone equal its detections beside a larger image."""
    torch.manual_seed(0)
    frozen = build_model(load_config(QUICK, SETTING + ["MODEL.RESNETS.NORM", "FrozenBN"])).double().eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in frozen.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.02)
        for name, buffer in frozen.backbone.named_buffers():  # statistics that shift and scale
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.5, generator=generator)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0, generator=generator)
        alone = frozen([example(*INPUTS["image"])])[0]["instances"]
        batched = frozen([example(*INPUTS["image"]), example(*INPUTS["larger"])])[0]["instances"]
    assert len(alone) > 0 and torch.equal(alone.pred_classes, batched.pred_classes)
    torch.testing.assert_close(batched.scores, alone.scores, rtol=0, atol=1e-9)
    torch.testing.assert_close(batched.pred_boxes.tensor, alone.pred_boxes.tensor, rtol=0, atol=1e-4)
