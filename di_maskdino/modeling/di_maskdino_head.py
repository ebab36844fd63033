"""The DI-MaskDINO head: from the encoder output to every supervised prediction, composed
of the paper's parts (Sec. 3.2.2-3.2.4):

    T_i --first selection (Eq. 1)--> T_s1 --De-Imbalance (Eq. 2-3)--> T_s2
        --(+ denoising queries)--> decoder layer 0 (Eq. 4) --> Q_bal
        --BATO (Eq. 5-8)--> T_bal --> decoder layers 1.. (Eq. 9) --> prediction heads (Eq. 10-11)

Each optional part is a module or None: without the De-Imbalance module the first selection
keeps the decoder's queries; without BATO every decoder layer attends to T_i; without both
the head is MaskDINO's.

Shape glossary: B batch, N queries, S encoder tokens, C hidden dim, K classes.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .bato import BalanceAwareTokensOptimization
from .boxes import inverse_sigmoid, refine_boxes
from .de_imbalance import DeImbalance
from .decoder import DecoderOutput, DeformableDecoder
from .denoising import DenoisingGenerator, DenoisingQueries, denoising_attention_mask
from .encoder import EncoderOutput
from .feature_tokens import FeatureTokens
from .outputs import DenoisingOutput, DIMaskDINOOutput, Predictions, RawDetections
from .prediction_heads import PredictionHeads
from .query_selection import QuerySelection, TokenSet

__all__ = ["DIMaskDINOHead", "HeadState"]


@dataclass
class HeadState:
    """What the head computed up to the decoder's output: the queries entering the decoder
    (content (B, N, C), reference boxes (B, N, 4)), the mask features (B, D, h, w) or None,
    the decoder's output, the encoder and token-interaction predictions and the denoising
    queries (or None)."""

    content: torch.Tensor
    reference: torch.Tensor
    mask_features: Optional[torch.Tensor]
    decoded: DecoderOutput
    encoder_prediction: Predictions
    token_interaction: List[List[Predictions]]
    denoising: Optional[DenoisingQueries]


class DIMaskDINOHead(nn.Module):
    """
    Args:
        heads: the shared prediction heads.
        query_selection: the first selection (k1 tokens; the decoder's queries when there is
            no De-Imbalance module).
        decoder: the deformable decoder.
        de_imbalance: the De-Imbalance module, or None.
        bato: the BATO module (with its guidance source), or None.
        denoising: the denoising-query generator (training only), or None.
        random_reference_boxes: the position-token constraint of the imbalance tolerance
            test (Tab. 3): the matching queries enter the decoder with uniformly random
            reference boxes.

    Which parts fit together (BATO's guidance source and the decoder's depth, the mask
    embedding's size) is checked where the parts are described: `Architecture.problems`.
    """

    def __init__(
        self,
        *,
        heads: PredictionHeads,
        query_selection: QuerySelection,
        decoder: DeformableDecoder,
        de_imbalance: Optional[DeImbalance] = None,
        bato: Optional[BalanceAwareTokensOptimization] = None,
        denoising: Optional[DenoisingGenerator] = None,
        random_reference_boxes: bool = False,
    ):
        super().__init__()
        self.heads = heads
        self.query_selection = query_selection
        self.de_imbalance = de_imbalance
        self.denoising = denoising
        self.bato = bato
        self.decoder = decoder
        self.random_reference_boxes = random_reference_boxes

    @property
    def num_levels(self) -> int:
        return self.decoder.layers[0].cross_attn.attn.num_levels

    def feature_tokens(self, encoder_output: EncoderOutput) -> FeatureTokens:
        """T_i as the decoder reads it.

        NOTE: the decoder reads the levels from the lowest resolution to the highest (the
        reverse of the encoder); the released weights depend on this order.
        """
        maps = encoder_output.features[::-1]
        if len(maps) != self.num_levels:
            raise ValueError(f"the encoder gives {len(maps)} levels but the decoder expects {self.num_levels}")
        return FeatureTokens.from_maps(maps, encoder_output.padding)

    def select_queries(self, memory: FeatureTokens, mask_features: torch.Tensor):
        """Eq. 1-3: the queries entering the decoder, the named token sets, the supervised
        encoder and token-interaction outputs."""
        first = self.query_selection(memory, mask_features, self.heads)  # Eq. 1: T_s1
        token_sets: Dict[str, TokenSet] = {"T_i": first.scored, "T_s1": first.selected}
        queries, token_interaction = first.selected, []
        if self.de_imbalance is not None:
            queries, token_interaction = self.de_imbalance(queries, self.heads)  # Eq. 2-3: T_s2
            token_sets["T_s2"] = queries
        return queries, token_sets, first.predictions, token_interaction

    def add_denoising_queries(
        self, content: torch.Tensor, box_logits: torch.Tensor, targets
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[DenoisingQueries]]:
        """Prepends the denoising queries of `targets` (training only); returns the queries,
        their box logits, the self-attention mask and the denoising queries (or None)."""
        if not (self.training and self.denoising is not None and targets is not None):
            return content, box_logits, None, None
        dn = self.denoising(targets)
        if dn is None:
            return content, box_logits, None, None
        attn_mask = denoising_attention_mask(dn.num_groups, dn.group_size, content.shape[1], content.device)
        return torch.cat([dn.content, content], 1), torch.cat([dn.box_logits, box_logits], 1), attn_mask, dn

    def layer_prediction(
        self, decoded: DecoderOutput, index: int, with_masks: bool, factored: Optional[bool] = None
    ) -> Tuple[Predictions, torch.Tensor]:
        """The supervised prediction of decoder layer `index` (Eq. 10-11) and its normed
        output (B, N, C), from which masks of chosen queries can be made later; `factored`:
        see `forward`."""
        # NOTE: as in the release, a layer's output passes the heads' LayerNorm here and
        # again inside the heads (LayerNorm twice), and its supervised box refines the
        # layer's reference box from this normed output, whereas the reference box handed
        # to the next layer was refined from the un-normed output (decoder.py).
        normed = self.heads.norm(decoded.hidden[index])
        boxes = refine_boxes(decoded.references[index], self.heads.box_embed(normed))
        features = decoded.mask_features[index] if with_masks else None
        # in training the masks stay factored (mask embeddings and mask features, see `Predictions`)
        factored = self.training if factored is None else factored
        prediction = self.heads.predict(normed, boxes, features, factored=factored)
        prediction.embeddings = normed  # what the box mask head reads of each query
        return prediction, normed

    def layer_predictions(
        self, decoded: DecoderOutput, all_layer_masks: bool, factored: Optional[bool] = None
    ) -> List[Predictions]:
        """The supervised prediction of every decoder layer (Eq. 10-11); masks at every layer
        or at the last one only."""
        last = len(decoded.hidden) - 1
        return [
            self.layer_prediction(decoded, index, all_layer_masks or index == last, factored)[0]
            for index in range(last + 1)
        ]

    def decode(self, encoder_output: EncoderOutput, targets=None) -> HeadState:
        """Everything up to and including the decoder: Eq. 1-9."""
        memory = self.feature_tokens(encoder_output)  # T_i
        mask_features = encoder_output.mask_features
        queries, token_sets, encoder_prediction, token_interaction = self.select_queries(memory, mask_features)
        box_logits = queries.box_logits
        if self.random_reference_boxes:
            box_logits = inverse_sigmoid(torch.rand_like(box_logits))
        num_matching = queries.tokens.shape[1]
        content, box_logits, attn_mask, dn = self.add_denoising_queries(queries.tokens, box_logits, targets)
        reference = box_logits.sigmoid()
        decoded = self.decoder(
            content,
            reference,
            memory,
            mask_features,
            self.heads,
            attn_mask=attn_mask,
            num_matching=num_matching,
            bato=self.bato,
            token_sets=token_sets,
        )
        return HeadState(content, reference, mask_features, decoded, encoder_prediction, token_interaction, dn)

    def forward(
        self,
        encoder_output: EncoderOutput,
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
        all_layer_masks: Optional[bool] = None,
        factored_masks: Optional[bool] = None,
    ) -> DIMaskDINOOutput:
        """
        Args:
            encoder_output: the encoder maps and mask features.
            targets: per image "labels" (M,) and "boxes" (M, 4) normalised cxcywh; used for
                denoising queries in training.
            all_layer_masks: predict masks at every layer (default: in training; evaluation
                needs only the last layer's masks).
            factored_masks: keep the masks as their two factors, the product made when a
                prediction's `masks` is first read (default: in training; see `Predictions`).
        """
        all_layer_masks = self.training if all_layer_masks is None else all_layer_masks
        factored = self.training if factored_masks is None else factored_masks
        state = self.decode(encoder_output, targets)
        layers = [
            self.heads.predict(
                state.content, state.reference, state.mask_features if all_layer_masks else None, factored=factored
            )
        ]
        layers += self.layer_predictions(state.decoded, all_layer_masks, factored)

        dn = state.denoising
        denoising = None
        if dn is not None:
            denoising = DenoisingOutput(dn, [p.slice_queries(0, dn.num_queries) for p in layers])
            layers = [p.slice_queries(dn.num_queries) for p in layers]
        elif self.training and self.denoising is not None:
            denoising = DenoisingOutput(None, [])
            # Keeps the label embedding in the graph when a batch has no object, so that
            # distributed training sees no unused parameter.
            layers[-1].logits = layers[-1].logits + 0.0 * self.denoising.label_embed.weight.sum()
        return DIMaskDINOOutput(layers, state.encoder_prediction, state.token_interaction, denoising)

    def detect(self, encoder_output: EncoderOutput, k: int) -> RawDetections:
        """Inference: the k best (query, class) pairs of the final layer by class
        probability, with the mask logits of those queries only.

        The same numbers as the final layer of `forward` in evaluation, restricted to the
        kept pairs, with static output shapes (k = min(k, N * K)) for `torch.export`."""
        state = self.decode(encoder_output)
        final, normed = self.layer_prediction(state.decoded, len(state.decoded.hidden) - 1, with_masks=False)
        num_classes = final.logits.shape[-1]
        k = min(k, final.logits.shape[1] * num_classes)
        scores, index = final.logits.sigmoid().flatten(1).topk(k, dim=1)
        query = torch.div(index, num_classes, rounding_mode="floor")
        labels = index % num_classes
        boxes = final.boxes.gather(1, query[..., None].expand(-1, -1, 4))
        mask_features = state.decoded.mask_features[-1]
        mask_logits = None
        if mask_features is not None:
            kept = normed.gather(1, query[..., None].expand(-1, -1, normed.shape[-1]))
            mask_logits = self.heads(kept, mask_features)[1]
        return RawDetections(scores, labels, boxes, mask_logits)
