"""The DI-MaskDINO head: from the encoder output to every supervised prediction.

    T_i --query selection (k1)--> T_s1 --De-Imbalance (TI + k2)--> T_s2
        --(+ denoising queries)--> decoder layer 1 --> Q_bal --BATO--> T_bal, mask features
        --> decoder layers 2..L

With DI off the query selection keeps NUM_OBJECT_QUERIES tokens and no token interaction
runs; with BATO off every layer attends to T_i: both off is MaskDINO.

Shape glossary: B batch, N queries, S encoder tokens, C hidden dim, K classes.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..layers import box_position_embedding, feature_map_position_embedding
from .bato import BalanceAwareTokensOptimization
from .de_imbalance import DeImbalance
from .decoder import DeformableDecoder, EncoderTokens
from .denoising import DenoisingGenerator, denoising_attention_mask
from .encoder import EncoderOutput
from .geometry import inverse_sigmoid, level_start_index_of, refine_boxes
from .heads import PredictionHeads
from .outputs import DenoisingOutput, DIMaskDINOOutput, Predictions
from .query_selection import QuerySelection

__all__ = ["DIMaskDINOHead", "GUIDANCE_SOURCES"]

# BATO guidance sources (paper Tab. 5): encoder tokens T_i, first-selected T_s1,
# second-selected T_s2, balance-aware query Q_bal (the paper's choice).
GUIDANCE_SOURCES = ("T_i", "T_s1", "T_s2", "Q_bal")


class DIMaskDINOHead(nn.Module):
    """
    Args:
        num_classes: K.
        hidden_dim, mask_dim, num_heads, ffn_dim, dropout: transformer sizes.
        num_levels, num_points: deformable attention in the decoder.
        num_queries: queries entering the decoder (NUM_OBJECT_QUERIES).
        num_decoder_layers: decoder layers.
        de_imbalance: DI module on/off.
        selection_sizes: sizes of the successive selections when DI is on, the last one
            equal to `num_queries`: (600, 300) is the paper's k1, k2; (900, 600, 300) three
            selections; (300,) a single selection followed by token interaction.
        token_interaction_layers: token-interaction layers per DI stage.
        bato: BATO on/off.
        guidance_source: one of GUIDANCE_SOURCES.
        generate_guiding_tokens: mask/box guiding tokens (True) or the raw queries (Tab. 6).
        num_guiding_tokens: G.
        mask_enhanced_boxes: initial boxes from the predicted masks of T_s1.
        denoising: denoising queries on/off; dn_num_queries, dn_noise_scale their settings.
        random_position_token: imbalance tolerance test (Tab. 3): the matching queries
            enter the decoder with uniformly random reference boxes.
        num_groups: GroupNorm groups.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        hidden_dim: int = 256,
        mask_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        num_levels: int = 4,
        num_points: int = 4,
        num_queries: int = 300,
        num_decoder_layers: int = 6,
        de_imbalance: bool = True,
        selection_sizes: Sequence[int] = (600, 300),
        token_interaction_layers: int = 2,
        bato: bool = True,
        guidance_source: str = "Q_bal",
        generate_guiding_tokens: bool = True,
        num_guiding_tokens: int = 50,
        mask_enhanced_boxes: bool = True,
        denoising: bool = True,
        dn_num_queries: int = 100,
        dn_noise_scale: float = 0.4,
        random_position_token: bool = False,
        num_groups: int = 32,
    ):
        super().__init__()
        if de_imbalance:
            if not selection_sizes or selection_sizes[-1] != num_queries:
                raise ValueError(
                    f"DI-MaskDINO: the last selection size must equal NUM_OBJECT_QUERIES ({num_queries}), "
                    f"got selection sizes {list(selection_sizes)}"
                )
            self.selection_sizes = list(selection_sizes)
        else:
            self.selection_sizes = [num_queries]
        if guidance_source not in GUIDANCE_SOURCES:
            raise ValueError(f"DI-MaskDINO: BATO guidance source must be one of {GUIDANCE_SOURCES}, got {guidance_source!r}")
        if guidance_source == "T_s2" and not de_imbalance:
            raise ValueError("DI-MaskDINO: BATO guidance from T_s2 needs the De-Imbalance module (it makes T_s2)")
        if bato and generate_guiding_tokens and mask_dim != hidden_dim:
            raise ValueError(f"DI-MaskDINO: BATO's mask guiding tokens need MASK_DIM ({mask_dim}) == HIDDEN_DIM ({hidden_dim})")
        self.hidden_dim = hidden_dim
        self.num_levels = num_levels
        self.guidance_source = guidance_source
        self.random_position_token = random_position_token

        self.heads = PredictionHeads(hidden_dim, num_classes, mask_dim)
        self.query_selection = QuerySelection(hidden_dim, mask_enhanced_boxes)
        self.de_imbalance = None
        if de_imbalance:
            stage_sizes = self.selection_sizes[1:] or self.selection_sizes
            self.de_imbalance = DeImbalance(hidden_dim, num_heads, ffn_dim, dropout, token_interaction_layers, stage_sizes)
        self.denoising = DenoisingGenerator(num_classes, hidden_dim, dn_num_queries, dn_noise_scale) if denoising else None
        bato_module = None
        if bato:
            bato_module = BalanceAwareTokensOptimization(
                hidden_dim, num_heads, ffn_dim, dropout, num_guiding_tokens, generate_guiding_tokens, num_groups
            )
        self.decoder = DeformableDecoder(
            hidden_dim,
            num_heads,
            ffn_dim,
            dropout,
            num_levels,
            num_points,
            num_decoder_layers,
            bato=bato_module,
            bato_layer=1 if guidance_source == "Q_bal" else 0,
        )

    def encoder_tokens(self, encoder_output: EncoderOutput) -> EncoderTokens:
        """Flattens the encoder maps for the decoder.

        NOTE: the decoder reads the levels from the lowest resolution to the highest (the
        reverse of the encoder); the released weights depend on this order.
        """
        maps = encoder_output.features[::-1]
        if len(maps) != self.num_levels:
            raise ValueError(f"DI-MaskDINO: the encoder gives {len(maps)} levels but the decoder expects {self.num_levels}")
        batch = maps[0].shape[0]
        shapes = [list(m.shape[-2:]) for m in maps]
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        pos = torch.cat(
            [feature_map_position_embedding(batch, h, w, self.hidden_dim, tokens.device).flatten(2).transpose(1, 2) for h, w in shapes],
            dim=1,
        )
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=tokens.device)
        return EncoderTokens(tokens, pos, spatial_shapes, level_start_index_of(spatial_shapes), shapes)

    def forward(
        self,
        encoder_output: EncoderOutput,
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
        all_layer_masks: Optional[bool] = None,
    ) -> DIMaskDINOOutput:
        """
        Args:
            encoder_output: the encoder maps and mask features.
            targets: per image "labels" (M,) and "boxes" (M, 4) normalised cxcywh; used for
                denoising queries in training.
            all_layer_masks: predict masks at every layer (default: in training only; in
                evaluation only the last layer's masks are needed).
        """
        all_layer_masks = self.training if all_layer_masks is None else all_layer_masks
        memory = self.encoder_tokens(encoder_output)
        mask_features = encoder_output.mask_features

        selected = self.query_selection(memory, mask_features, self.heads, self.selection_sizes[0])
        content, box_logits = selected.content, selected.box_logits
        guide_tokens = guide_box_logits = None
        if self.guidance_source == "T_i":
            guide_tokens, guide_box_logits = selected.all_tokens, selected.all_box_logits
        elif self.guidance_source == "T_s1":
            guide_tokens, guide_box_logits = content, box_logits

        token_interaction = []
        if self.de_imbalance is not None:
            content, box_logits, stages = self.de_imbalance(content, box_logits, self.heads)
            token_interaction = [[Predictions(l, b) for l, b in zip(s.logits, s.boxes)] for s in stages]
        if self.guidance_source == "T_s2":
            guide_tokens, guide_box_logits = content, box_logits
        guide = None
        if self.decoder.bato is not None and guide_tokens is not None:
            guide_pos = self.decoder.ref_point_head(box_position_embedding(guide_box_logits.sigmoid(), self.hidden_dim // 2))
            guide = self.decoder.bato.guiding_tokens(guide_tokens, guide_pos, self.heads)
        if self.random_position_token:
            box_logits = inverse_sigmoid(torch.rand_like(box_logits))

        num_matching = content.shape[1]
        dn_queries, attn_mask = None, None
        if self.training and self.denoising is not None and targets is not None:
            dn_queries = self.denoising(targets)
            if dn_queries is not None:
                content = torch.cat([dn_queries.content, content], dim=1)
                box_logits = torch.cat([dn_queries.box_logits, box_logits], dim=1)
                attn_mask = denoising_attention_mask(dn_queries.num_groups, dn_queries.group_size, num_matching, content.device)

        reference = box_logits.sigmoid()
        logits, masks = self.heads(content, mask_features if all_layer_masks else None)
        layers = [Predictions(logits, reference, masks)]
        decoded = self.decoder(content, reference, memory, mask_features, self.heads, attn_mask, num_matching, guide)
        last = len(decoded.hidden) - 1
        for index, (hidden, start, layer_mask_features) in enumerate(zip(decoded.hidden, decoded.references, decoded.mask_features)):
            normed = self.heads.norm(hidden)
            want_masks = all_layer_masks or index == last
            logits, masks = self.heads(normed, layer_mask_features if want_masks else None)
            boxes = refine_boxes(start, self.heads.box_embed(normed), boxes_are_logits=False)
            layers.append(Predictions(logits, boxes, masks))

        denoising = None
        if dn_queries is not None:
            split = dn_queries.num_queries
            denoising = DenoisingOutput(dn_queries, [p.slice_queries(0, split) for p in layers])
            layers = [p.slice_queries(split) for p in layers]
        elif self.training and self.denoising is not None:
            # Keeps the label embedding in the graph when a batch has no object, so that
            # distributed training sees no unused parameter.
            layers[-1].logits = layers[-1].logits + 0.0 * self.denoising.label_embed.weight.sum()
        return DIMaskDINOOutput(layers, selected.predictions, token_interaction, denoising)
