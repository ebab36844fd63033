"""The head composed from its parts: each optional part (De-Imbalance, BATO, denoising) and
each setting changes the parameters or the computation as described."""

import pytest
import torch

from di_maskdino.modeling import (
    Architecture,
    BATOSpec,
    DeImbalanceSpec,
    SpecError,
    build_head,
    build_model,
)

from .tiny import TINY, TinyBackbone, tiny_images, tiny_model, tiny_targets


def run(model, train=False, targets=None):
    model.train(train)
    batch, _ = model.preprocess(tiny_images())
    return model(batch, targets=targets)


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


def test_without_de_imbalance_the_first_selection_gives_the_queries():
    on, off = tiny_model(), tiny_model(de_imbalance=None)
    assert any(n.startswith("head.de_imbalance.") for n in parameter_names(on))
    assert off.head.de_imbalance is None and not any(n.startswith("head.de_imbalance.") for n in parameter_names(off))
    output = run(off)
    assert output.token_interaction == [] and output.encoder.logits.shape[1] == TINY.num_queries


class Recorder:
    """Records, in one forward pass, what each decoder layer attends to, the decoder's input
    T_i and token sets, BATO's candidates, guiding tokens and output T_bal."""

    def __init__(self, model):
        self.memories, self.seen = [], {}
        head = model.head
        head.decoder.register_forward_pre_hook(self._decoder, with_kwargs=True)
        self.layer_outputs = []
        for layer in head.decoder.layers:
            layer.register_forward_pre_hook(lambda _, args: self.memories.append(args[3].tokens))
            layer.register_forward_hook(lambda _, args, out: self.layer_outputs.append(out))
        if head.bato is not None:
            head.bato.register_forward_hook(lambda _, args, out: self.seen.update(t_bal=out[0]))
            head.bato.generator.register_forward_pre_hook(lambda _, args: self.seen.update(candidates=args[0]))
            head.bato.register_forward_pre_hook(lambda _, args: self.seen.update(guide=args[2]))

    def _decoder(self, _, args, kwargs):
        self.seen.update(t_i=args[2].tokens, token_sets=kwargs.get("token_sets"))


def test_without_bato_every_layer_attends_to_t_i():
    on = tiny_model()
    off = same_weights(on, bato=None)
    assert parameter_names(on) - parameter_names(off) == {n for n in parameter_names(on) if n.startswith("head.bato.")}
    recorded = Recorder(off)
    run(off)
    assert len(recorded.memories) == TINY.num_decoder_layers
    assert all(memory is recorded.seen["t_i"] for memory in recorded.memories)


def test_with_bato_layer_0_attends_to_t_i_and_the_later_layers_to_t_bal():
    """Q_bal guidance (the paper's): BATO runs after decoder layer 0 (Eq. 4), whose output
    gives the guiding tokens; layers 1.. attend to T_bal (Eq. 9)."""
    model = tiny_model()
    recorded = Recorder(model)
    output = run(model)
    assert recorded.memories[0] is recorded.seen["t_i"]
    assert all(memory is recorded.seen["t_bal"] for memory in recorded.memories[1:])
    # the candidates are the best-scored of the queries leaving layer 0 (Q_bal)
    torch.testing.assert_close(recorded.seen["candidates"], best_tokens(model, recorded.layer_outputs[0]))
    assert recorded.seen["t_bal"].shape == recorded.seen["t_i"].shape
    assert output.final.logits.shape[1] == TINY.num_queries


def best_tokens(model, tokens):
    """The G tokens with the highest class score (Eq. 5-7's choice), in score order."""
    scores = model.head.heads.class_embed(tokens).max(-1).values
    best = scores.topk(model.head.bato.num_guiding_tokens, dim=1).indices
    return torch.gather(tokens, 1, best[..., None].expand(-1, -1, tokens.shape[-1]))


@pytest.mark.parametrize("source", ["T_i", "T_s1", "T_s2"])
def test_a_token_set_guides_from_its_best_tokens_before_layer_0(source):
    """Tab. 5: with a token set as guidance source, BATO runs before decoder layer 0, which
    already attends to T_bal, and its candidates are that token set's tokens."""
    model = same_weights(tiny_model(), bato=dict(guidance_source=source))
    assert parameter_names(model) == parameter_names(tiny_model())  # the same parameters, used otherwise
    recorded = Recorder(model)
    run(model)
    assert all(memory is recorded.seen["t_bal"] for memory in recorded.memories)
    chosen = recorded.seen["token_sets"][source].tokens
    torch.testing.assert_close(recorded.seen["candidates"], best_tokens(model, chosen))


