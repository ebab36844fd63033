"""The whole network: shapes, gradients, robustness, configuration switches."""
import pytest
import torch

from di_maskdino.modeling import GUIDANCE_SOURCES, DIMaskDINOHead

from .tiny import HEAD_DEFAULTS, NUM_CLASSES, all_predictions, tiny_images, tiny_model, tiny_targets


def run(model, train=False, targets=None, images=None, all_layer_masks=None):
    model.train(train)
    batch, _ = model.preprocess(images or tiny_images())
    return model(batch, targets=targets, all_layer_masks=all_layer_masks)


def test_training_outputs_have_documented_shapes():
    model = tiny_model()
    output = run(model, train=True, targets=tiny_targets())
    batch, queries, k1 = 2, HEAD_DEFAULTS["num_queries"], HEAD_DEFAULTS["selection_sizes"][0]
    mask_size = (64 // 4, 96 // 4)  # padded to 64 x 96
    assert len(output.layers) == HEAD_DEFAULTS["num_decoder_layers"] + 1
    for prediction in output.layers:
        assert prediction.logits.shape == (batch, queries, NUM_CLASSES) and prediction.logits.dtype == torch.float32
        assert prediction.boxes.shape == (batch, queries, 4)
        assert ((prediction.boxes >= 0) & (prediction.boxes <= 1)).all()
        assert prediction.masks.shape == (batch, queries) + mask_size
    assert output.encoder.logits.shape == (batch, k1, NUM_CLASSES) and output.encoder.masks.shape == (batch, k1) + mask_size
    assert [len(stage) for stage in output.token_interaction] == [HEAD_DEFAULTS["token_interaction_layers"]]
    for prediction in output.token_interaction[0]:
        assert prediction.logits.shape == (batch, k1, NUM_CLASSES) and prediction.masks is None
    dn = output.denoising
    assert (dn.queries.group_size, dn.queries.num_groups) == (2, 4)  # 8 // max(2, 1) objects
    assert dn.layers[-1].logits.shape == (batch, 8, NUM_CLASSES) and dn.layers[-1].masks.shape == (batch, 8) + mask_size


def test_evaluation_predicts_only_the_last_layer_masks_unless_asked():
    model = tiny_model()
    output = run(model)
    assert [p.masks is None for p in output.layers] == [True] * HEAD_DEFAULTS["num_decoder_layers"] + [False]
    assert output.denoising is None
    output = run(model, all_layer_masks=True)
    assert all(p.masks is not None for p in output.layers)


@pytest.mark.parametrize("targets", [tiny_targets(), [dict(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4))] * 2])
def test_backward_reaches_every_parameter(targets):
    """Distributed training requires that every trainable parameter gets a gradient, also
    for a batch without objects (no denoising queries then)."""
    model = tiny_model()
    output = run(model, train=True, targets=targets)
    loss = sum(p.logits.sum() + p.boxes.sum() + (0 if p.masks is None else p.masks.sum()) for _, p in all_predictions(output))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_no_nan_when_every_mask_is_empty():
    """Mask-enhanced box initialisation of empty masks gives degenerate boxes, not NaN."""
    model = tiny_model()
    with torch.no_grad():
        last = model.head.heads.mask_embed.layers[-1]
        last.weight.zero_()
        last.bias.zero_()  # every mask logit is 0 -> every mask empty
    output = run(model, train=True, targets=tiny_targets())
    assert (output.encoder.masks == 0).all()
    for name, prediction in all_predictions(output):
        for tensor in (prediction.logits, prediction.boxes, prediction.masks):
            assert tensor is None or torch.isfinite(tensor).all(), name
    model.eval()
    for instances in model.predict(tiny_images()):
        assert torch.isfinite(instances.scores).all() and torch.isfinite(instances.boxes).all()
        assert (instances.scores == 0).all()  # empty masks score zero


