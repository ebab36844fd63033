"""The timm vision-transformer backbone (`TimmViT`): its map against timm's own model, any
input size, weights loaded from a timm checkpoint file, activation checkpointing, and the
arguments it refuses. Tiny ViTs (2 blocks of width 64); nothing is downloaded."""

import math

import pytest
import torch
import torch.nn.functional as F

from di_maskdino.modeling import SpecError, TimmViT, probe_vit
from tests.layers.test_activation_checkpointing import saved_bytes

timm = pytest.importorskip("timm")

TINY = dict(depth=2, embed_dim=64, num_heads=2)
# a ViT with a class token and learned position embeddings (DINOv2, register tokens too) and
# one with rotary embeddings (DINOv3, timm's Eva)
MODELS = ["vit_base_patch14_reg4_dinov2", "vit_small_patch16_dinov3"]


def timm_patch_map(model, images):
    """The oracle: timm's forward_features (the final norm's tokens), prefix tokens dropped,
    laid out as (B, C, ceil(H / P), ceil(W / P))."""
    tokens = model.forward_features(images)[:, model.num_prefix_tokens :]
    patch = model.patch_embed.patch_size[0]
    grid = [math.ceil(size / patch) for size in images.shape[-2:]]
    return tokens.transpose(1, 2).reshape(images.shape[0], -1, *grid)


def pair(name, **kwargs):
    """(our backbone, timm's model with the same weights), both in evaluation mode."""
    torch.manual_seed(0)
    ours = TimmViT(name, patch_size=16, **TINY, **kwargs).eval()
    theirs = timm.create_model(name, patch_size=16, dynamic_img_size=True, dynamic_img_pad=True, **TINY).eval()
    missing, unexpected = theirs.load_state_dict(ours.body.state_dict(), strict=False)
    assert unexpected == [] and all(key.startswith("head") for key in missing)
    return ours, theirs


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [(64, 64), (128, 96), (70, 93), (33, 47)])
def test_the_map_is_timms_patch_tokens_at_any_size(name, size):
    ours, theirs = pair(name)
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (found,) = ours(images).values()
        expected = timm_patch_map(theirs, images)
    assert found.shape == (2, 64, math.ceil(size[0] / 16), math.ceil(size[1] / 16))
    torch.testing.assert_close(found, expected, rtol=0, atol=0)
    assert ours.output_shape()["vit"].channels == 64 and ours.output_shape()["vit"].stride == 16


