"""The padding mask (MODEL.DI_MASKDINO.PADDING_MASK, `modeling/padding.py`).

The oracle of the model-level tests is the image itself: with the padding mask, an image's
predictions alone equal its predictions in a batch with a larger image and with a smaller
one (float64 to 1e-9), and a batch's training losses and gradients (with a fixed
normaliser) are the sums of its images' own. Without the padding mask the same comparisons
fail, which shows that they can."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from di_maskdino.modeling import (
    ActivationCheckpointing,
    Objective,
    SegmentationInference,
    SpecError,
    build_criterion,
    build_model,
    point_sampling,
)
from di_maskdino.modeling import matcher as matcher_module
from di_maskdino.modeling.padding import ImagePadding, check_padding_mask_support, map_stride, masked_group_norm
from di_maskdino.modeling.segmentation_inference import predict_segmentation

from .tiny import TinyBackbone, perturb, tiny_architecture

# an image and two neighbours: one larger in both directions, one smaller
SIZES = {"image": (70, 90), "larger": (130, 150), "smaller": (40, 50)}


def images(dtype=torch.float64, image_size=SIZES["image"]):
    """The three images; `image_size` replaces the size of "image"."""
    generator = torch.Generator().manual_seed(0)
    sizes = dict(SIZES, image=image_size)
    return {name: torch.rand(3, h, w, generator=generator, dtype=dtype) * 255 for name, (h, w) in sizes.items()}


def padded_model(padding_mask=True, dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    arch = tiny_architecture(padding_mask=padding_mask, **overrides)
    return perturb(build_model(arch, TinyBackbone(deep=True))).to(dtype)


# ----------------------------------------------------------------------------------------
# the parts


def test_map_stride_and_extents():
    assert [map_stride(size, 96) for size in (96, 48, 24, 12, 3, 2)] == [1, 2, 4, 8, 32, 64]
    assert map_stride(1, 20) == 32  # any stride from the canvas size on: a single cell
    with pytest.raises(ValueError, match="power-of-two"):
        map_stride(5, 96)
    padding = ImagePadding(torch.tensor([[70, 90], [33, 96]]), (96, 96))
    assert padding.extents((24, 24)).tolist() == [[18, 23], [9, 24]]  # ceil(h / 4), ceil(w / 4)
    assert padding.extents((2, 2)).tolist() == [[2, 2], [1, 2]]  # stride 64
    valid = padding.valid((24, 24))
    assert valid.shape == (2, 1, 24, 24) and int(valid[0].sum()) == 18 * 23 and int(valid[1].sum()) == 9 * 24
    torch.testing.assert_close(
        padding.frame_scale((24, 24), torch.float64),
        torch.tensor([[90 / 96, 70 / 96], [1.0, 33 / 96]], dtype=torch.float64),
    )


def test_replicate_edges_repeats_the_last_valid_row_and_column():
    padding = ImagePadding(torch.tensor([[5, 3], [8, 8]]), (8, 8))
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    out = padding.replicate_edges(x)
    expected = x[0, 0, :5, :3]
    expected = torch.cat([expected, expected[-1:].expand(3, -1)])
    expected = torch.cat([expected, expected[:, -1:].expand(-1, 5)], dim=1)
    assert torch.equal(out[0, 0], expected)
    assert torch.equal(out[1], x[1])


def test_masked_group_norm_is_group_norm_of_the_image_alone():
    norm = nn.GroupNorm(4, 8).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(1, 8, 12, 16, dtype=torch.float64)
    padding = ImagePadding(torch.tensor([[7, 10]]), (12, 16))
    out = masked_group_norm(norm, x, padding.valid((12, 16)))
    torch.testing.assert_close(out[..., :7, :10], norm(x[..., :7, :10]), rtol=0, atol=1e-12)
    assert out[..., 7:, :].abs().max() == 0 and out[..., :, 10:].abs().max() == 0


def test_masking_makes_a_convolution_stack_independent_of_the_canvas():
    torch.manual_seed(0)
    stack = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
    ).double()
    image = torch.randn(1, 3, 21, 27, dtype=torch.float64)

    def run(canvas):
        x = F.pad(image, (0, canvas[1] - 27, 0, canvas[0] - 21))
        padding = ImagePadding(torch.tensor([[21, 27]]), canvas)
        with padding.masking(stack):
            return stack(x)[..., :6, :7]  # ceil(21 / 4) x ceil(27 / 4)

    small, large = run((32, 32)), run((64, 96))
    torch.testing.assert_close(small, large, rtol=0, atol=1e-12)
    # without the masking the padded region reaches the image
    small_canvas, large_canvas = stack(F.pad(image, (0, 5, 0, 11))), stack(F.pad(image, (0, 69, 0, 43)))
    assert (small_canvas[..., :6, :7] - large_canvas[..., :6, :7]).abs().max() > 1e-3
    # the hooks are gone after the context
    assert all(not m._forward_hooks for m in stack)


def test_unsupported_backbones_and_parts_are_refused():
    with pytest.raises(ValueError, match="LayerNorm"):
        check_padding_mask_support(nn.Sequential(nn.Conv2d(3, 8, 3), nn.LayerNorm(8)))
    check_padding_mask_support(TinyBackbone(deep=True))
    with pytest.raises(SpecError, match="padding_mask"):
        tiny_architecture(padding_mask=True, checkpointing=ActivationCheckpointing(decoder=True))
    torch.manual_seed(0)
    model = build_model(tiny_architecture(padding_mask=True), TinyBackbone(deep=True))
    with pytest.raises(ValueError, match="image sizes"):
        model.eval().run(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="within the padded batch's 64 x 64"):
        model.run(torch.zeros(1, 3, 64, 64), image_sizes=[(65, 10)])
    with pytest.raises(ValueError, match="within the padded batch"):
        model.detect(torch.zeros(1, 3, 64, 64), torch.tensor([[0, 10]]))
    with pytest.raises(ValueError, match=r"must be \(2, 2\)"):
        model.detect(torch.zeros(2, 3, 64, 64), torch.tensor([[64, 64]]))
    bn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).train()
    with pytest.raises(ValueError, match="BatchNorm in training"):
        with ImagePadding(torch.tensor([[10, 10]]), (16, 16)).masking(bn):
            bn(torch.zeros(1, 3, 16, 16))


# ----------------------------------------------------------------------------------------
# the model: an image alone and in a batch


def run_alone_and_in_batches(model, image_size=SIZES["image"]):
    """Outputs of "image" alone, after "smaller" and before "larger"."""
    pictures = images(model.pixel_mean.dtype, image_size)
    results = {}
    with torch.no_grad():
        for name, (batch_images, index) in {
            "alone": ([pictures["image"]], 0),
            "with larger": ([pictures["image"], pictures["larger"]], 0),
            "with smaller": ([pictures["smaller"], pictures["image"]], 1),
        }.items():
            batch, sizes = model.preprocess(batch_images)
            output = model.run(batch, image_sizes=sizes)
            results[name] = (output, index, tuple(batch.shape[-2:]))
    return results


# (64, 96) fills its own canvas: alone it has no padding at all
@pytest.mark.parametrize("parts,image_size", [("instance", (70, 90)), ("detection", (70, 90)), ("instance", (64, 96))])
def test_an_image_predicts_the_same_alone_and_in_any_batch(parts, image_size):
    overrides = {} if parts == "instance" else dict(mask_branch=False, mask_enhanced_boxes=False)
    model = padded_model(**overrides).eval()
    results = run_alone_and_in_batches(model, image_size)
    alone, _, canvas = results["alone"]
    h, w = (s // 4 for s in image_size)
    for name in ("with larger", "with smaller"):
        output, index, other_canvas = results[name]
        assert other_canvas != canvas or name == "with smaller"
        for (label, ours), (_, theirs) in zip(alone.named(), output.named()):
            torch.testing.assert_close(theirs.logits[index], ours.logits[0], rtol=0, atol=1e-9, msg=label)
            torch.testing.assert_close(theirs.boxes[index], ours.boxes[0], rtol=0, atol=1e-9, msg=label)
            if ours.masks is not None:
                torch.testing.assert_close(
                    theirs.masks[index][:, :h, :w], ours.masks[0][:, :h, :w], rtol=0, atol=1e-9, msg=label
                )
    # the masks are zero beyond the image
    final = results["with larger"][0].final
    if final.masks is not None:
        assert final.masks[0][:, (image_size[0] + 3) // 4 :].abs().max() == 0


def test_without_the_padding_mask_the_batch_changes_the_predictions():
    model = padded_model(padding_mask=False).eval()
    results = run_alone_and_in_batches(model)
    alone = results["alone"][0].final
    larger, index, _ = results["with larger"]
    assert (larger.final.logits[index] - alone.logits[0]).abs().max() > 1e-3


def test_detections_at_the_image_size_are_the_same_in_float32():
    """The issue's float32 tolerances, through `predict` (boxes in pixels, pasted masks)."""
    model = padded_model(dtype=torch.float32).eval()
    pictures = images(torch.float32)
    alone = model.predict([pictures["image"]])[0]
    for batch, index in (([pictures["image"], pictures["larger"]], 0), ([pictures["smaller"], pictures["image"]], 1)):
        found = model.predict(batch)[index]
        assert found.labels.tolist() == alone.labels.tolist()
        torch.testing.assert_close(found.scores, alone.scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(found.boxes, alone.boxes, rtol=0, atol=1e-3)
        assert found.masks.shape == alone.masks.shape == (len(alone), *SIZES["image"])
        assert (found.masks == alone.masks).float().mean() >= 0.9999


def test_panoptic_and_semantic_outputs_are_the_same_alone_and_in_a_batch():
    model = padded_model().eval()
    inference = SegmentationInference(
        torch.tensor([True, True, False]),
        panoptic=True,
        semantic=True,
        object_mask_threshold=0.0,
        overlap_threshold=0.0,
    )
    pictures = images()
    alone = predict_segmentation(model, [pictures["image"]], inference)[0]
    assert alone.panoptic.segments, "the comparison needs segments"
    for batch, index in (([pictures["image"], pictures["larger"]], 0), ([pictures["smaller"], pictures["image"]], 1)):
        found = predict_segmentation(model, batch, inference)[index]
        torch.testing.assert_close(found.semantic, alone.semantic, rtol=0, atol=1e-9)
        assert torch.equal(found.panoptic.ids, alone.panoptic.ids)
        assert found.panoptic.segments == alone.panoptic.segments
        # (post-processing scales the boxes to pixels in float32)
        torch.testing.assert_close(found.instances.boxes, alone.instances.boxes, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------
# training: losses and gradients


def fixed_points(count, num_points, device, dtype=torch.float32):
    """The same points for every mask (a function of their number only), so that the random
    draws do not depend on how many masks the batch has."""
    generator = torch.Generator().manual_seed(num_points)
    points = torch.rand(1, num_points, 2, generator=generator, dtype=torch.float64)
    return points.to(device=device, dtype=dtype).expand(count, -1, -1).clone()


def image_targets():
    """Per image of `images()`: boxes normalised by the image, masks at the image size."""

    def target(size, boxes, labels):
        h, w = size
        masks = torch.zeros(len(labels), h, w, dtype=torch.float64)
        normalised = []
        for mask, (x0, y0, x1, y1) in zip(masks, boxes):
            mask[y0:y1, x0:x1] = 1
            normalised.append([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
        return dict(labels=torch.tensor(labels), boxes=torch.tensor(normalised, dtype=torch.float64), masks=masks)

    return {
        "image": target(SIZES["image"], [(10, 10, 40, 50), (50, 20, 88, 69)], [0, 2]),
        "larger": target(SIZES["larger"], [(20, 30, 100, 120)], [1]),
        "smaller": target(SIZES["smaller"], [(5, 5, 30, 30), (0, 0, 50, 40)], [2, 1]),
    }


def batch_losses(model, criterion, names):
    """Losses (fixed normaliser 1) and parameter gradients of a batch of the named images
    (targets in the model's frame: the image's with a padding mask, else the batch's)."""
    pictures, targets = images(), image_targets()
    model.zero_grad()
    batch, sizes = model.preprocess([pictures[n] for n in names])
    canvas = tuple(batch.shape[-2:])
    prepared = []
    for name, (h, w) in zip(names, sizes):
        target = targets[name]
        masks = target["masks"].new_zeros(len(target["labels"]), *canvas)
        masks[:, :h, :w] = target["masks"]
        frame = torch.tensor([w / canvas[1], h / canvas[0]], dtype=torch.float64)
        # with the padding mask the boxes stay in the image's frame (the criterion draws the mask
        # points in the image: `output.padding`), without it they are the batch's
        boxes = target["boxes"] if model.padding_mask else target["boxes"] * frame.repeat(2)
        prepared.append(dict(target, masks=masks, boxes=boxes))
    losses = criterion(model.run(batch, prepared, image_sizes=sizes), prepared, num_objects=1.0)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def test_training_losses_and_gradients_of_a_batch_are_its_images_own(monkeypatch):
    monkeypatch.setattr(point_sampling, "uniform_points", fixed_points)
    monkeypatch.setattr(matcher_module, "uniform_points", fixed_points)
    # no denoising queries: their groups span the batch (as many as its largest target count allows)
    model = padded_model(denoising=None).train()
    criterion = build_criterion(Objective(num_points=64))
    singles = {name: batch_losses(model, criterion, [name]) for name in ("image", "larger", "smaller")}
    for pair in (["image", "larger"], ["smaller", "image"]):
        losses, grads = batch_losses(model, criterion, pair)
        assert len(losses) > 20
        for key, value in losses.items():
            expected = sum(singles[name][0][key] for name in pair)
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-9, msg=key)
        for key, value in grads.items():
            expected = sum(singles[name][1].get(key, torch.zeros_like(value)) for name in pair)
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-9, msg=key)


def test_without_the_padding_mask_a_batch_changes_its_images_losses(monkeypatch):
    monkeypatch.setattr(point_sampling, "uniform_points", fixed_points)
    monkeypatch.setattr(matcher_module, "uniform_points", fixed_points)
    model = padded_model(padding_mask=False, denoising=None).train()
    criterion = build_criterion(Objective(num_points=64))
    alone = [batch_losses(model, criterion, [name])[0] for name in ("image", "larger")]
    together = batch_losses(model, criterion, ["image", "larger"])[0]
    worst = max(abs(float(together[k] - alone[0][k] - alone[1][k])) for k in together)
    assert worst > 1e-4


def test_a_deep_copy_masks_its_own_batches():
    """The hooks are bound to the model: a deep copy (an EMA of the weights) masks with its
    own padding, and the original stays untouched by the copy's runs."""
    import copy

    model = padded_model().eval()
    twin = copy.deepcopy(model)
    hooks = [h for m in twin.modules() for h in m._forward_hooks.values()]
    assert hooks and all(h.__self__ is twin for h in hooks)
    pictures = images()
    batch, sizes = model.preprocess([pictures["image"], pictures["larger"]])
    with torch.no_grad():
        ours, theirs = model.run(batch, image_sizes=sizes), twin.run(batch, image_sizes=sizes)
    torch.testing.assert_close(theirs.final.logits, ours.final.logits, rtol=0, atol=0)
    assert model._padding is None and twin._padding is None


def test_masked_group_norm_keeps_float16_inputs_finite():
    """Under autocast a convolution gives float16; the statistics are taken in float32 (the
    squares of float16 values above 256 overflow)."""
    norm = nn.GroupNorm(4, 8)
    x = torch.randn(1, 8, 40, 60) * 600 + 100
    padding = ImagePadding(torch.tensor([[30, 50]]), (40, 60))
    out = masked_group_norm(norm, x.half(), padding.valid((40, 60)))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    expected = norm(x[..., :30, :50])
    torch.testing.assert_close(out[..., :30, :50].float(), expected, rtol=0, atol=2e-2)


def test_bato_guided_by_t_i_is_batch_independent():
    """BATO guided by T_i chooses among every encoder token: the padded ones come last."""
    model = padded_model(bato=dict(guidance_source="T_i")).eval()
    results = run_alone_and_in_batches(model)
    alone = results["alone"][0].final
    for name in ("with larger", "with smaller"):
        output, index, _ = results[name]
        torch.testing.assert_close(output.final.logits[index], alone.logits[0], rtol=0, atol=1e-9, msg=name)


# ----------------------------------------------------------------------------------------
# a batch without padding: the oracle is the model without the switch (the release's)


def unpadded_batch_outputs(model, monkeypatch=None, force_mask=False):
    """Outputs, losses (fixed normaliser) and gradients of a float64 training batch of two
    128 x 192 images (a canvas every map of the tiny model divides: strides up to 64).
    `force_mask`: run the masking path although the batch has nothing to mask."""
    generator = torch.Generator().manual_seed(1)
    pictures = [torch.rand(3, 128, 192, generator=generator, dtype=torch.float64) * 255 for _ in range(2)]
    batch, sizes = model.preprocess(pictures)
    if force_mask:
        monkeypatch.setattr(model, "image_padding", lambda batch, sizes: ImagePadding.of(sizes, (128, 192), "cpu"))
    masks = torch.zeros(2, 128, 192, dtype=torch.float64)
    masks[0, 10:60, 20:90], masks[1, 70:128, 100:192] = 1, 1
    boxes = torch.tensor([[55 / 192, 35 / 128, 70 / 192, 50 / 128], [146 / 192, 99 / 128, 92 / 192, 58 / 128]])
    boxes = boxes.double()
    targets = [dict(labels=torch.tensor([i]), boxes=boxes[i : i + 1], masks=masks[i : i + 1]) for i in range(2)]
    criterion = build_criterion(Objective(num_points=64))
    model.zero_grad()
    output = model.run(batch, targets, image_sizes=sizes)
    losses = criterion(output, targets, num_objects=1.0)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return output, {k: v.detach() for k, v in losses.items()}, grads


def test_without_padding_the_switch_computes_what_the_release_model_computes(monkeypatch):
    """Images that fill a canvas divisible by the coarsest stride: the masked network (forced
    through its masking path) equals the network without the switch, its border tokens
    included (only the padded tokens lose query selection). To 1e-6 in float64 (gradients: 1e-6 of
    their largest): the network without the switch computes the token centres in float32, as the
    release does."""
    monkeypatch.setattr(point_sampling, "uniform_points", fixed_points)
    monkeypatch.setattr(matcher_module, "uniform_points", fixed_points)
    release = padded_model(padding_mask=False, denoising=None).train()
    switched = padded_model(padding_mask=True, denoising=None).train()
    switched.load_state_dict(release.state_dict())
    batch, sizes = switched.preprocess([torch.zeros(3, 128, 192, dtype=torch.float64)] * 2)
    assert switched.encoder.coarsest_stride == 64
    assert switched.image_padding(batch, sizes) is None  # nothing to mask: the unmasked network runs
    assert switched.image_padding(batch[..., :-64], [(128, 100), (128, 128)]) is not None

    ours, our_losses, our_grads = unpadded_batch_outputs(switched, monkeypatch, force_mask=True)
    theirs, their_losses, their_grads = unpadded_batch_outputs(release)
    assert ours.padding is not None and theirs.padding is None
    for (label, a), (_, b) in zip(ours.named(), theirs.named()):
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6, msg=label)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=1e-6, msg=label)
    assert our_losses.keys() == their_losses.keys() and len(our_losses) > 20
    for key in our_losses:
        torch.testing.assert_close(our_losses[key], their_losses[key], rtol=0, atol=1e-6, msg=key)
    assert our_grads.keys() == their_grads.keys()
    for key in our_grads:
        scale = float(their_grads[key].abs().max())
        torch.testing.assert_close(our_grads[key], their_grads[key], rtol=0, atol=1e-6 * max(scale, 1.0), msg=key)


