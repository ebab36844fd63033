#!/usr/bin/env python
"""Converts a released MaskDINO or DI-MaskDINO checkpoint (detectron2 format) to this
project's parameter names.

    python tools/convert_official_checkpoint.py --input dimaskdino_r50_50ep.pth --output converted.pth

Every released entry must map to one of our parameters (shared copies must agree), and the
result must fill every parameter of the model the checkpoint describes, with the right
shapes; otherwise the tool stops and lists what does not fit. ResNet backbone entries keep
detectron2's names and are checked against detectron2's ResNet when detectron2 is
installed; Swin backbone entries (MaskDINO's Swin-L releases) are renamed to timm's Swin
and checked against it. Optimizer, scheduler and iteration entries are dropped.

An ImageNet Swin classification checkpoint (Microsoft's swin_large_patch4_window12_384_22k.pth,
MaskDINO's .pkl of it with --trust-pickle, or timm's .safetensors / .bin) is converted into
the backbone weights of the build_swin_backbone configs (MODEL.WEIGHTS). The tool ends by naming
the shipped config that describes the converted network (README, "Released checkpoints").
A checkpoint already in this project's format is recognised (nothing to convert); an
unreadable file is called corrupt or truncated.
"""

import argparse
import importlib.util
import os
import sys

import torch

from di_maskdino.checkpoint_files import (
    CheckpointReadError,
    atomic_torch_save,
    is_project_state_dict,
    read_checkpoint,
)
from di_maskdino.modeling import build_encoder, build_head
from di_maskdino.release_conversion import (
    ConversionError,
    check_against_model,
    convert_release_state_dict,
    convert_swin_classification_state_dict,
    infer_architecture,
    infer_swin,
    matching_release,
    release_backbone,
)


def read_state(path: str, trust_pickle: bool):
    """The file's object: safetensors, a detectron2 .pkl (pickle of numpy arrays; only with
    --trust-pickle) or a torch file. An unreadable file raises CheckpointReadError."""
    if not path.endswith((".safetensors", ".pkl")):
        return read_checkpoint(path, trust_pickle=trust_pickle, what="--input")
    if path.endswith(".pkl") and not trust_pickle:
        raise SystemExit(
            f"--input {path}: a .pkl file is a pickle, which can run code; if you trust it, add --trust-pickle"
        )
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        import pickle

        import numpy as np

        with open(path, "rb") as file:
            checkpoint = pickle.load(file, encoding="latin1")
        state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
        if isinstance(state, dict):
            return {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v for k, v in state.items()}
        return state
    except Exception as error:  # noqa: BLE001 - every failure to read the file is reported with it
        raise CheckpointReadError(
            f"--input {path} ({os.path.getsize(path)} bytes) is corrupt or truncated and cannot be read "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no message'}). Copy or "
            "download it again."
        ) from error


def load_release(path: str, trust_pickle: bool) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"--input {path}: no such file")
    try:
        checkpoint = read_state(path, trust_pickle)
    except CheckpointReadError as error:
        message = str(error).replace("(--trust-pickle where the tool has it)", "(rerun with --trust-pickle)")
        raise SystemExit(message) from error
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise SystemExit(f"{path} holds no state dict (expected {{'model': {{name: tensor}}}} or {{name: tensor}})")
    if is_project_state_dict(state) and "patch_embed.proj.weight" not in state:  # not an ImageNet Swin's head.*
        raise SystemExit(
            f"{path} is already in this project's format (encoder.*, head.* names): nothing to convert, nothing "
            f"written. Use it directly: MODEL.WEIGHTS {path}"
        )
    return state


def backbone_shapes(converted: dict):
    """Parameter shapes of detectron2's ResNet matching the checkpoint's depth, or None
    when detectron2 is not installed."""
    if importlib.util.find_spec("detectron2") is None:
        return None
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    blocks_in_res4 = len({k.split(".")[2] for k in converted if k.startswith("backbone.res4.")})
    depths = {6: 50, 23: 101, 36: 152}
    if blocks_in_res4 not in depths:
        raise SystemExit(f"the backbone has {blocks_in_res4} res4 blocks: not a ResNet-50/101/152 this tool knows")
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depths[blocks_in_res4]
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    return {f"backbone.{k}": v.shape for k, v in backbone.state_dict().items()}


