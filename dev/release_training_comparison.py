"""The training mode of dev/compare_with_release.py: the release's training forward and
ours on the same weights and the same batch, with every random draw made equal on both
sides; prints every loss term and the gradients of representative parameters side by side.

Random draws: inside `equal_draws()`, torch.rand / rand_like return values seeded from the
draw's shape alone (so the two implementations, which draw the same quantities with the same
shapes but not in the same order, get the same numbers), and randint_like returns a constant
class (the release draws new labels only for the flipped denoising queries, we for all and
then pick; a constant makes both pick the same). Hungarian assignments are recorded on both
sides and compared as sets.

Box targets: the release normalises ground-truth boxes by each image's unpadded size, we by
the padded batch size (the frame the network predicts in). With image sizes divisible by 32
(the default) the two coincide; with others the box losses differ by design (README,
"Released checkpoints").
"""

import contextlib
import copy
import zlib
from typing import Dict, List, Tuple

import torch

REPRESENTATIVE = (
    "backbone.res2.0.conv1.weight",
    "backbone.res5.2.conv3.weight",
    "encoder.layers.0.self_attn.attn.sampling_offsets.weight",
    "encoder.mask_features.weight",
    "head.query_selection.memory_proj.weight",
    "head.heads.class_embed.weight",
    "head.heads.box_embed.layers.2.weight",
    "head.heads.mask_embed.layers.0.weight",
    "head.denoising.label_embed.weight",
    "head.decoder.layers.0.cross_attn.attn.value_proj.weight",
    "head.decoder.layers.5.ffn.linear1.weight",
    "head.de_imbalance.stages.0.layers.0.self_attn.attn.in_proj_weight",
    "head.bato.cross_attn.attn.in_proj_weight",
)


def _shape_seed(name: str, shape) -> int:
    return zlib.crc32(f"{name}{tuple(int(s) for s in shape)}".encode())


@contextlib.contextmanager
def equal_draws(num_classes: int):
    """torch.rand, rand_like and randint_like as functions of the shape (see the module docstring)."""
    saved = torch.rand, torch.rand_like, torch.randint_like

    def rand(*size, generator=None, out=None, dtype=None, layout=None, device=None, requires_grad=False, **_):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        values = saved[0](*shape, generator=torch.Generator().manual_seed(_shape_seed("rand", shape)))
        return values.to(dtype=dtype or torch.get_default_dtype(), device=device or "cpu")

    def rand_like(tensor, *, dtype=None, device=None, **_):
        return rand(*tensor.shape, dtype=dtype or tensor.dtype, device=device or tensor.device)

    def randint_like(tensor, low, high=None, *, dtype=None, device=None, **_):
        high, low = (low, 0) if high is None else (high, low)
        fill = min(high - 1, low + 1) if num_classes > 1 else low
        return torch.full_like(tensor, fill, dtype=dtype, device=device)

    torch.rand, torch.rand_like, torch.randint_like = rand, rand_like, randint_like
    try:
        yield
    finally:
        torch.rand, torch.rand_like, torch.randint_like = saved


