#!/usr/bin/env python
"""Runs the authors' release (DI-MaskDINO or MaskDINO) and this project's model on the same
images and weights, on the CPU, and compares every prediction.

The release is imported from a local checkout given by --release-source; nothing of it is
copied. To run it without its CUDA extension, the extension module is replaced by an empty
one (the release then uses its own pure-PyTorch path) and the tensor method `cuda` returns the
tensor unchanged. Needs detectron2.

    python dev/compare_with_release.py --release-source /path/to/DI-MaskDINO \\
        --config configs/dimaskdino_r50_4scale_bs16_12ep.yaml [--weights release.pth]

Without --weights, the release model is randomly initialised and all its parameters are
perturbed (so that no head starts at zero); the converted state dict is loaded into ours.
Exit status 0 when all compared tensors agree within --atol / --rtol.

With --train, one training step instead: the same batch (random images with rectangular
objects) through the release's training forward and ours, every random draw made equal on
both sides; it prints every loss term and the gradients of representative parameters side
by side, and checks the Hungarian assignments (dev/release_training_comparison.py).
"""

import argparse
import contextlib
import io
import os
import sys
import types

import numpy as np
import torch


def import_release(source: str):
    """Imports the release package found in `source` and returns (package, add_config)."""
    sys.modules.setdefault("MultiScaleDeformableAttention", types.ModuleType("MultiScaleDeformableAttention"))
    # the release moves tensors to the GPU unconditionally (.cuda(), .to("cuda")); on the CPU
    # that must be a no-op
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):
        if args and str(args[0]).startswith("cuda"):
            args = args[1:]
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs.pop("device")
        return to(self, *args, **kwargs) if args or kwargs else self

    torch.Tensor.to = to_cpu
    sys.path.insert(0, source)
    for name, config_function in (("dimaskdino", "add_dimaskdino_config"), ("maskdino", "add_maskdino_config")):
        if os.path.isdir(os.path.join(source, name)):
            package = __import__(name)
            return package, getattr(package, config_function)
    raise SystemExit(f"{source} holds neither a dimaskdino/ nor a maskdino/ package")


def release_config(add_config, config_file: str):
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def release_architecture(cfg):
    """The `Architecture` a release configuration describes."""
    from di_maskdino.modeling import Architecture, BATOSpec, DeImbalanceSpec, DenoisingSpec, EncoderSpec

    m, s = cfg.MODEL.MaskDINO, cfg.MODEL.SEM_SEG_HEAD
    di = m.TRANSFORMER_DECODER_NAME == "DIMaskDINODecoder"
    return Architecture(
        num_classes=s.NUM_CLASSES,
        hidden_dim=m.HIDDEN_DIM,
        mask_dim=s.MASK_DIM,
        num_heads=m.NHEADS,
        ffn_dim=m.DIM_FEEDFORWARD,
        dropout=m.DROPOUT,
        num_levels=s.TOTAL_NUM_FEATURE_LEVELS,
        num_queries=m.NUM_OBJECT_QUERIES,
        num_decoder_layers=m.DEC_LAYERS,
        mask_enhanced_boxes=m.INITIALIZE_BOX_TYPE != "no",
        mask_box_edges="pixels" if m.INITIALIZE_BOX_TYPE == "bitmask" else "indices",
        encoder=EncoderSpec(
            in_features=tuple(s.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            num_layers=s.TRANSFORMER_ENC_LAYERS,
            ffn_dim=s.DIM_FEEDFORWARD,
            common_stride=s.COMMON_STRIDE,
        ),
        de_imbalance=DeImbalanceSpec((m.FIRST_SELECTED_QUERIES, m.NUM_OBJECT_QUERIES), m.TI_LAYERS) if di else None,
        bato=BATOSpec(num_guiding_tokens=m.NUM_GUIDING_TOKENS) if di else None,
        denoising=DenoisingSpec(m.DN_NUM, m.DN_NOISE_SCALE) if m.DN != "no" else None,
    )


def release_swin_sizes(cfg):
    """timm Swin keyword arguments for the release's D2SwinTransformer configuration; refuses
    settings SwinBackbone does not reproduce."""
    swin = cfg.MODEL.SWIN
    unsupported = {
        "APE": (swin.APE, False),
        "PATCH_NORM": (swin.PATCH_NORM, True),
        "PATCH_SIZE": (swin.PATCH_SIZE, 4),
        "MLP_RATIO": (swin.MLP_RATIO, 4.0),
        "QKV_BIAS": (swin.QKV_BIAS, True),
        "QK_SCALE": (swin.QK_SCALE, None),
        "OUT_FEATURES": (list(swin.OUT_FEATURES), ["res2", "res3", "res4", "res5"]),
    }
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise SystemExit(f"release MODEL.SWIN.{key} = {value!r}: only {supported!r} is compared here")
    return {
        "embed_dim": swin.EMBED_DIM,
        "depths": tuple(swin.DEPTHS),
        "num_heads": tuple(swin.NUM_HEADS),
        "window_size": swin.WINDOW_SIZE,
    }


def our_backbone_for(cfg, release):
    """The release's own backbone (detectron2's ResNet, shared by both models), or for its
    Swin our `SwinBackbone` (timm's Swin) with the release's sizes, in eval mode."""
    if cfg.MODEL.BACKBONE.NAME != "D2SwinTransformer":
        return release.backbone
    from di_maskdino.modeling.swin import SwinBackbone

    return SwinBackbone("swin_large_patch4_window12_384", drop_path_rate=0.0, **release_swin_sizes(cfg)).eval()


def our_model_for(cfg, backbone):
    """Our model with the architecture a release configuration describes, on `backbone`."""
    from di_maskdino.modeling import DIMaskDINO, build_encoder, build_head

    architecture = release_architecture(cfg)
    shapes = {k: v for k, v in backbone.output_shape().items() if k in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES}
    return DIMaskDINO(
        backbone,
        build_encoder(architecture, shapes),
        build_head(architecture),
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
        size_divisibility=32,
        test_topk=cfg.TEST.DETECTIONS_PER_IMAGE,
    )


def clipped_boxes(instances, image):
    """The release's boxes of one image's Instances, clipped to the (3, H, W) image.

    NOTE: the release reports boxes unclipped; ours are clipped to the image (as detectron2's
    models do), so the release's boxes are clipped before ordering and comparing."""
    boxes = instances.pred_boxes.tensor.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.shape[2])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.shape[1])
    return boxes


