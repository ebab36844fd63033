"""The whole network: shapes, gradients, robustness, inference."""

import pytest
import torch

from .tiny import NUM_CLASSES, TINY, all_predictions, perturb, tiny_images, tiny_model, tiny_targets


def run(model, train=False, targets=None, images=None, all_layer_masks=None):
    model.train(train)
    batch, _ = model.preprocess(images or tiny_images())
    return model(batch, targets=targets, all_layer_masks=all_layer_masks)


def test_training_outputs_have_documented_shapes():
    model = tiny_model()
    output = run(model, train=True, targets=tiny_targets())
    batch, queries, k1 = 2, TINY.num_queries, TINY.de_imbalance.selection_sizes[0]
    mask_size = (64 // 4, 96 // 4)  # padded to 64 x 96
    assert len(output.layers) == TINY.num_decoder_layers + 1
    for prediction in output.layers:
        assert prediction.logits.shape == (batch, queries, NUM_CLASSES) and prediction.logits.dtype == torch.float32
        assert prediction.boxes.shape == (batch, queries, 4)
        assert ((prediction.boxes >= 0) & (prediction.boxes <= 1)).all()
        assert prediction.masks.shape == (batch, queries) + mask_size
    assert (
        output.encoder.logits.shape == (batch, k1, NUM_CLASSES)
        and output.encoder.masks.shape == (batch, k1) + mask_size
    )
    assert [len(stage) for stage in output.token_interaction] == [TINY.de_imbalance.token_interaction_layers]
    for prediction in output.token_interaction[0]:
        assert prediction.logits.shape == (batch, k1, NUM_CLASSES) and prediction.masks is None
    dn = output.denoising
    assert (dn.queries.group_size, dn.queries.num_groups) == (2, 4)  # 8 // max(2, 1) objects
    assert dn.layers[-1].logits.shape == (batch, 8, NUM_CLASSES) and dn.layers[-1].masks.shape == (batch, 8) + mask_size


def test_evaluation_predicts_only_the_last_layer_masks_unless_asked():
    model = tiny_model()
    output = run(model)
    assert [p.masks is None for p in output.layers] == [True] * TINY.num_decoder_layers + [False]
    assert output.denoising is None
    output = run(model, all_layer_masks=True)
    assert all(p.masks is not None for p in output.layers)


@pytest.mark.parametrize(
    "targets", [tiny_targets(), [dict(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4))] * 2]
)
def test_backward_reaches_every_parameter(targets):
    """Distributed training requires that every trainable parameter gets a gradient, also
    for a batch without objects (no denoising queries then)."""
    model = tiny_model()
    output = run(model, train=True, targets=targets)
    loss = sum(
        p.logits.sum() + p.boxes.sum() + (0 if p.masks is None else p.masks.sum()) for _, p in all_predictions(output)
    )
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
    pairs = TINY.num_queries * NUM_CLASSES  # 36 (query, class) pairs, fewer than test_topk
    for r in results:
        assert len(r) == pairs and r.boxes.shape == (pairs, 4) and r.masks.dtype == torch.bool
        assert sorted(r.labels.tolist()) == sorted(list(range(NUM_CLASSES)) * TINY.num_queries)


def test_runs_under_autocast():
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = run(model, train=True, targets=tiny_targets())
    assert all(torch.isfinite(p.logits.float()).all() for _, p in all_predictions(output))


def test_training_masks_are_factored_and_equal_the_evaluation_masks():
    """In training every mask prediction holds mask embeddings and features; `masks` gives
    the logits evaluation computes (no denoising here, so the queries are the same)."""
    model = tiny_model()
    trained = run(model, train=True)
    evaluated = run(model, all_layer_masks=True)
    for (name, p), (_, q) in zip(all_predictions(trained), all_predictions(evaluated)):
        assert p.has_masks == q.has_masks, name
        if p.has_masks:
            assert p.mask_embed is not None and q.mask_embed is None, name
            torch.testing.assert_close(p.masks, q.masks, rtol=1e-5, atol=1e-5, msg=name)


def test_detect_is_the_final_layer_restricted_to_its_top_pairs():
    """detect(): the k best (query, class) pairs of the evaluation forward's final layer, with
    their boxes and their queries' masks (computed for those queries only)."""
    model = perturb(tiny_model()).eval()
    batch, _ = model.preprocess(tiny_images())
    with torch.no_grad():
        final = model(batch).final
        raw = model.detect(batch)
    k = model.test_topk if model.test_topk < TINY.num_queries * NUM_CLASSES else TINY.num_queries * NUM_CLASSES
    for image in range(batch.shape[0]):
        probabilities = final.logits[image].sigmoid()
        scores, index = probabilities.flatten().sort(descending=True)
        torch.testing.assert_close(raw.scores[image], scores[:k])
        query, label = index[:k] // NUM_CLASSES, index[:k] % NUM_CLASSES
        assert torch.equal(raw.labels[image], label)
        torch.testing.assert_close(raw.boxes[image], final.boxes[image, query])
        torch.testing.assert_close(raw.mask_logits[image], final.masks[image, query], rtol=1e-5, atol=1e-5)


def test_predict_equals_instance_inference_of_the_forward_output():
    model = perturb(tiny_model()).eval()
    model.test_topk = 10
    images = tiny_images()
    batch, sizes = model.preprocess(images)
    with torch.no_grad():
        expected = model.instances(model(batch).final, sizes, tuple(batch.shape[-2:]), [(70, 100), (56, 80)])
    found = model.predict(images, output_sizes=[(70, 100), (56, 80)])
    for mine, theirs in zip(found, expected):
        assert torch.equal(mine.labels, theirs.labels)
        torch.testing.assert_close(mine.scores, theirs.scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.boxes, theirs.boxes)
        assert (mine.masks != theirs.masks).float().mean() <= 1e-3