def test_without_padding_border_tokens_are_selected_as_by_the_release(monkeypatch):
    """The release zeroes the encoder tokens whose proposal leaves (0.01, 0.99) (the outer
    columns of a map wider than 50 cells) and still lets them compete in query selection.
    Weights that give those zeroed tokens the highest possible score make the release select
    them first; the switch, through its masking path, selects the same tokens."""
    release = padded_model(padding_mask=False).eval()
    with torch.no_grad():
        heads, selection = release.head.heads, release.head.query_selection
        heads.class_embed.weight.copy_(heads.class_embed.weight[:1].expand(3, -1))  # one score for all classes
        heads.class_embed.bias.fill_(0.0)
        # a zeroed token becomes LayerNorm(bias): aligned with the class weights, the largest score
        direction = heads.class_embed.weight[0] - heads.class_embed.weight[0].mean()
        selection.memory_norm.weight.fill_(1.0)
        selection.memory_norm.bias.fill_(0.0)
        selection.memory_proj.bias.copy_(direction * 10)
    switched = padded_model(padding_mask=True)
    switched.load_state_dict(release.state_dict())
    switched.eval()
    generator = torch.Generator().manual_seed(2)
    picture = torch.rand(3, 64, 448, generator=generator, dtype=torch.float64) * 255  # stride 8: 56 columns
    batch, sizes = switched.preprocess([picture])
    monkeypatch.setattr(switched, "image_padding", lambda batch, sizes: ImagePadding.of(sizes, (64, 448), "cpu"))
    with torch.no_grad():
        ours, theirs = switched.run(batch, image_sizes=sizes), release.run(batch)
    assert ours.padding is not None
    for (label, a), (_, b) in zip(ours.named(), theirs.named()):
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6, msg=label)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=1e-6, msg=label)