def swin_shapes(converted: dict) -> dict:
    """Parameter shapes of timm's Swin with the checkpoint's sizes, as `SwinBackbone` holds it
    (backbone.body.*, backbone.output_norms.*)."""
    from di_maskdino.modeling.swin import SwinBackbone

    with torch.device("meta"):  # shapes only
        backbone = SwinBackbone("swin_large_patch4_window12_384", **infer_swin(converted))
    return {f"backbone.{k}": v.shape for k, v in backbone.state_dict().items()}


def convert_swin_classification(state: dict, output: str, source: str) -> int:
    """An ImageNet Swin classification checkpoint -> backbone weights of a build_swin_backbone
    config."""
    converted, dropped = convert_swin_classification_state_dict(state)
    sizes = infer_swin(converted)
    check_against_model(converted, swin_shapes(converted))
    reasons = sorted(set(dropped.values()))
    print(
        f"Swin classification checkpoint: {len(state)} entries -> {len(converted)} backbone parameters "
        f"(embed dim {sizes['embed_dim']}, depths {list(sizes['depths'])}, heads {list(sizes['num_heads'])}, "
        f"window {sizes['window_size']}; the 4 output norms added at their initialisation); left out: "
        + "; ".join(f"{sum(r == why for r in dropped.values())} x {why}" for why in reasons)
    )
    atomic_torch_save({"model": converted, "__source__": source}, output)
    print(f"wrote {output}")
    if sizes == infer_swin_large():
        print(
            "These are Swin-L backbone weights; train from them with a build_swin_backbone config, e.g.\n"
            "  python tools/train_net.py --config-file configs/coco/dimaskdino_swinl_50ep.yaml "
            f"MODEL.WEIGHTS {output}\n"
            "(everything after the backbone starts from its initialisation)"
        )
    return 0


def infer_swin_large() -> dict:
    return {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48), "window_size": 12}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input", required=True, help="released checkpoint (.pth), or an ImageNet Swin (.pth, .pkl, .safetensors)"
    )
    parser.add_argument("--output", required=True, help="where to write the converted checkpoint")
    parser.add_argument("--trust-pickle", action="store_true", help="allow non-tensor pickled objects in --input")
    args = parser.parse_args()

    state = load_release(args.input, args.trust_pickle)
    try:
        if "patch_embed.proj.weight" in state:
            return convert_swin_classification(state, args.output, os.path.basename(args.input))
        converted = convert_release_state_dict(state)
        architecture, backbone_maps = infer_architecture(converted)
        encoder = build_encoder(architecture, backbone_maps)
        head = build_head(architecture)
        expected = {f"encoder.{k}": v.shape for k, v in encoder.state_dict().items()}
        expected.update({f"head.{k}": v.shape for k, v in head.state_dict().items()})
        backbone = swin_shapes(converted) if release_backbone(converted) == "swin" else backbone_shapes(converted)
        if backbone is None:
            print("detectron2 is not installed: the backbone entries are kept but not checked")
            check_against_model(converted, expected, skip_prefixes=("backbone.",))
        else:
            check_against_model(converted, {**expected, **backbone})
    except ConversionError as error:
        print(f"{args.input}: {error}", file=sys.stderr)
        return 1
    kind = "DI-MaskDINO" if architecture.de_imbalance is not None else "MaskDINO"
    print(
        f"{kind}: {len(state)} released entries -> {len(converted)} parameters; {architecture.num_classes} classes, "
        f"{architecture.num_decoder_layers} decoder layers, DI {'on' if architecture.de_imbalance else 'off'}, "
        f"BATO {'on' if architecture.bato else 'off'}"
    )
    atomic_torch_save({"model": converted, "__source__": os.path.basename(args.input)}, args.output)
    print(f"wrote {args.output}")
    release = matching_release(architecture, release_backbone(converted))
    if release is None:
        print(
            "No shipped config describes this network; write one from configs/coco/ with the sizes above "
            "(the evaluation refuses a config that does not fit the weights and lists the differences)."
        )
    else:
        configs = list(release["configs"])
        if "choice" in release:
            # the weights do not tell these releases apart; their file names do
            name = os.path.basename(args.input).lower()
            picked = configs[0] if "maskenhanced" in name else configs[1] if "_instance_" in name else None
            if picked is not None:
                configs = [picked]
        print(
            f"This is {release['name']}; evaluate it with:\n"
            f"  python tools/train_net.py --config-file {configs[0]} --eval-only MODEL.WEIGHTS {args.output}"
        )
        if len(configs) > 1 and "choice" in release:
            print(f"  or: {', '.join(configs[1:])}; {release['choice']}")
        elif len(configs) > 1:
            print(f"  (equally: {', '.join(configs[1:])}; they differ only in the training schedule)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
