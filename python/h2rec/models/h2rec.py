"""H2Rec: dual-branch sequential recommender harmonising semantic IDs (SID) and hash IDs (HID).

Streams (all (B, T, D), left-padded, positions and sqrt(D) scaling from ``SequenceInput``):
  - HID stream from the HID table;
  - one stream per SID level from that level's code table (k-means centroids -> projection);
  - the fused SID stream (mean, or sum, over levels).
SID branch (multi-granularity fusion): for each level l, cross-attention with queries = level-l
stream and keys/values = HID stream; the L outputs are mixed by a softmax gate over levels
(an MLP on the HID stream at the position, plus a fixed coarse-to-fine prior: at the user's last
position this is the per-user gate) and encoded by the backbone.
HID branch (cross-attention injection): cross-attention with queries = HID stream and
keys/values = fused SID stream, encoded by the backbone (shared by default).
Score, by default (``item_score="fused"``): both branches score the fusion baseline's item
vector HID + SID, so a rare item's score carries its codes in both terms; since
[s_sid ; s_hid] . [HID + SID ; HID + SID] = (s_sid + s_hid) . (HID + SID), the user vector is
the sum of the branch states (B, T, D) and the item vector HID + SID (..., D). The paper's
pairing (``item_score="paired"``): user vector [SID-branch state ; HID-branch state] (B, T, 2D)
against [HID embedding ; fused SID embedding] (..., 2D), i.e. the SID branch, which reads HID
values, scores against the HID table and the HID branch, which reads SID values, against the
SID one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from h2rec.errors import DataError
from h2rec.ops import softmax
from h2rec.losses import item_alignment_loss_pairs, mask_lowest_levels, symmetric_info_nce
from h2rec.models.backbone import (
    Backbone,
    CrossAttention,
    Dropout,
    LevelCrossAttention,
    Linear,
    SequenceInput,
    attention_mask,
)
from h2rec.models.config import ModelConfig
from h2rec.models.embeddings import HidEmbedding, SidEmbedding
from h2rec.models.positives import CooccurrencePositives
from h2rec.models.text_match import TextMatch


class LevelGate(nn.Module):
    """Softmax gate over L SID levels: softmax(MLP(x) + prior), prior falling coarse -> fine.

    The prior adds logits linspace(0, -strength, L) (level 0 is the coarsest). With
    ``learned=False`` the gate is the constant uniform mixture 1/L (the "no gate" ablation).
    """

    prior: Tensor  # (L,) buffer

    def __init__(self, hidden: int, n_levels: int, strength: float, learned: bool = True) -> None:
        super().__init__()
        self.n_levels = n_levels
        self.learned = learned
        if learned:  # no unused parameters without it (DistributedDataParallel objects)
            self.mlp = nn.Sequential(
                Linear(hidden, hidden), nn.GELU(), Linear(hidden, n_levels)
            )
        self.register_buffer("prior", torch.linspace(0.0, -strength, n_levels))  # (L,)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> gate weights (..., L), summing to one."""
        if not self.learned:
            return x.new_full((*x.shape[:-1], self.n_levels), 1.0 / self.n_levels)
        return softmax(self.mlp(x) + self.prior)