@pytest.mark.parametrize("parts", ["instance", "detection"])
def test_a_single_image_detects_on_its_own_canvas_what_the_mask_computes(monkeypatch, parts):
    """`detect` of one padded image runs the network on the image itself (a canvas whose maps
    do not halve exactly: 70 x 90) instead of masking the padding: the same outputs."""
    overrides = {} if parts == "instance" else dict(mask_branch=False, mask_enhanced_boxes=False)
    model = padded_model(**overrides).eval()
    batch, sizes = model.preprocess([images()["image"]])
    assert tuple(batch.shape[-2:]) == (96, 96) and sizes == [(70, 90)]
    padding = model.image_padding(batch, sizes)
    assert model._detects_on_own_canvas(padding)
    assert not model._detects_on_own_canvas(model.image_padding(batch, [(40, 90)]))  # below the coarsest stride
    with torch.no_grad():
        own = model.detect(batch, torch.tensor(sizes))
        monkeypatch.setattr(model, "_detects_on_own_canvas", lambda padding: False)
        masked = model.detect(batch, torch.tensor(sizes))
    assert torch.equal(own.labels, masked.labels)
    torch.testing.assert_close(own.scores, masked.scores, rtol=0, atol=1e-9)
    torch.testing.assert_close(own.boxes, masked.boxes, rtol=0, atol=1e-9)
    if parts == "instance":
        assert own.mask_logits.shape == masked.mask_logits.shape and own.mask_logits.shape[-2:] == (24, 24)
        torch.testing.assert_close(own.mask_logits, masked.mask_logits, rtol=0, atol=1e-9)
    else:
        assert own.mask_logits is None and masked.mask_logits is None