def make_batch(sizes, num_classes: int, seed: int):
    """Images (3, H, W) and per image 3 rectangular objects: (classes, xyxy boxes, masks)."""
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for height, width in sizes:
        image = torch.rand(3, height, width, generator=generator) * 255
        masks, boxes = [], []
        for _ in range(3):
            x0 = int(torch.randint(0, width // 2, (1,), generator=generator))
            y0 = int(torch.randint(0, height // 2, (1,), generator=generator))
            w = int(torch.randint(6, width // 2, (1,), generator=generator))
            h = int(torch.randint(6, height // 2, (1,), generator=generator))
            mask = torch.zeros(height, width, dtype=torch.bool)
            mask[y0 : y0 + h, x0 : x0 + w] = True
            masks.append(mask)
            boxes.append([x0, y0, x0 + w, y0 + h])
        classes = torch.randint(0, num_classes, (3,), generator=generator)
        batch.append((image, classes, torch.tensor(boxes, dtype=torch.float32), torch.stack(masks)))
    return batch


class _Recorder:
    """Wraps a matcher's method (`forward`: one output's assignment; `match_all`: several
    outputs' at once) and records every assignment of an output it returns."""

    def __init__(self, matcher, method: str = "forward"):
        self.matcher, self.method, self.original, self.calls = matcher, method, getattr(matcher, method), []

        def record(*args, **kwargs):
            result = self.original(*args, **kwargs)
            for indices in [result] if method == "forward" else result:
                self.calls.append(tuple(tuple(sorted(zip(r.tolist(), c.tolist()))) for r, c in indices))
            return result

        setattr(matcher, method, record)

    def restore(self):
        setattr(self.matcher, self.method, self.original)


def release_losses(release, batch) -> Tuple[Dict[str, torch.Tensor], List]:
    from detectron2.structures import Boxes, Instances

    inputs = []
    for image, classes, boxes, masks in batch:
        instances = Instances(tuple(image.shape[-2:]))
        instances.gt_classes, instances.gt_boxes, instances.gt_masks = classes, Boxes(boxes), masks
        inputs.append({"image": image, "instances": instances})
    recorder = _Recorder(release.criterion.matcher)
    try:
        losses = release(inputs)
    finally:
        recorder.restore()
    return losses, recorder.calls


def our_losses(ours, criterion, batch) -> Tuple[Dict[str, torch.Tensor], List]:
    from torchvision.ops import box_convert

    images, sizes = ours.preprocess([image for image, _, _, _ in batch])
    height, width = images.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    targets = []
    for _, classes, boxes, masks in batch:
        padded = torch.zeros(masks.shape[0], height, width)
        padded[:, : masks.shape[1], : masks.shape[2]] = masks.float()
        targets.append({"labels": classes, "boxes": box_convert(boxes, "xyxy", "cxcywh") / scale, "masks": padded})
    recorder = _Recorder(criterion.matcher, "match_all")
    try:
        losses = criterion(ours.run(images, targets=targets), targets)
    finally:
        recorder.restore()
    return losses, recorder.calls


def our_name(release_name: str) -> str:
    """Release loss name -> ours (the token-interaction outputs are "oldm_" there)."""
    if release_name.startswith("oldm_"):
        term, _, index = release_name[len("oldm_") :].rpartition("_")
        return f"{term}_ti0_{index}"
    return release_name


def release_objective(cfg):
    """The `Objective` a release configuration describes."""
    from di_maskdino.modeling import MatchingCosts, Objective

    m = cfg.MODEL.MaskDINO
    weights = dict(
        class_weight=m.CLASS_WEIGHT,
        box_weight=m.BOX_WEIGHT,
        giou_weight=m.GIOU_WEIGHT,
        mask_weight=m.MASK_WEIGHT,
        dice_weight=m.DICE_WEIGHT,
    )
    return Objective(
        **weights,
        matching=MatchingCosts(**weights),
        num_points=m.TRAIN_NUM_POINTS,
        oversample_ratio=m.OVERSAMPLE_RATIO,
        importance_sample_ratio=m.IMPORTANCE_SAMPLE_RATIO,
    )


def our_criterion(cfg):
    from di_maskdino.modeling import build_criterion

    return build_criterion(release_objective(cfg))


def compare_training(
    compare, cfg, release, ours, sizes, seed: int, loss_atol: float, loss_rtol: float, grad_rtol: float
):
    """Losses (|diff| <= loss_atol + loss_rtol * |release|), assignments and gradients (relative
    norm of the difference <= grad_rtol) of one training step on both sides."""
    from di_maskdino.release_conversion import convert_release_state_dict

    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    ours.backbone = copy.deepcopy(ours.backbone)  # the release's backbone object must not collect our gradients
    release.train()
    ours.train()
    criterion = our_criterion(cfg)
    batch = make_batch(sizes, num_classes, seed)
    if len(set(sizes)) > 1:
        print(
            "NOTE: images of different sizes: the release normalises box targets by each image's size, we by the "
            "padded batch size, so box losses and everything downstream of the denoising queries differ by design"
        )
    with equal_draws(num_classes):
        theirs, their_matches = release_losses(release, batch)
        mine, my_matches = our_losses(ours, criterion, batch)

    same = sorted(their_matches) == sorted(my_matches)
    print(
        f"\nHungarian assignments: {len(their_matches)} (release) / {len(my_matches)} (ours) matchings, "
        f"{'the same' if same else 'DIFFERENT'}"
    )
    if not same:
        compare.failures.append("assignments")
    print(f"\n  {'loss term':<24} {'release':>14} {'ours':>14} {'|diff|':>10}")
    worst = 0.0
    for name in sorted(theirs):
        key = our_name(name)
        if key not in mine:
            compare.failures.append(f"loss {name}")
            print(f"  {name:<24} {theirs[name].item():>14.7f} {'(none)':>14}  MISSING")
            continue
        diff = abs(theirs[name].item() - mine[key].item())
        worst = max(worst, diff / max(1.0, abs(theirs[name].item())))
        flag = "" if diff <= loss_atol + loss_rtol * abs(theirs[name].item()) else "  MISMATCH"
        if flag:
            compare.failures.append(f"loss {name}")
        print(f"  {name:<24} {theirs[name].item():>14.7f} {mine[key].item():>14.7f} {diff:>10.2e}{flag}")
    extra = sorted(set(mine) - {our_name(n) for n in theirs})
    if extra:
        compare.failures.append("extra losses")
        print(f"  ours only: {', '.join(extra)}")
    print(
        f"  {len(theirs)} terms, largest difference {worst:.2e} (relative where a term exceeds 1; tolerance "
        f"{loss_atol:g} + {loss_rtol:g} x |term|)"
    )

    sum(theirs.values()).backward()
    sum(mine.values()).backward()
    their_grads = {n: p.grad for n, p in release.named_parameters() if p.grad is not None}
    their_grads.update({n: torch.zeros_like(p) for n, p in release.named_parameters() if p.grad is None})
    converted = convert_release_state_dict({n: g for n, g in their_grads.items()})
    my_grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in ours.named_parameters()}
    print(f"\n  {'gradient of':<66} {'|release|':>10} {'rel. diff':>10}")
    for name in REPRESENTATIVE:
        if name not in my_grads or name not in converted:
            continue
        theirs_g, mine_g = converted[name], my_grads[name]
        norm = theirs_g.norm().item()
        relative = (theirs_g - mine_g).norm().item() / max(norm, 1e-12)
        flag = "" if relative <= grad_rtol else "  MISMATCH"
        if flag:
            compare.failures.append(f"gradient {name}")
        print(f"  {name:<66} {norm:>10.3e} {relative:>10.2e}{flag}")