@pytest.mark.parametrize("generate", [True, False])
def test_guiding_tokens_are_mask_embeddings_or_the_queries_themselves(generate):
    """Tab. 6: with generation, T_g are the mask embeddings of the best candidates (Eq. 5) with
    their positional queries as keys; without it, the candidates themselves, no key positions."""
    model = same_weights(tiny_model(), bato=dict(generate_guiding_tokens=generate, num_guiding_tokens=3))
    recorded = Recorder(model)
    run(model)
    candidates, guide = recorded.seen["candidates"], recorded.seen["guide"]
    assert candidates.shape[1] == 3
    if generate:
        torch.testing.assert_close(guide.values, model.head.heads.mask_embed(candidates))
        assert guide.key_pos is not None and guide.key_pos.shape == candidates.shape
    else:
        assert guide.values is candidates and guide.key_pos is None


@pytest.mark.parametrize("sizes,stages", [((12,), 1), ((24, 12), 1), ((36, 24, 12), 2)])
def test_number_and_sizes_of_selections(sizes, stages):
    model = tiny_model(de_imbalance=dict(selection_sizes=sizes))
    assert len(model.head.de_imbalance.stages) == stages
    output = run(model)
    assert output.encoder.logits.shape[1] == sizes[0]
    assert [s[0].logits.shape[1] for s in output.token_interaction] == list(sizes[:-1] or sizes)
    assert output.final.logits.shape[1] == 12


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_decoder_and_token_interaction_depth(layers):
    model = tiny_model(num_decoder_layers=layers + 1, de_imbalance=dict(token_interaction_layers=layers))
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


def test_initial_boxes_are_the_boxes_of_the_selected_tokens():
    output = run(tiny_model(de_imbalance=None, mask_enhanced_boxes=False))
    torch.testing.assert_close(output.layers[0].boxes, output.encoder.boxes, rtol=0, atol=1e-6)


def test_denoising_part_and_settings():
    reference = tiny_model()
    off = tiny_model(denoising=None)
    assert "head.denoising.label_embed.weight" in parameter_names(reference)
    assert "head.denoising.label_embed.weight" not in parameter_names(off)
    assert run(off, train=True, targets=tiny_targets()).denoising is None
    small = run(tiny_model(denoising=dict(num_queries=4)), train=True, targets=tiny_targets()).denoising.queries
    assert (small.num_groups, small.group_size) == (2, 2)
    empty = [dict(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4))] * 2
    assert run(reference, train=True, targets=empty).denoising.queries is None  # charged as zeros


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
    """DROPOUT reaches every dropout of the network; in evaluation the model is the
    dropout-free one with the same weights."""
    model = tiny_model(dropout=0.5)
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.5}
    plain = same_weights(model, dropout=0.0)
    batch, _ = model.preprocess(tiny_images())
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch).final.logits, plain(batch).final.logits, rtol=0, atol=0)


def fields_refused(**overrides):
    """The fields an `Architecture` like TINY with `overrides` reports, in its order."""
    with pytest.raises(SpecError) as error:
        Architecture(**{**TINY.__dict__, **overrides})
    return [field for field, _ in error.value.problems]


def test_parts_that_cannot_work_together_are_reported():
    assert fields_refused(de_imbalance=None, bato=BATOSpec(guidance_source="T_s2")) == ["bato.guidance_source"]
    assert fields_refused(mask_dim=16) == ["mask_dim"]  # mask guiding tokens are mask embeddings
    assert fields_refused(num_decoder_layers=1) == ["num_decoder_layers"]  # BATO runs before layer 1
    # without generated guiding tokens or without BATO the mask size is free
    Architecture(**{**TINY.__dict__, "mask_dim": 16, "bato": BATOSpec(generate_guiding_tokens=False)})
    Architecture(**{**TINY.__dict__, "mask_dim": 16, "bato": None})
    head = build_head(TINY)
    with pytest.raises(ValueError, match="levels but the decoder expects"):
        model = build_model(Architecture(**{**TINY.__dict__, "num_levels": 3}), TinyBackbone())
        model.head = head  # a 4-level head on a 3-level encoder
        run(model)


def test_architecture_checks_its_values_all_at_once():
    assert fields_refused(num_queries=12, de_imbalance=DeImbalanceSpec(selection_sizes=(24, 10))) == [
        "de_imbalance.selection_sizes"
    ]
    assert fields_refused(de_imbalance=DeImbalanceSpec(selection_sizes=(6, 12))) == ["de_imbalance.selection_sizes"]
    assert fields_refused(num_classes=0, hidden_dim=30, dropout=1.0) == [
        "num_classes",
        "hidden_dim",  # divisible by the heads
        "hidden_dim",  # divisible by the groups
        "dropout",
        "mask_dim",  # no longer the hidden size that BATO's mask guiding tokens need
    ]
    with pytest.raises(SpecError) as error:
        Architecture(num_classes=0)
    assert "num_classes: must be at least 1" in str(error.value)