def test_predict_reports_instances_at_requested_sizes():
    model = tiny_model().eval()
    results = model.predict(tiny_images(), output_sizes=[(128, 192), (56, 80)])
    assert [tuple(r.masks.shape[1:]) for r in results] == [(128, 192), (56, 80)]
    pairs = HEAD_DEFAULTS["num_queries"] * NUM_CLASSES  # 36 (query, class) pairs, fewer than test_topk
    for r in results:
        assert len(r) == pairs and r.boxes.shape == (pairs, 4) and r.masks.dtype == torch.bool
        assert sorted(r.labels.tolist()) == sorted(list(range(NUM_CLASSES)) * HEAD_DEFAULTS["num_queries"])


def test_runs_under_autocast():
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = run(model, train=True, targets=tiny_targets())
    assert all(torch.isfinite(p.logits.float()).all() for _, p in all_predictions(output))


def parameter_names(model):
    return {n for n, _ in model.named_parameters()}


def final_logits(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return run(model).final.logits


def same_weights(reference, **overrides):
    """A model with `overrides`, holding `reference`'s weights where names agree."""
    model = tiny_model(**overrides)
    model.load_state_dict(reference.state_dict(), strict=False)
    return model


def test_de_imbalance_switch():
    on, off = tiny_model(), tiny_model(de_imbalance=False)
    assert any(n.startswith("head.de_imbalance.") for n in parameter_names(on))
    assert not any(n.startswith("head.de_imbalance.") for n in parameter_names(off))
    output = run(off)
    assert output.token_interaction == [] and output.encoder.logits.shape[1] == HEAD_DEFAULTS["num_queries"]


def test_bato_switch_changes_parameters_and_computation():
    on = tiny_model()
    off = same_weights(on, bato=False)
    assert parameter_names(on) - parameter_names(off) == {n for n in parameter_names(on) if n.startswith("head.decoder.bato.")}
    assert not torch.allclose(final_logits(on), final_logits(off))
    # with BATO off, the layers before the BATO layer are unchanged
    torch.testing.assert_close(run(on).layers[1].logits, run(off).layers[1].logits)


def test_every_guidance_source_gives_a_different_computation():
    reference = tiny_model()
    logits = {source: final_logits(same_weights(reference, guidance_source=source)) for source in GUIDANCE_SOURCES}
    for i, a in enumerate(GUIDANCE_SOURCES):
        for b in GUIDANCE_SOURCES[i + 1 :]:
            assert not torch.allclose(logits[a], logits[b]), (a, b)
    assert parameter_names(same_weights(reference, guidance_source="T_i")) == parameter_names(reference)


def test_guiding_token_generation_switch():
    reference = tiny_model()
    assert not torch.allclose(final_logits(reference), final_logits(same_weights(reference, generate_guiding_tokens=False)))


def test_number_of_guiding_tokens_changes_the_computation():
    reference = tiny_model()
    assert not torch.allclose(final_logits(reference), final_logits(same_weights(reference, num_guiding_tokens=1)))


@pytest.mark.parametrize("sizes,stages", [((12,), 1), ((24, 12), 1), ((36, 24, 12), 2)])
def test_number_and_sizes_of_selections(sizes, stages):
    model = tiny_model(selection_sizes=sizes)
    assert len(model.head.de_imbalance.stages) == stages
    output = run(model)
    assert output.encoder.logits.shape[1] == sizes[0]
    assert [s[0].logits.shape[1] for s in output.token_interaction] == list(sizes[:-1] or sizes)
    assert output.final.logits.shape[1] == 12


def test_last_selection_must_match_the_number_of_queries():
    with pytest.raises(ValueError, match="NUM_OBJECT_QUERIES"):
        DIMaskDINOHead(num_classes=3, num_queries=300, selection_sizes=(600, 200))


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_decoder_and_token_interaction_depth(layers):
    model = tiny_model(num_decoder_layers=layers + 1, token_interaction_layers=layers)
    assert len(model.head.decoder.layers) == layers + 1 and len(model.head.de_imbalance.stages[0].layers) == layers
    output = run(model)
    assert len(output.layers) == layers + 2 and len(output.token_interaction[0]) == layers


def test_random_position_token_replaces_the_initial_boxes():
    reference = tiny_model()
    torch.manual_seed(0)
    standard = run(reference).layers[0].boxes
    torch.manual_seed(0)
    randomised = run(same_weights(reference, random_position_token=True)).layers[0].boxes
    assert not torch.allclose(standard, randomised)
    assert parameter_names(same_weights(reference, random_position_token=True)) == parameter_names(reference)


def test_without_mask_enhancement_the_initial_boxes_are_the_encoder_boxes():
    model = tiny_model(de_imbalance=False, mask_enhanced_boxes=False)
    output = run(model)
    torch.testing.assert_close(output.layers[0].boxes, output.encoder.boxes, rtol=0, atol=1e-6)


def test_mask_enhanced_initial_boxes_are_the_boxes_of_the_encoder_masks():
    """Oracle: the tight box of each mask from numpy's nonzero."""
    model = tiny_model(de_imbalance=False)
    output = run(model)
    masks = (output.encoder.masks > 0).numpy()
    boxes = output.layers[0].boxes.numpy()
    height, width = masks.shape[-2:]
    checked = 0
    for b in range(masks.shape[0]):
        for q in range(masks.shape[1]):
            ys, xs = masks[b, q].nonzero()
            if len(xs) == 0:
                continue
            expected = [(xs.min() + xs.max()) / 2 / width, (ys.min() + ys.max()) / 2 / height,
                        (xs.max() - xs.min()) / width, (ys.max() - ys.min()) / height]
            assert boxes[b, q] == pytest.approx(expected, abs=1e-4)
            checked += 1
    assert checked > 0


def test_denoising_switch_and_settings():
    reference = tiny_model()
    off = tiny_model(denoising=False)
    assert "head.denoising.label_embed.weight" in parameter_names(reference)
    assert "head.denoising.label_embed.weight" not in parameter_names(off)
    assert run(off, train=True, targets=tiny_targets()).denoising is None
    small = run(tiny_model(dn_num_queries=4), train=True, targets=tiny_targets()).denoising.queries
    assert (small.num_groups, small.group_size) == (2, 2)


@pytest.mark.parametrize(
    "overrides,changed",
    [
        (dict(ffn_dim=48), "head.decoder.layers.0.ffn.linear1.weight"),
        (dict(hidden_dim=16, mask_dim=16, num_groups=4), "head.heads.class_embed.weight"),
        (dict(num_heads=2), "head.decoder.layers.0.cross_attn.attn.attention_weights.weight"),
        (dict(num_points=2), "head.decoder.layers.0.cross_attn.attn.sampling_offsets.weight"),
        (dict(num_levels=3), "head.decoder.layers.0.cross_attn.attn.sampling_offsets.weight"),
    ],
)
def test_size_settings_shape_the_parameters(overrides, changed):
    reference = dict(tiny_model().named_parameters())[changed].shape
    model = tiny_model(**overrides)
    assert dict(model.named_parameters())[changed].shape != reference
    assert torch.isfinite(run(model).final.logits).all()


def test_dropout_setting_is_used():
    model = tiny_model(dropout=0.5)
    batch, _ = model.preprocess(tiny_images())
    model.train()
    torch.manual_seed(0)
    first = model(batch).layers[1].logits
    torch.manual_seed(1)
    assert not torch.allclose(first, model(batch).layers[1].logits)
    model.eval()
    torch.testing.assert_close(model(batch).layers[1].logits, model(batch).layers[1].logits)


def test_bad_settings_are_reported():
    with pytest.raises(ValueError, match="guidance source"):
        DIMaskDINOHead(num_classes=3, guidance_source="Q")
    with pytest.raises(ValueError, match="T_s2"):
        DIMaskDINOHead(num_classes=3, de_imbalance=False, guidance_source="T_s2")
    with pytest.raises(ValueError, match="MASK_DIM"):
        DIMaskDINOHead(num_classes=3, mask_dim=128)
    with pytest.raises(ValueError, match="BATO before layer 1"):
        DIMaskDINOHead(num_classes=3, num_decoder_layers=1)
