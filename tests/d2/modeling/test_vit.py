"""Vision-transformer backbones from the config (MODEL.BACKBONE.NAME build_vit_backbone): the
pyramid's strides and channels, weights from a timm checkpoint file, the activation
checkpointing switch, a short training run of configs/quick_start_vit.yaml, torch.export,
and the configurations it refuses. timm's test_vit (6 blocks of width 64) stands in for
DINOv2 / DINOv3; nothing is downloaded."""

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")
timm = pytest.importorskip("timm")

from detectron2.modeling import build_backbone, build_model  # noqa: E402
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid  # noqa: E402

from di_maskdino.d2 import ConfigError, load_config  # noqa: E402
from tests.layers.test_activation_checkpointing import saved_bytes  # noqa: E402
from tests.tooling import ROOT  # noqa: E402

QUICK_VIT = os.path.join(ROOT, "configs", "quick_start_vit.yaml")
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}


def vit_config(*opts):
    return load_config(QUICK_VIT, list(opts))


def backbone_of(*opts):
    torch.manual_seed(0)
    return build_backbone(vit_config(*opts)).eval()


def test_the_pyramid_has_strides_4_to_32_and_the_configured_channels():
    backbone = backbone_of("MODEL.VIT.OUT_CHANNELS", "32")
    assert isinstance(backbone, SimpleFeaturePyramid)
    shapes = backbone.output_shape()
    assert {name: (s.channels, s.stride) for name, s in shapes.items()} == {n: (32, s) for n, s in STRIDES.items()}
    assert backbone.padding_constraints["square_size"] == 0  # no square padding
    for height, width in [(128, 192), (96, 64), (100, 150), (33, 47)]:
        with torch.no_grad():
            features = backbone(torch.rand(2, 3, height, width))
        # the ViT's grid is ceil(size / 16); the pyramid scales it by 4, 2, 1 and max-pools it by 2
        grid = (math.ceil(height / 16), math.ceil(width / 16))
        expected = {"p2": 4, "p3": 2, "p4": 1}
        for name, feature in features.items():
            size = [g * expected[name] for g in grid] if name in expected else [g // 2 for g in grid]
            assert feature.shape == (2, 32, *size), (name, height, width)
            if height % 32 == 0 and width % 32 == 0:
                assert feature.shape[-2:] == (height // STRIDES[name], width // STRIDES[name])


def test_the_encoder_reads_the_pyramid_and_its_extra_level_is_at_stride_64():
    torch.manual_seed(0)
    model = build_model(vit_config()).eval()
    assert model.encoder.transformer_in_features == ["p3", "p4", "p5"] and model.encoder.fpn_in_features == ["p2"]
    assert model.encoder.extra_level_source == "p5"
    batch, _ = model.preprocess([torch.rand(3, 128, 192) * 255])
    with torch.no_grad():
        levels = model.encoder(model.backbone(batch)).features
    assert [tuple(level.shape[-2:]) for level in levels] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_a_timm_checkpoint_file_fills_the_vit_and_gives_timms_features(tmp_path):
    torch.manual_seed(5)
    source = timm.create_model("test_vit")
    state = source.state_dict()
    path = tmp_path / "test_vit.pth"
    torch.save(state, path)
    backbone = backbone_of("MODEL.VIT.PRETRAINED_FILE", str(path))
    loaded = backbone.net.body.state_dict()
    assert set(loaded) == {name for name in state if not name.startswith("head.")}
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name]), name
    # timm's own model, made independently, with the same weights, on the same image
    reference = timm.create_model("test_vit", dynamic_img_size=True, dynamic_img_pad=True).eval()
    reference.load_state_dict(torch.load(path))
    image = torch.rand(1, 3, 96, 144, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        (found,) = backbone.net(image).values()
        tokens = reference.forward_features(image)[:, reference.num_prefix_tokens :]
    torch.testing.assert_close(found, tokens.transpose(1, 2).reshape(1, 64, 6, 9), rtol=0, atol=0)


def checkpointed_backbone_step(enabled: bool):
    torch.manual_seed(0)
    switch = ["MODEL.DI_MASKDINO.ACTIVATION_CHECKPOINTING.BACKBONE", str(enabled)]
    model = build_model(vit_config(*switch, "MODEL.VIT.DROP_PATH_RATE", "0.2"))
    backbone = model.backbone.double().train()
    assert backbone.net.body.grad_checkpointing == enabled
    x = torch.rand(2, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # the drop-path draws
    saved, features = saved_bytes(lambda: backbone(x))
    sum((f * f.detach().sin()).sum() for f in features.values()).backward()
    return saved, features, {name: p.grad for name, p in backbone.named_parameters()}


def test_the_backbone_checkpointing_switch_keeps_features_and_gradients():
    """MODEL.DI_MASKDINO.ACTIVATION_CHECKPOINTING.BACKBONE: timm's checkpointing of every
    block, float64 with drop path: the same pyramid and gradients, less kept for backward."""
    plain_saved, plain, plain_grads = checkpointed_backbone_step(False)
    saved, features, grads = checkpointed_backbone_step(True)
    assert saved < plain_saved
    for name in features:
        torch.testing.assert_close(features[name], plain[name], rtol=0, atol=0)
    assert all(grad is not None for grad in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def refused(*opts) -> str:
    with pytest.raises(ConfigError) as error:
        backbone_of(*opts)
    return str(error.value)


def test_a_patch_size_without_strides_4_to_32_is_refused_with_the_fix():
    message = refused("MODEL.VIT.NAME", "vit_small_patch14_dinov2", "MODEL.VIT.PATCH_SIZE", "0")
    assert "MODEL.VIT.PATCH_SIZE = 0" in message and "3.5, 7, 14, 28" in message
    assert "set MODEL.VIT.PATCH_SIZE 16" in message
    assert "MODEL.VIT.PATCH_SIZE = 8" in refused("MODEL.VIT.PATCH_SIZE", "8")
    # the fix works: DINOv2's 14-pixel patches resampled to 16
    shapes = backbone_of("MODEL.VIT.NAME", "vit_small_patch14_dinov2", "MODEL.VIT.PATCH_SIZE", "16").output_shape()
    assert {name: s.stride for name, s in shapes.items()} == STRIDES


def test_names_that_are_no_timm_vit_are_refused_with_the_key():
    message = refused("MODEL.VIT.NAME", "vit_base_patch14_dinov9")
    assert "MODEL.VIT.NAME = 'vit_base_patch14_dinov9': must be a timm model name" in message
    assert "timm.list_models" in message
    message = refused("MODEL.VIT.NAME", "resnet18")
    assert "MODEL.VIT.NAME = 'resnet18': must be a plain vision transformer" in message


def test_checkpoint_files_that_are_missing_or_of_another_backbone_are_refused_with_the_key(tmp_path):
    message = refused("MODEL.VIT.PRETRAINED_FILE", str(tmp_path / "none.pth"))
    assert f"MODEL.VIT.PRETRAINED_FILE = {str(tmp_path / 'none.pth')!r}: must be an existing file" in message
    other = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), other)
    message = refused("MODEL.VIT.PRETRAINED_FILE", str(other))
    assert f"MODEL.VIT.PRETRAINED_FILE = {str(other)!r}: must be a timm checkpoint of test_vit" in message
    assert "Missing key(s)" in message and '"conv1.weight"' in message


def test_timm_weights_that_cannot_be_fetched_are_refused_with_the_key(tmp_path):
    """MODEL.VIT.PRETRAINED True without the weights in timm's cache and without a network (a
    fresh process with an empty cache, the Hugging Face hub offline)."""
    pytest.importorskip("huggingface_hub")
    code = (
        "from di_maskdino.d2 import load_config\n"
        "from detectron2.modeling import build_backbone\n"
        f"build_backbone(load_config({QUICK_VIT!r}, ['MODEL.VIT.PRETRAINED', 'True']))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), TORCH_HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode != 0
    assert "ConfigError" in result.stderr and "MODEL.VIT.PRETRAINED = True: must be False, or timm" in result.stderr
    assert "MODEL.VIT.PRETRAINED_FILE" in result.stderr  # the fix: a local copy


def test_bad_values_are_refused_when_the_config_is_loaded():
    with pytest.raises(ConfigError, match=r"MODEL\.VIT\.DROP_PATH_RATE = 1\.0: must be in \[0, 1\)"):
        vit_config("MODEL.VIT.DROP_PATH_RATE", "1.0")
    with pytest.raises(ConfigError, match=r"MODEL\.VIT\.OUT_CHANNELS = 0: must be at least 1"):
        vit_config("MODEL.VIT.OUT_CHANNELS", "0")
    with pytest.raises(ConfigError, match=r"MODEL\.VIT\.PATCH_SIZE = -16: must be at least 0"):
        vit_config("MODEL.VIT.PATCH_SIZE", "-16")


def synthetic_batch(cfg, data_root, count=4):
    """The first `count` training images of the synthetic set, as the training mapper gives them."""
    from detectron2.data import DatasetCatalog

    from di_maskdino.d2 import register_coco_instances_checked
    from di_maskdino.d2.data import DIMaskDINODatasetMapper

    name = "vit_synthetic_train"
    if name not in DatasetCatalog.list():
        folder = data_root / "synthetic"
        register_coco_instances_checked(name, str(folder / "train.json"), str(folder / "train"))
    mapper = DIMaskDINODatasetMapper(cfg, True)
    return [mapper(record) for record in DatasetCatalog.get(name)[:count]]


def total_loss(model, batch, seed=0):
    """The training loss with the random draws (denoising noise) fixed by `seed`."""
    torch.manual_seed(seed)
    return sum(model(batch).values())


def test_a_short_training_run_of_the_quick_start_vit_config_lowers_the_loss(data_root):
    """configs/quick_start_vit.yaml from scratch, with its optimizer (layer decay 0.9): 15
    steps on four synthetic images at least halve the loss on them."""
    from di_maskdino.d2 import build_optimizer

    cfg = vit_config()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    batch = synthetic_batch(cfg, data_root)
    with torch.no_grad():
        before = float(total_loss(model, batch))
    for step in range(15):
        loss = total_loss(model, batch, seed=step + 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(total_loss(model, batch))
    assert math.isfinite(after) and after < 0.5 * before, (before, after)


@pytest.mark.slow  # torch.export of the whole model: about 15 s on two cores
def test_the_quick_start_vit_model_exports_with_dynamic_batch_and_size():
    """The exported program (batch, height and width dynamic) against the eager model on two
    batches of different sizes (tests/export/test_exporters.py's comparison)."""
    from di_maskdino.export import export_program
    from di_maskdino.modeling import RawDetections
    from tests.export.test_exporters import assert_agrees
    from tests.modeling.tiny import perturb

    torch.manual_seed(0)
    model = perturb(build_model(vit_config())).eval()
    program = export_program(model, max_image_size=256)
    run = program.module()
    assert_agrees(model, lambda batch: RawDetections.from_tuple(run(batch)))


def test_a_vit_with_rotary_embeddings_is_refused_by_the_export():
    """DINOv3 (timm's Eva): its rotary embeddings would fix the program's input size."""
    from di_maskdino.export import export_program

    model = build_model(vit_config("MODEL.VIT.NAME", "vit_small_patch16_dinov3")).eval()
    with pytest.raises(ValueError, match="must stay dynamic, but timm's rotary position embedding of vit_small_"):
        export_program(model, max_image_size=256)