def canonical_order(scores, labels, boxes, masks):
    """Sort by score (descending), then class, then box, then mask area: ties in score are
    common with random weights (every empty mask scores 0), and clipped boxes can tie too."""
    areas = masks.flatten(1).sum(1).numpy() // 64  # coarse: pixels at the threshold may flip
    keys = [areas] + [boxes[:, i].numpy().round(3) for i in range(3, -1, -1)]
    keys += [labels.numpy(), -scores.numpy().round(5)]
    return torch.from_numpy(np.lexsort(keys))


def paired_order(ours, theirs):
    """Orders of our instances and the release's that pair each with its counterpart:
    ours in `canonical_order`, theirs by a one-to-one assignment (scipy) of least cost -
    another class costs 1e6, a score difference 1e3 per unit, a box difference 1 per pixel
    (mean over corners). Near-equal scores are common with random weights, and rounding
    alone can order two such instances differently on the two sides.

    `ours` and `theirs`: (scores, labels, boxes, masks) each."""
    from scipy.optimize import linear_sum_assignment

    order_mine = canonical_order(*ours)
    scores, labels, boxes, _ = (t[order_mine] for t in ours)
    their_scores, their_labels, their_boxes, _ = theirs
    cost = (
        1e6 * (labels[:, None] != their_labels[None, :]).double()
        + 1e3 * (scores[:, None] - their_scores[None, :]).abs().double()
        + (boxes[:, None, :] - their_boxes[None, :, :]).abs().mean(-1).double()
    )
    if cost.shape[0] != cost.shape[1]:
        return order_mine, canonical_order(*theirs)  # the counts differ: the comparison reports it
    rows, columns = linear_sum_assignment(cost.numpy())
    return order_mine, torch.from_numpy(columns[np.argsort(rows)])