@pytest.mark.parametrize("name", MODELS)
def test_a_size_off_the_patch_grid_is_padded_with_zeros_on_the_right_and_bottom(name):
    ours, _ = pair(name)
    image = torch.rand(1, 3, 70, 93, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        (found,) = ours(image).values()
        (padded,) = ours(F.pad(image, (0, 96 - 93, 0, 80 - 70))).values()
    torch.testing.assert_close(found, padded, rtol=0, atol=0)


def test_the_classifier_goes_and_the_final_norm_stays():
    ours = TimmViT("test_vit")  # timm's small ViT with a 1000-class head
    names = [name for name, _ in ours.named_parameters()]
    assert not any(name.startswith(("body.head", "body.fc_norm")) for name in names)
    assert {"body.cls_token", "body.pos_embed", "body.patch_embed.proj.weight", "body.norm.weight"} <= set(names)
    assert ours.num_blocks == 6 and ours.patch_size == 16


def test_a_timm_checkpoint_file_is_loaded_through_timm_and_resampled_to_the_patch_size(tmp_path):
    """A DINOv2-layout file (14-pixel patches, position embeddings for 37 x 37): the blocks are
    the file's, the patch embedding is timm's resampling of it to 16 x 16."""
    from timm.layers import resample_patch_embed

    torch.manual_seed(3)
    source = timm.create_model("vit_base_patch14_reg4_dinov2", **TINY)
    path = tmp_path / "dinov2.pth"
    torch.save(source.state_dict(), path)
    ours = TimmViT("vit_base_patch14_reg4_dinov2", patch_size=16, pretrained_file=str(path), **TINY)
    loaded, saved = ours.body.state_dict(), source.state_dict()
    for name, tensor in saved.items():
        if name.startswith("blocks.") or name.startswith(("norm.", "cls_token", "reg_token")):
            assert torch.equal(loaded[name], tensor), name
    assert loaded["patch_embed.proj.weight"].shape == (64, 3, 16, 16)
    expected = resample_patch_embed(saved["patch_embed.proj.weight"], [16, 16])
    torch.testing.assert_close(loaded["patch_embed.proj.weight"], expected)
    assert loaded["pos_embed"].shape[1] == (518 // 16) ** 2 != saved["pos_embed"].shape[1]


def checkpointed_run(name, enabled):
    """(bytes kept for backward, map, gradients) of a float64 training step with drop path."""
    torch.manual_seed(0)
    backbone = TimmViT(name, patch_size=16, drop_path_rate=0.2, **TINY).double().train()
    backbone.set_grad_checkpointing(enabled)
    assert backbone.body.grad_checkpointing == enabled
    x = torch.rand(2, 3, 48, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # the drop-path draws
    saved, features = saved_bytes(lambda: backbone(x))
    (feature,) = features.values()
    (feature * feature.detach().sin()).sum().backward()
    return saved, feature.detach(), {n: p.grad for n, p in backbone.named_parameters()}


@pytest.mark.parametrize("name", MODELS)
def test_checkpointing_keeps_features_and_gradients(name):
    """timm's per-block checkpointing, float64 with drop path: the same map and gradients,
    less kept for backward."""
    plain_saved, plain, plain_grads = checkpointed_run(name, False)
    saved, feature, grads = checkpointed_run(name, True)
    assert saved < plain_saved / 2
    torch.testing.assert_close(feature, plain, rtol=0, atol=0)
    assert all(grad is not None for grad in grads.values())
    for parameter, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[parameter], rtol=1e-10, atol=1e-12, msg=parameter)


def test_rotary_embeddings_report_why_export_would_fix_the_size():
    assert TimmViT("vit_base_patch14_dinov2", patch_size=16, **TINY).export_size_problem is None
    assert "rotary" in TimmViT("vit_small_patch16_dinov3", **TINY).export_size_problem


def problem(error):
    (found,) = error.value.problems
    return found


def test_names_that_are_no_timm_vit_are_refused():
    with pytest.raises(SpecError) as error:
        probe_vit("vit_base_patch14_dinov9")
    assert problem(error)[0] == "model_name" and "not one" in problem(error)[1]
    for name in ("resnet18", "swin_tiny_patch4_window7_224"):
        with pytest.raises(SpecError) as error:
            probe_vit(name)
        assert problem(error)[0] == "model_name" and "plain vision transformer" in problem(error)[1]
    with pytest.raises(SpecError) as error:
        probe_vit("test_vit", patch_size=-1)
    assert problem(error)[0] == "patch_size"


def test_a_probe_builds_nothing_in_memory():
    model = probe_vit("vit_large_patch14_dinov2")
    assert model.pos_embed.is_meta and len(model.blocks) == 24


def test_missing_and_unfitting_checkpoint_files_are_refused(tmp_path):
    with pytest.raises(SpecError) as error:
        TimmViT("test_vit", pretrained_file=str(tmp_path / "none.pth"))
    assert problem(error) == ("pretrained_file", f"an existing file; {str(tmp_path / 'none.pth')!r} is not one")
    other = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), other)
    with pytest.raises(SpecError) as error:
        TimmViT("test_vit", pretrained_file=str(other))
    field, requirement = problem(error)
    assert field == "pretrained_file"
    assert "a timm checkpoint of test_vit" in requirement and "Missing key(s)" in requirement
    assert "Unexpected key(s)" in requirement and '"conv1.weight"' in requirement  # the file's own names
    assert "(80 in all)" in requirement  # every tensor of test_vit (its classifier too) is missing
