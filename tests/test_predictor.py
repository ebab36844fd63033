"""`Predictor` on the tiny model: every kind of input against the model's own `predict` on
the same pixels, batching, the two filters against filtering the unfiltered output by hand,
a model with a box mask head (its refined masks) and a class mask, both output types, and
clear errors for bad inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from di_maskdino import Predictor
from di_maskdino.images import ImageReadError, resize_image, shortest_edge_size
from di_maskdino.modeling.architecture import BoxMaskHeadSpec
from di_maskdino.modeling.postprocess import Detections

from .modeling.tiny import perturb, tiny_model


@pytest.fixture(scope="module")
def model():
    return perturb(tiny_model()).eval()


def rgb_image(seed: int, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB: smooth colour blobs (they survive JPEG) plus a little noise."""
    generator = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3))
    for channel in range(3):
        cy, cx = generator.uniform(0, height), generator.uniform(0, width)
        image[:, :, channel] = 255 * np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * (0.3 * height) ** 2))
    image += generator.uniform(0, 20, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def assert_same(found: Detections, expected: Detections):
    assert found.labels.tolist() == expected.labels.tolist()
    torch.testing.assert_close(found.scores, expected.scores, rtol=0, atol=0)
    torch.testing.assert_close(found.boxes, expected.boxes, rtol=0, atol=0)
    assert (found.masks is None) == (expected.masks is None)
    if found.masks is not None:
        assert torch.equal(found.masks, expected.masks)


def eager(model, rgb: np.ndarray, **kwargs) -> Detections:
    """The oracle: the model's own pre- and post-processing of the RGB pixels."""
    tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()
    return model.predict([tensor], **kwargs)[0]


def detections_predictor(model, **kwargs) -> Predictor:
    kwargs.setdefault("max_detections", None)
    return Predictor.from_model(model, **kwargs)


def test_arrays_tensors_and_files_give_the_models_predictions(model, tmp_path):
    rgb = rgb_image(0, 70, 100)
    expected = eager(model, rgb)
    assert len(expected) == 36 and expected.masks.any()  # 12 queries x 3 classes
    path = tmp_path / "image.png"
    Image.fromarray(rgb).save(path)
    rgb_input = detections_predictor(model, input_format="RGB")
    bgr_input = detections_predictor(model, input_format="BGR")
    for found in (
        rgb_input([rgb])[0],
        bgr_input([rgb[:, :, ::-1].copy()])[0],
        rgb_input([torch.from_numpy(rgb.transpose(2, 0, 1).copy())])[0],
        rgb_input([str(path)])[0],
        bgr_input([path])[0],  # files are read as RGB whatever the arrays' order
    ):
        assert_same(found, expected)
    # a wrong channel order is not silently the same
    assert not torch.equal(rgb_input([rgb[:, :, ::-1].copy()])[0].scores, expected.scores)


def test_network_in_bgr(model):
    """A network trained on BGR gets the channels reversed, whatever the input order."""
    rgb = rgb_image(1, 64, 80)
    expected = eager(model, rgb[:, :, ::-1])
    predictor = detections_predictor(model, model_format="BGR", input_format="RGB")
    assert_same(predictor([rgb])[0], expected)


def test_exif_orientation_of_a_jpeg_is_applied(model, tmp_path):
    rgb = rgb_image(2, 64, 96)
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels are to be rotated 90 degrees clockwise
    Image.fromarray(rgb).save(path, quality=95, exif=exif)
    with Image.open(path) as stored:  # decoded without applying the tag
        upright = np.rot90(np.asarray(stored.convert("RGB")), k=-1).copy()
    found = detections_predictor(model)([path])[0]
    expected = eager(model, upright)
    assert upright.shape[:2] == (96, 64)
    assert_same(found, expected)
    assert found.masks.shape[-2:] == (96, 64)


def test_test_time_resizing_reports_at_the_original_size(model):
    rgb = rgb_image(3, 60, 90)
    size = shortest_edge_size(60, 90, 96, 128)
    assert size == (85, 128)
    resized = resize_image(rgb, size)
    expected = eager(model, resized, output_sizes=[(60, 90)])
    found = detections_predictor(model, min_size=96, max_size=128)([rgb])[0]
    assert_same(found, expected)
    assert found.masks.shape[-2:] == (60, 90)


def test_batching(model):
    images = [rgb_image(4, 64, 96), rgb_image(5, 72, 64), rgb_image(6, 64, 96)]
    singles = [detections_predictor(model)([image])[0] for image in images]
    one_by_one = detections_predictor(model, batch_size=1)(images)
    for found, expected in zip(one_by_one, singles):
        assert_same(found, expected)
    assert [tuple(d.masks.shape[-2:]) for d in one_by_one] == [(64, 96), (72, 64), (64, 96)]
    # images of one size need no extra padding: a batch gives each one's own predictions
    # (up to the batched kernels' float rounding)
    pair = detections_predictor(model, batch_size=2)([images[0], images[2]])
    for found, expected in zip(pair, (singles[0], singles[2])):
        assert found.labels.tolist() == expected.labels.tolist()
        torch.testing.assert_close(found.scores, expected.scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(found.boxes, expected.boxes, rtol=0, atol=1e-3)


def test_score_threshold_and_max_detections_filter_the_unfiltered_output(model):
    rgb = rgb_image(7, 64, 96)
    everything = detections_predictor(model)([rgb])[0]
    threshold = everything.scores.median().item()
    for score_threshold, max_detections in ((threshold, None), (0.0, 7), (threshold, 5)):
        keep = [i for i in range(len(everything)) if everything.scores[i] >= score_threshold]
        if max_detections is not None:
            keep = sorted(keep, key=lambda i: -everything.scores[i].item())[:max_detections]
        assert 0 < len(keep) < len(everything)
        found = detections_predictor(model, score_threshold=score_threshold, max_detections=max_detections)([rgb])[0]
        expected = Detections(
            everything.scores[keep], everything.labels[keep], everything.boxes[keep], everything.masks[keep]
        )
        assert_same(found, expected)


def test_a_box_mask_head_gives_its_refined_masks():
    """The predictor of a model with a box mask head reports the head's masks, as the
    model's own `predict` does, and not the detector's; with the detector's masks asked for
    (`test_masks="detector"`, a constructor argument) it reports the detector's."""
    spec = BoxMaskHeadSpec(hidden_dim=16, roi_size=7, mask_size=14, fine_feature="image")
    refined_model = perturb(tiny_model(box_mask_head=spec)).eval()
    rgb = rgb_image(11, 64, 96)
    expected = eager(refined_model, rgb)
    found = detections_predictor(refined_model)([rgb])[0]
    assert_same(found, expected)
    refined_model.test_masks = "detector"
    try:
        detector = detections_predictor(refined_model)([rgb])[0]
    finally:
        refined_model.test_masks = "refined"
    assert found.labels.tolist() == detector.labels.tolist()  # the same (query, class) pairs
    torch.testing.assert_close(found.boxes, detector.boxes, rtol=0, atol=0)
    assert not torch.equal(found.masks, detector.masks)  # other masks (and so other scores)


def test_export_metadata_refuses_refined_masks_and_keeps_the_things():
    """An export holds the detector's inference: a model whose box mask head refines its masks
    is refused (its detector's masks, `test_masks = "detector"`, export); a panoptic model's
    export names its thing classes, which its predictor reports."""
    from di_maskdino.export import metadata_for
    from di_maskdino.modeling.segmentation_inference import SegmentationInference

    spec = BoxMaskHeadSpec(hidden_dim=16, roi_size=7, mask_size=14, fine_feature="image")
    refined_model = tiny_model(box_mask_head=spec).eval()
    with pytest.raises(ValueError, match="BOX_MASK_HEAD.TEST_MASKS detector"):
        metadata_for(refined_model)
    refined_model.test_masks = "detector"
    assert metadata_for(refined_model).instance_classes is None

    panoptic = tiny_model().eval()
    panoptic.segmentation = SegmentationInference(torch.tensor([False, True, True]), panoptic=True)
    assert metadata_for(panoptic).instance_classes == [1, 2]
    assert Predictor.from_model(panoptic).class_mask.tolist() == [False, True, True]
    panoptic.segmentation = SegmentationInference(torch.tensor([False, False, False]), semantic=True)
    with pytest.raises(ValueError, match="every class of this model is stuff"):
        Predictor.from_model(panoptic)


def test_class_mask_is_checked(model):
    with pytest.raises(ValueError, match=r"class_mask must be a \(K,\) bool vector"):
        detections_predictor(model, class_mask=[0, 2])


def test_class_mask_keeps_the_chosen_classes_after_max_detections(model):
    rgb = rgb_image(12, 64, 96)
    everything = detections_predictor(model, max_detections=20)([rgb])[0]  # 12 per class at most
    dropped = everything.labels[0].item()  # the class of the best detection
    class_mask = torch.arange(3) != dropped
    found = detections_predictor(model, max_detections=20, class_mask=class_mask)([rgb])[0]
    keep = [i for i, label in enumerate(everything.labels.tolist()) if label != dropped]
    assert 0 < len(keep) < len(everything)
    assert_same(
        found,
        Detections(
            *(t[keep] for t in (everything.scores, everything.labels, everything.boxes)), everything.masks[keep]
        ),
    )


def test_convert_gives_what_the_predictor_returns_per_image(model):
    """`convert` receives each image's detections and original size (the d2 layer passes
    detectron2's Instances maker here)."""
    images = [rgb_image(8, 64, 96), rgb_image(9, 72, 60)]
    expected = detections_predictor(model)(images)
    found = detections_predictor(model, convert=lambda detections, size: (size, detections))(images)
    assert [size for size, _ in found] == [(64, 96), (72, 60)]
    for (_, detections), wanted in zip(found, expected):
        assert_same(detections, wanted)


def test_float_pixels_need_their_range(model):
    rgb = rgb_image(10, 64, 96)
    expected = detections_predictor(model)([rgb])[0]
    as_float = rgb.astype(np.float32)
    with pytest.raises(TypeError, match=r"image 0 is a float32 array or tensor.*float_input_max=255.0"):
        detections_predictor(model)([as_float])
    with pytest.raises(TypeError, match=r"image 0 is a torch.float32 .*float_input_max=1.0 for 0-1 floats"):
        detections_predictor(model)([torch.from_numpy(as_float.transpose(2, 0, 1).copy())])
    with pytest.raises(TypeError, match="elements of type int64; give uint8 pixels"):
        detections_predictor(model)([rgb.astype(np.int64)])
    # 0-255 floats are the same pixels; 0-1 floats the same up to float rounding
    assert_same(detections_predictor(model, float_input_max=255.0)([as_float])[0], expected)
    unit = detections_predictor(model, float_input_max=1.0)
    for image in (as_float / 255.0, torch.from_numpy((as_float / 255.0).transpose(2, 0, 1).copy())):
        found = unit([image])[0]
        torch.testing.assert_close(found.scores, expected.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(found.boxes, expected.boxes, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="float_input_max must be positive"):
        detections_predictor(model, float_input_max=0.0)


def test_bad_inputs_are_named(model, tmp_path):
    predictor = detections_predictor(model)
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageReadError, match="not found.*missing.png"):
        predictor([missing])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageReadError, match="cannot decode image .*corrupt.jpg"):
        predictor([corrupt])
    with pytest.raises(ValueError, match=r"image 1 must be an \(H, W, 3\) array, got shape \(8, 8, 4\)"):
        predictor([rgb_image(9, 64, 64), np.zeros((8, 8, 4), np.uint8)])
    with pytest.raises(ValueError, match=r"image tensor 0 must be \(3, H, W\)"):
        predictor([torch.zeros(1, 3, 64, 64)])
    with pytest.raises(TypeError, match="give a list of images"):
        predictor(rgb_image(9, 64, 64))
    with pytest.raises(TypeError, match="image 0 is a int"):
        predictor([3])
    with pytest.raises(ValueError, match="input_format must be 'RGB' or 'BGR'"):
        detections_predictor(model, input_format="YUV")


def test_with_a_padding_mask_batch_8_gives_batch_1s_detections():
    """Eight images of eight sizes: each one's detections in a batch of 8 equal its own
    (the issue's float32 tolerances: scores 1e-5, boxes 1e-3 px, masks >= 99.99 % of the
    pixels); without the padding mask they do not."""
    from di_maskdino.modeling import build_model

    from .modeling.tiny import TinyBackbone, tiny_architecture

    sizes = [(64, 96), (72, 64), (100, 90), (40, 130), (96, 96), (33, 47), (120, 70), (80, 80)]
    pictures = [rgb_image(10 + i, h, w) for i, (h, w) in enumerate(sizes)]
    worst = {}
    for padding_mask in (True, False):
        torch.manual_seed(0)
        model = perturb(build_model(tiny_architecture(padding_mask=padding_mask), TinyBackbone(deep=True))).eval()
        singles = detections_predictor(model, batch_size=1)(pictures)
        batched = detections_predictor(model, batch_size=8)(pictures)
        worst[padding_mask] = max(float((b.scores - s.scores).abs().max()) for b, s in zip(batched, singles))
        if not padding_mask:
            continue
        for found, expected, size in zip(batched, singles, sizes):
            assert found.labels.tolist() == expected.labels.tolist()
            torch.testing.assert_close(found.scores, expected.scores, rtol=0, atol=1e-5)
            torch.testing.assert_close(found.boxes, expected.boxes, rtol=0, atol=1e-3)
            assert found.masks.shape[-2:] == size
            assert (found.masks == expected.masks).float().mean() >= 0.9999
    assert worst[True] < 1e-5 < worst[False]