class Comparison:
    def __init__(self, atol: float, rtol: float):
        self.atol, self.rtol = atol, rtol
        self.failures = []

    def binary(self, name, ours, theirs, max_fraction: float = 1e-4):
        """Binary masks: pixels whose logit is within rounding of the 0 threshold may flip."""
        self._pixels(name, ours.bool(), theirs.bool(), max_fraction)

    def _pixels(self, name, ours, theirs, max_fraction: float):
        if ours.shape != theirs.shape:
            self.failures.append(name)
            print(f"  {name:<40} shape {tuple(ours.shape)} vs release {tuple(theirs.shape)}  MISMATCH")
            return
        differing = (ours != theirs).sum().item()
        ok = differing <= max_fraction * ours.numel()
        if not ok:
            self.failures.append(name)
        print(f"  {name:<40} {differing} of {ours.numel()} pixels differ  {'ok' if ok else 'MISMATCH'}")

    def segments(self, name, ours, theirs):
        """Lists that must be equal (panoptic segments: id, class, thing)."""
        ok = list(ours) == list(theirs)
        if not ok:
            self.failures.append(name)
        print(f"  {name:<40} {'equal' if ok else f'{ours} vs release {theirs}'}  {'ok' if ok else 'MISMATCH'}")

    def labels(self, name, ours, theirs, max_fraction: float = 1e-4):
        """Integer maps (panoptic ids): pixels whose owner is decided within rounding may differ."""
        self._pixels(name, ours.long(), theirs.long(), max_fraction)

    def __call__(self, name, ours, theirs):
        ours, theirs = ours.detach().float(), theirs.detach().float()
        if ours.shape != theirs.shape:
            self.failures.append(name)
            print(f"  {name:<40} shape {tuple(ours.shape)} vs release {tuple(theirs.shape)}  MISMATCH")
            return
        finite = torch.isfinite(theirs)
        if not torch.equal(finite, torch.isfinite(ours)):
            self.failures.append(name)
            print(f"  {name:<40} non-finite entries differ  MISMATCH")
            return
        diff = (ours[finite] - theirs[finite]).abs()
        worst = diff.max().item() if diff.numel() else 0.0
        ok = bool((diff <= self.atol + self.rtol * theirs[finite].abs()).all())
        if not ok:
            self.failures.append(name)
        print(f"  {name:<40} max |diff| {worst:.2e}  {'ok' if ok else 'MISMATCH'}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release-source", required=True, help="checkout of the DI-MaskDINO or MaskDINO release")
    parser.add_argument("--config", required=True, help="release config, relative to the checkout or absolute")
    parser.add_argument("--weights", help="a released checkpoint (.pth); default: perturbed random weights")
    parser.add_argument(
        "--image-sizes",
        default=None,
        help="comma-separated HxW of the test images (default 256x320,224x288; with --train 256x320,256x320: "
        "images of one size, whose box targets the release and we normalise alike)",
    )
    parser.add_argument("--atol", type=float, default=2e-4)
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", action="store_true", help="compare one training step (losses, gradients)")
    parser.add_argument("--loss-atol", type=float, default=3e-6, help="--train: loss difference allowed ...")
    parser.add_argument("--loss-rtol", type=float, default=1e-6, help="--train: ... plus this times the loss")
    parser.add_argument("--grad-rtol", type=float, default=1e-3, help="--train: largest relative gradient difference")
    # panoptic configs: random weights give few confident queries; lower thresholds (for both
    # models) exercise more segments, stuff merging included
    parser.add_argument("--object-mask-threshold", type=float, help="override the config's OBJECT_MASK_THRESHOLD")
    parser.add_argument("--overlap-threshold", type=float, help="override the config's OVERLAP_THRESHOLD")
    parser.add_argument(
        "--class-bias-spread",
        type=float,
        default=0.0,
        help="add N(0, spread^2) noise to the class bias of both models (more varied classes: stuff segments)",
    )
    return parser.parse_args()


def build_pair(args):
    """The release's model and ours on the same (converted) weights, both in eval mode, and
    the release's config."""
    from detectron2.modeling import build_model

    from di_maskdino.release_conversion import convert_release_state_dict

    _, add_config = import_release(os.path.abspath(args.release_source))
    config_file = args.config if os.path.isabs(args.config) else os.path.join(args.release_source, args.config)
    cfg = release_config(add_config, config_file)
    torch.manual_seed(args.seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the release prints its loss weights
        release = build_model(cfg).eval()
    if args.weights:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        release.load_state_dict(state.get("model", state), strict=True)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            seen = set()
            for tensor in list(release.parameters()) + [b for n, b in release.named_buffers() if "running" in n]:
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.02)

    ours = our_model_for(cfg, our_backbone_for(cfg, release)).eval()
    converted = convert_release_state_dict(release.state_dict())
    ours.load_state_dict(converted, strict=True)
    print(
        f"release: {type(release).__name__} from {args.release_source}; {len(release.state_dict())} release "
        f"entries -> {len(converted)} parameters, loaded strictly"
    )
    return release, ours, cfg