class H2Rec(nn.Module):
    """Dual-branch H2Rec; states and item vectors are E = cfg.hidden wide with fused scores
    (the default), E = cfg.hidden per branch with paired ones.

    ``aux_losses`` returns the weighted alignment losses "align_item" and "align_seq" (each
    only when switched on in the config).
    """

    log_pop: Tensor  # (N+1,) buffer, with hid_pop_gate only

    def __init__(
        self,
        cfg: ModelConfig,
        n_items: int,
        codes: np.ndarray,
        codebooks: np.ndarray | None = None,
        item_embeddings: np.ndarray | None = None,
        positives: CooccurrencePositives | None = None,
        popularity: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        d = cfg.hidden
        self.cfg = cfg
        self.n_items = n_items
        self.use_sid_branch = cfg.branches in ("both", "sid")
        self.use_hid_branch = cfg.branches in ("both", "hid")
        # fused scores: [s_sid ; s_hid] . [f ; f] = (s_sid + s_hid) . f, so the user vector is the
        # sum of the branch states and the item vector f = HID + SID, D wide (half the scoring)
        self.fused_score = cfg.item_score == "fused"
        n_branches = int(self.use_sid_branch) + int(self.use_hid_branch)
        self.out_dim = d if self.fused_score else d * n_branches
        self.text_match: TextMatch | None = None
        if cfg.text_match:  # extra columns [.. ; w q] . [.. ; e] (h2rec.models.text_match)
            self.text_match = TextMatch(
                self.out_dim, item_embeddings, n_items, cfg.text_match_decay, cfg.text_match_init
            )
        self.base_dim = self.out_dim  # the width of the branches' part of states
        if self.text_match is not None:
            self.out_dim += self.text_match.dim
        self.hid = HidEmbedding(n_items, d, cfg.init_std, cfg.hid_init, item_embeddings)
        self.sid = SidEmbedding.from_config(cfg, codes, codebooks)
        n_levels = self.sid.n_levels
        self.n_levels = n_levels
        self.input = SequenceInput(d, cfg.max_len, cfg.dropout, cfg.init_std)
        if cfg.cross_attention and self.use_sid_branch:
            self.level_attn = LevelCrossAttention(n_levels, d, cfg.n_heads, cfg.dropout)
        if cfg.cross_attention and self.use_hid_branch:
            self.hid_attn = CrossAttention(d, cfg.n_heads, cfg.dropout)
        # the gate mixes the SID branch's levels: without that branch it is the uniform mean (which
        # the sequence-level loss then reads to pick the levels it masks)
        self.gate = LevelGate(d, n_levels, cfg.gate_prior, learned=cfg.gate and self.use_sid_branch)
        self.backbone = Backbone(d, cfg.n_layers, cfg.n_heads, cfg.dropout, cfg.ffn_mult)
        if cfg.branch_dropout > 0:
            self.branch_drop = Dropout(cfg.branch_dropout)  # per sequence, on the SID state
        if not cfg.shared_backbone and self.use_hid_branch:
            self.backbone_hid = Backbone(d, cfg.n_layers, cfg.n_heads, cfg.dropout, cfg.ffn_mult)
        if cfg.align_seq and n_levels >= 2:
            self.mask_vectors = nn.Parameter(torch.randn(n_levels, d) * cfg.init_std)  # (L, D)
        if positives is None:
            positives = CooccurrencePositives.same_tuple_only(codes)
        elif positives.groups is None:
            positives = positives.with_codes(codes)
        if positives.n_items != n_items:
            raise DataError(
                f"cooccur: built for n_items={positives.n_items}, model has {n_items}"
            )
        self._positives = positives
        if cfg.hid_pop_gate:
            if popularity is None or np.asarray(popularity).shape != (n_items + 1,):
                raise DataError(
                    "model.hid_pop_gate needs the training popularity of every item, shape "
                    f"({n_items + 1},), got "
                    f"{None if popularity is None else np.asarray(popularity).shape}"
                )
            log_pop = np.log1p(np.asarray(popularity, dtype=np.float64))
            self.register_buffer("log_pop", torch.from_numpy(log_pop).float())  # (N+1,)
            self.pop_scale = nn.Parameter(torch.tensor(1.0))
            self.pop_shift = nn.Parameter(torch.tensor(0.0))
        # what the last training forward computed, for the sequence-level loss to reuse
        self._cache: dict[str, Tensor] | None = None
        # model.branch_loss: (the input, its branch states); see take_branch_states
        self._branch_pair: tuple[Tensor, Tensor] | None = None
        self._uses_seq_loss = cfg.align_seq and cfg.align_seq_weight > 0 and n_levels >= 2
        self.register_load_state_dict_pre_hook(_stack_level_attention)

    # ----------------------------------------------------------------------------- streams
    def _branches(
        self, seq: Tensor, last_only: bool = False
    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
        """seq (B, T) -> SID-branch states (B, T, D), HID-branch states (B, T, D),
        gate (B, T, L) and the HID stream (B, T, D). With ``last_only`` the branch states are
        the last position's, (B, D) each, and the backbones' last block computes only that.
        A branch switched off by ``model.branches`` gives None."""
        real = seq > 0  # (B, T)
        allowed = attention_mask(real, self.cfg.causal)  # (B, 1, T, T)
        hid = self.input(self.hid(seq), real)  # (B, T, D)
        levels = self.sid.levels(seq)  # (B, T, L, D)
        level_streams = self.input(levels, real)  # (B, T, L, D)
        fused = self.input(self.sid.pool(levels), real)  # (B, T, D)
        gate = self.gate(hid)  # (B, T, L)
        cross = self.cfg.cross_attention
        sid_state = hid_state = both = None
        if self.use_sid_branch:
            outs = self.level_attn(level_streams, hid, real, allowed) if cross else level_streams
            sid_in = (gate[..., None] * outs).sum(dim=2)  # (B, T, D); one call for all levels
        if self.use_hid_branch:
            hid_in = self.hid_attn(hid, fused, real, allowed) if cross else hid  # (B, T, D)
        if self.cfg.shared_backbone and self.use_sid_branch and self.use_hid_branch:
            # one call over both branches: (2B, T, D)
            both = self._twice(self.backbone, sid_in, hid_in, real, allowed, last_only)
            b = seq.shape[0]
            sid_state, hid_state = both[:b], both[b:]  # not chunk(): exportable with dynamic B
        else:
            if self.use_sid_branch:
                sid_state = self.backbone(sid_in, real, allowed, last_only)  # (B, T, D)
            if self.use_hid_branch:
                backbone = self.backbone if self.cfg.shared_backbone else self.backbone_hid
                hid_state = backbone(hid_in, real, allowed, last_only)  # (B, T, D)
        self._branch_pair = None  # only ever the pair of the latest forward
        if self.training and not last_only and self.cfg.branch_loss > 0:
            # for the branch losses of this step (TrainStep takes them: take_branch_states)
            pair = both if both is not None else torch.cat([sid_state, hid_state])  # type: ignore[list-item]
            self._branch_pair = (seq, pair)
        if self.training and not last_only and self._uses_seq_loss:
            # for the sequence-level loss of this step, which consumes (and clears) it
            self._cache = {
                "seq": seq, "levels": levels, "fused": fused, "gate": gate, "allowed": allowed
            }
            if sid_state is not None:
                self._cache["sid_state"] = sid_state
            if hid_state is not None:
                self._cache["hid_state"] = hid_state
        return sid_state, hid_state, gate, hid

    def take_branch_states(self, seq: Tensor) -> Tensor | None:
        """The branch states of the latest forward when it was a training forward on ``seq``
        itself, [SID branch ; HID branch] along the batch (2B, T, D), for
        ``model.branch_loss`` (cleared once taken); None otherwise."""
        kept, self._branch_pair = self._branch_pair, None
        if kept is None or kept[0] is not seq:
            return None
        return kept[1]

    @staticmethod
    def _twice(
        backbone: Backbone,
        a: Tensor,
        b: Tensor,
        real: Tensor,
        allowed: Tensor,
        last_only: bool = False,
    ) -> Tensor:
        """The backbone over two streams (B, T, D) sharing a mask, as one batch (2B, T, D)."""
        return backbone(
            torch.cat([a, b]), torch.cat([real, real]), torch.cat([allowed, allowed]), last_only
        )

    def forward(self, seq: Tensor) -> Tensor:
        """seq (B, T) left-padded item ids -> user states: the sum of the two branches' states
        (B, T, D) with fused scores, else [SID branch ; HID branch] (B, T, 2D). While training
        with ``model.branch_dropout``, the SID branch's state is dropped for a share of the
        sequences (the alignment losses still read it whole)."""
        sid_state, hid_state, _, _ = self._branches(seq)
        if self.training and self.cfg.branch_dropout > 0 and sid_state is not None:
            keep = self.branch_drop(sid_state.new_ones(sid_state.shape[0], 1, 1))  # (B, 1, 1)
            sid_state = sid_state * keep
        return self._with_text(self._join(sid_state, hid_state), seq)

    def _with_text(self, states: Tensor, seq: Tensor) -> Tensor:
        """The text-match columns appended to states (B, T, E) or (B, E), when switched on."""
        return states if self.text_match is None else self.text_match.user_columns(states, seq)

    def _join(self, sid_state: Tensor | None, hid_state: Tensor | None) -> Tensor:
        """The user vector from the branches that ran: their sum (fused scores) or
        [SID branch ; HID branch] along the last axis."""
        parts = [x for x in (sid_state, hid_state) if x is not None]
        if len(parts) == 1:
            return parts[0]
        return parts[0] + parts[1] if self.fused_score else torch.cat(parts, dim=-1)

    def user_states(self, seq: Tensor) -> Tensor:
        """seq (B, T) -> each user's state (B, E): ``forward(seq)[:, -1]``, with the backbones'
        last block computing the last position only (what evaluation and serving read)."""
        sid_state, hid_state, _, _ = self._branches(seq, last_only=True)
        return self._with_text(self._join(sid_state, hid_state), seq)

    def level_gate(self, seq: Tensor) -> Tensor:
        """Gate weights over SID levels at every position (B, T, L); position T-1 is the user's."""
        real = seq > 0
        return self.gate(self.input(self.hid(seq), real))

    # ----------------------------------------------------------------------------- scoring
    def hid_weight(self, items: Tensor) -> Tensor:
        """items (...) -> weight of each item's HID vector in the score (...): 1, or with
        ``hid_pop_gate`` sigmoid(scale * log(1 + popularity) + shift), learned."""
        if not self.cfg.hid_pop_gate:
            return torch.ones(items.shape, device=items.device)
        return torch.sigmoid(self.pop_scale * self.log_pop[items] + self.pop_shift)

    def item_vectors(self, items: Tensor) -> Tensor:
        """items (...) -> :meth:`base_item_vectors` with the text-match columns, when on."""
        v = self.base_item_vectors(items)
        return v if self.text_match is None else self.text_match.item_columns(v, items)

    def base_item_vectors(self, items: Tensor) -> Tensor:
        """items (...) -> HID + SID (..., D) (``item_score="fused"``: scored by the sum of the
        branch states, which equals [s_sid ; s_hid] . [HID + SID ; HID + SID]) or
        [HID embedding ; fused SID embedding] (..., 2D) (``"paired"``); zero for item 0.

        With ``hid_pop_gate`` the HID vector is scaled by :meth:`hid_weight` first. With one
        branch (``model.branches``) and paired scores, only the half that branch scores
        against, (..., D)."""
        parts = []
        if self.fused_score or self.use_sid_branch:  # the SID branch scores HID vectors
            hid = self.hid(items)
            if self.cfg.hid_pop_gate:
                hid = hid * self.hid_weight(items)[..., None]
            parts.append(hid)
        if self.fused_score or self.use_hid_branch:  # the HID branch scores SID vectors
            parts.append(self.sid(items))
        if self.fused_score:  # one D-wide vector: the user vector sums the branches
            return parts[0] + parts[1]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def all_item_vectors(self) -> Tensor:
        """(n_items + 1, E); row 0 (padding) is zero."""
        items = torch.arange(self.n_items + 1, device=self.hid.weight.device)
        v = self.base_item_vectors(items)
        return v if self.text_match is None else self.text_match.all_item_columns(v)

    # ----------------------------------------------------------------------------- alignment
    def positives(self, device: torch.device) -> CooccurrencePositives:
        """The positive-pair store on ``device`` (moved once and cached)."""
        if self._positives.device != device:
            self._positives = self._positives.to(device)
        return self._positives

    def batch_items(self, pos_items: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Distinct non-padding items of ``pos_items`` (B, T), at most cfg.align_item_max_items.

        Without a generator the most recent targets win (last position first); with one, a
        random subset drawn from it (a CPU generator) is kept.
        """
        flat = pos_items.flip(1).T.reshape(-1)  # (T*B,) last position first
        flat = flat[flat > 0]
        uniq, inverse = torch.unique(flat, return_inverse=True)  # (U,)
        first = torch.full_like(uniq, flat.shape[0]).scatter_reduce(
            0, inverse, torch.arange(flat.shape[0], device=flat.device), reduce="amin"
        )  # (U,) first occurrence of each item
        items = uniq[torch.argsort(first)]  # (U,) in order of first appearance
        cap = self.cfg.align_item_max_items
        if items.shape[0] > cap:
            if generator is None:
                items = items[:cap]
            else:
                keep = torch.randperm(items.shape[0], generator=generator)[:cap]
                items = items[keep.to(items.device)]
        return items

    def aux_losses(
        self,
        seq: Tensor,
        states: Tensor,
        pos_items: Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Weighted alignment losses.

        Args:
            seq: (B, T) the inputs given to ``forward``.
            states: (B, T, E) ``forward(seq)``.
            pos_items: (B, T) targets (0 = none); their distinct items enter the item loss.
            generator: optional CPU generator to subsample items beyond align_item_max_items.

        Returns:
            {"align_item": weight * item-level loss, "align_seq": weight * sequence-level
            loss}, each present only when switched on (and, for "align_seq", L >= 2).
        """
        cfg = self.cfg
        states = states[..., : self.base_dim]  # the text-match columns left out
        out: dict[str, Tensor] = {}
        if cfg.align_item and cfg.align_item_weight > 0:
            items = self.batch_items(pos_items, generator)  # (M,)
            rows, cols, vals = self.positives(items.device).batch_pairs(
                items, cfg.align_item_cooccur, cfg.align_item_same_tuple
            )  # the (M, M) positive weights, sparse
            sid, hid = self.sid(items), self.hid(items)  # (M, D) each
            loss = item_alignment_loss_pairs(sid, hid, rows, cols, vals, cfg.align_item_tau)
            out["align_item"] = cfg.align_item_weight * loss
        if cfg.align_seq and cfg.align_seq_weight > 0 and self.n_levels >= 2:
            out["align_seq"] = cfg.align_seq_weight * self._sequence_alignment(seq, states)
        return out

    def _sequence_alignment(self, seq: Tensor, states: Tensor) -> Tensor:
        """Masked-granularity contrastive loss at each user's last position (unweighted).

        Reuses what the forward pass on ``seq`` computed (code embeddings, the fused SID stream,
        the gate); the two views go through the backbone in one batch, and only the last
        position's state is computed in the final block."""
        cfg = self.cfg
        d = cfg.hidden
        real = seq > 0  # (B, T)
        cache = self._cache if self._cache is not None and self._cache["seq"] is seq else None
        if cache is None:  # called without a training forward on seq
            allowed = attention_mask(real, cfg.causal)
            levels = self.sid.levels(seq)  # (B, T, L, D)
            user_gate = self.gate(self.input(self.hid(seq[:, -1:]), real[:, -1:]))[:, 0]
            full_in = self.input(self.sid.pool(levels), real)  # (B, T, D)
        else:
            allowed, levels, full_in = cache["allowed"], cache["levels"], cache["fused"]
            user_gate = cache["gate"][:, -1]  # (B, L): the gate at the user's last position
            self._cache = None
        masked = mask_lowest_levels(levels, user_gate.detach(), self.mask_vectors, real)
        masked_in = self.input(self.sid.pool(masked), real)  # (B, T, D)
        if cfg.align_seq_target == "sid":
            both = self.backbone(
                torch.cat([masked_in, full_in]),
                torch.cat([real, real]),
                torch.cat([allowed, allowed]),
                last_only=True,
            )  # (2B, D)
            masked_user, target = both.chunk(2, dim=0)  # (B, D) each
        else:
            masked_user = self.backbone(masked_in, real, allowed, last_only=True)  # (B, D)
            first = cfg.align_seq_target == "branch" or not self.use_sid_branch
            if not self.fused_score:  # states are [SID branch ; HID branch], of those that ran
                target = states[:, -1, :d] if first else states[:, -1, d:]  # (B, D)
            else:  # states are the branches' sum: read each branch's own state
                key = "sid_state" if first and self.use_sid_branch else "hid_state"
                if cache is not None:
                    target = cache[key][:, -1]
                else:
                    sid_s, hid_s, _, _ = self._branches(seq, last_only=True)
                    self._cache = None
                    target = sid_s if key == "sid_state" else hid_s  # type: ignore[assignment]
        rows = real[:, -1]  # users with a real last position
        return symmetric_info_nce(masked_user[rows], target[rows], cfg.align_seq_tau)


def _stack_level_attention(
    module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: object
) -> None:
    """Load hook: checkpoints written before the per-level cross-attentions were batched hold
    ``level_attn.<l>.<param>`` entries; fold them into the stacked ``LevelCrossAttention``."""
    head = prefix + "level_attn."
    old = [k for k in state_dict if k.startswith(head) and k[len(head) :].split(".")[0].isdigit()]
    if not old or not isinstance(module, H2Rec) or not module.cfg.cross_attention:
        return
    per_level: dict[int, dict[str, Tensor]] = {}
    for key in old:
        lvl, rest = key[len(head) :].split(".", 1)
        per_level.setdefault(int(lvl), {})[rest] = state_dict.pop(key)
    target = LevelCrossAttention(
        module.n_levels, module.cfg.hidden, module.cfg.n_heads, module.cfg.dropout
    )
    target.load_per_level([per_level[lvl] for lvl in sorted(per_level)])
    for name, value in target.state_dict().items():
        state_dict[head + name] = value