def compare_head_outputs(compare, release, ours, batch):
    """Every supervised output of the head, on identical preprocessed inputs."""
    their_features, our_features = release.backbone(batch), ours.backbone(batch)
    if ours.backbone is not release.backbone:
        for name, feature in their_features.items():
            compare(f"backbone {name}", our_features[name], feature)
    their_out, _ = release.sem_seg_head(their_features)
    our_out = ours(batch, all_layer_masks=False)
    compare("final logits", our_out.final.logits, their_out["pred_logits"])
    compare("final boxes", our_out.final.boxes, their_out["pred_boxes"])
    compare("final masks", our_out.final.masks, their_out["pred_masks"])
    for index, aux in enumerate(their_out["aux_outputs"]):
        compare(f"layer {index} logits", our_out.layers[index].logits, aux["pred_logits"])
        compare(f"layer {index} boxes", our_out.layers[index].boxes, aux["pred_boxes"])
    compare("encoder logits", our_out.encoder.logits, their_out["interm_outputs"]["pred_logits"])
    compare("encoder boxes", our_out.encoder.boxes, their_out["interm_outputs"]["pred_boxes"])
    compare("encoder masks", our_out.encoder.masks, their_out["interm_outputs"]["pred_masks"])
    for index, ti in enumerate(their_out.get("oldm_outputs", [])):
        ours_ti = our_out.token_interaction[0][index]
        compare(f"token interaction {index} logits", ours_ti.logits, ti["pred_logits"])
        compare(f"token interaction {index} boxes", ours_ti.boxes, ti["pred_boxes"])


def compare_instances(compare, release, ours, images):
    """End to end: instances at the original image sizes."""
    their_results = release([{"image": image, "height": image.shape[1], "width": image.shape[2]} for image in images])
    for index, (mine, theirs) in enumerate(zip(ours.predict(images), their_results)):
        theirs = theirs["instances"]
        their_boxes = clipped_boxes(theirs, images[index])
        order_mine, order_theirs = paired_order(
            (mine.scores, mine.labels, mine.boxes, mine.masks),
            (theirs.scores, theirs.pred_classes, their_boxes, theirs.pred_masks),
        )
        compare(f"image {index} scores", mine.scores[order_mine], theirs.scores[order_theirs])
        compare(f"image {index} classes", mine.labels[order_mine], theirs.pred_classes[order_theirs])
        compare(f"image {index} boxes", mine.boxes[order_mine], their_boxes[order_theirs])
        compare.binary(f"image {index} masks", mine.masks[order_mine], theirs.pred_masks[order_theirs])


# --- panoptic and semantic outputs (release configs with PANOPTIC_ON or SEMANTIC_ON) ---


def release_cfg_for(args):
    """The release configuration of --config (the release is imported already)."""
    _, add_config = import_release(os.path.abspath(args.release_source))
    config_file = args.config if os.path.isabs(args.config) else os.path.join(args.release_source, args.config)
    return release_config(add_config, config_file)


def release_segmentation_inference(cfg):
    """Our `SegmentationInference` with the release configuration's test settings, or None
    for an instance-only configuration. Thing classes come from the metadata of the release's
    first training set, as the release reads them."""
    from detectron2.data import MetadataCatalog

    from di_maskdino.modeling import SegmentationInference

    t = cfg.MODEL.MaskDINO.TEST
    if not (t.PANOPTIC_ON or t.SEMANTIC_ON):
        return None
    if cfg.MODEL.MaskDINO.SEMANTIC_CE_LOSS and not t.PANOPTIC_ON:
        raise SystemExit("this release config classifies with softmax cross-entropy (SEMANTIC_CE_LOSS): not supported")
    things = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_dataset_id_to_contiguous_id.values()
    is_thing = torch.zeros(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, dtype=torch.bool)
    is_thing[list(things)] = True
    return SegmentationInference(
        is_thing,
        instance=t.INSTANCE_ON,
        panoptic=t.PANOPTIC_ON,
        semantic=t.SEMANTIC_ON,
        object_mask_threshold=t.OBJECT_MASK_THRESHOLD,
        overlap_threshold=t.OVERLAP_THRESHOLD,
        temperature=t.PANO_TEMPERATURE if t.PANO_TRANSFORM_EVAL else None,
        topk=cfg.TEST.DETECTIONS_PER_IMAGE,
    )


def override_thresholds(release, inference, args):
    """Applies --object-mask-threshold / --overlap-threshold to the release model and to ours."""
    import dataclasses

    changes = {}
    if args.object_mask_threshold is not None:
        release.object_mask_threshold = changes["object_mask_threshold"] = args.object_mask_threshold
    if args.overlap_threshold is not None:
        release.overlap_threshold = changes["overlap_threshold"] = args.overlap_threshold
    inference = dataclasses.replace(inference, **changes)
    print(
        f"segmentation inference: object-mask threshold {inference.object_mask_threshold}, overlap threshold "
        f"{inference.overlap_threshold}, temperature {inference.temperature}"
    )
    return inference


def spread_class_bias(release, ours, args):
    """--class-bias-spread: the same noise on the class bias of both models (the release's
    class head is one module, shared by its decoder)."""
    if not args.class_bias_spread:
        return
    theirs, mine = release.sem_seg_head.predictor.class_embed.bias, ours.head.heads.class_embed.bias
    noise = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(args.seed + 2)) * args.class_bias_spread
    with torch.no_grad():
        theirs.add_(noise)
        mine.copy_(theirs)
    print(f"class bias of both models spread by N(0, {args.class_bias_spread}^2)")


def compare_segmentation(compare, release, ours, images, inference):
    """End to end with panoptic / semantic inference: thing instances, panoptic segments and
    id maps, per-pixel class scores, at the original image sizes."""
    from di_maskdino.modeling import predict_segmentation

    their_results = release([{"image": image, "height": image.shape[1], "width": image.shape[2]} for image in images])
    for index, (mine, theirs) in enumerate(zip(predict_segmentation(ours, images, inference), their_results)):
        if inference.instance:
            found, expected = mine.instances, theirs["instances"]
            their_boxes = clipped_boxes(expected, images[index])
            order_mine, order_theirs = paired_order(
                (found.scores, found.labels, found.boxes, found.masks),
                (expected.scores, expected.pred_classes, their_boxes, expected.pred_masks),
            )
            print(f"  image {index}: {len(found)} thing instances (release {len(expected)})")
            compare(f"image {index} scores", found.scores[order_mine], expected.scores[order_theirs])
            compare(f"image {index} classes", found.labels[order_mine], expected.pred_classes[order_theirs])
            compare(f"image {index} boxes", found.boxes[order_mine], their_boxes[order_theirs])
            compare.binary(f"image {index} masks", found.masks[order_mine], expected.pred_masks[order_theirs])
        if inference.panoptic:
            ids, segments = theirs["panoptic_seg"]
            ours_segments = [(s.id, s.category_id, s.isthing) for s in mine.panoptic.segments]
            their_segments = [(s["id"], s["category_id"], s["isthing"]) for s in segments]
            things = sum(s[2] for s in their_segments)
            print(
                f"  image {index}: {len(their_segments)} panoptic segments in the release ({things} things, "
                f"{len(their_segments) - things} stuff), {len(ours_segments)} here"
            )
            compare.segments(f"image {index} panoptic segments", ours_segments, their_segments)
            compare.labels(f"image {index} panoptic ids", mine.panoptic.ids, ids)
        if inference.semantic:
            compare(f"image {index} semantic scores", mine.semantic, theirs["sem_seg"])


def main() -> int:
    args = parse_args()
    release, ours, cfg = build_pair(args)
    image_sizes = args.image_sizes or ("256x320,256x320" if args.train else "256x320,224x288")
    sizes = [tuple(int(v) for v in s.split("x")) for s in image_sizes.split(",")]
    compare = Comparison(args.atol, args.rtol)
    if args.train:
        from release_training_comparison import compare_training

        compare_training(
            compare, cfg, release, ours, sizes, args.seed + 1, args.loss_atol, args.loss_rtol, args.grad_rtol
        )
        if compare.failures:
            print(f"{len(compare.failures)} comparisons failed: {', '.join(compare.failures)}")
            return 1
        print("all losses and gradients agree")
        return 0
    segmentation = release_segmentation_inference(release_cfg_for(args))
    if segmentation is not None:
        segmentation = override_thresholds(release, segmentation, args)
        spread_class_bias(release, ours, args)
    generator = torch.Generator().manual_seed(args.seed + 1)
    images = [torch.rand(3, h, w, generator=generator) * 255 for h, w in sizes]
    with torch.no_grad():
        compare_head_outputs(compare, release, ours, ours.preprocess(images)[0])
        if segmentation is None:
            compare_instances(compare, release, ours, images)
        else:
            compare_segmentation(compare, release, ours, images, segmentation)
    if compare.failures:
        print(f"{len(compare.failures)} comparisons failed: {', '.join(compare.failures)}")
        return 1
    print("all predictions agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
