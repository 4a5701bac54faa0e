"""Configuration of the recommendation models (one frozen dataclass, validated on construction)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from h2rec.errors import ConfigError

MODEL_KINDS = ("sasrec", "sid", "fusion", "h2rec")
SID_POOLINGS = ("mean", "sum")
SID_INITS = ("centroids", "random")
HID_INITS = ("random", "pca")
ALIGN_SEQ_TARGETS = ("sid", "branch", "hid")
BRANCHES = ("both", "sid", "hid")
ITEM_SCORES = ("paired", "fused")
TEXT_KINDS = ("sid", "fusion", "h2rec")  # the models that read item text (the text blend)


@dataclass(frozen=True)
class ModelConfig:
    """Every architectural choice of SASRec, SID-only and H2Rec, and the alignment-loss switches.

    Each ablation of the paper is one field: ``align_item=False`` (no item-level alignment),
    ``align_item_cooccur=False`` / ``align_item_same_tuple=False`` (fewer positives),
    ``align_seq=False`` (no sequence-level alignment), ``gate=False`` (uniform level mixing),
    ``cross_attention=False`` (branches without cross-attention), ``shared_backbone=False``.
    """

    # "sasrec" (hash IDs only), "sid" (semantic IDs only), "fusion" (HID + SID vectors summed into
    # one backbone: the naive baseline) or "h2rec" (both, dual branch)
    kind: str = "h2rec"
    hidden: int = 64  # width D of item embeddings, streams and transformer blocks
    n_layers: int = 2  # transformer blocks in the backbone
    n_heads: int = 1  # attention heads in every (self- and cross-) attention; divides hidden
    dropout: float = 0.5  # dropout on inputs, attention weights, residual branches and the FFN
    max_len: int = 50  # longest input sequence; size of the learned position table
    causal: bool = True  # causal attention; False lets t see later items (the paper's code)
    ffn_mult: int = 1  # inner width of the point-wise feed-forward net, in multiples of hidden
    init_std: float = 0.02  # std of the normal init of item/position tables (and of PCA init)
    hid_init: str = "random"  # HID table init: "random" (normal) or "pca" of the text embeddings
    sid_pooling: str = "mean"  # SID item embedding from its L code embeddings: "mean" or "sum"
    sid_init: str = "centroids"  # code tables from the k-means centroids or "random" (normal)
    codebooks_trainable: bool = True  # False freezes the code tables (the projection still learns)
    shared_backbone: bool = True  # H2Rec: one backbone for both branches; False gives each its own
    cross_attention: bool = True  # H2Rec: branch inputs via cross-attention (False: plain streams)
    # H2Rec: "both" branches, or the "sid" / "hid" branch alone (the paper's "without the HID /
    # SID branch" ablations): the state is that branch's, scored against HID + SID (fused
    # scores) or against the table it is paired with (paired: the SID branch against HID
    # vectors, the HID branch against SID vectors)
    branches: str = "both"
    gate: bool = True  # H2Rec: per-user softmax gate over SID levels (False: uniform mixing)
    gate_prior: float = 0.8  # coarse-to-fine prior: gate logit bias drops this much, level 0 -> L-1
    align_item: bool = True  # H2Rec: item-level code-guided multi-positive InfoNCE (SID vs HID)
    align_item_weight: float = 0.1  # weight of the item-level alignment loss
    align_item_tau: float = 0.5  # temperature of the item-level alignment loss
    align_item_cooccur: bool = True  # positives include PPMI-weighted co-occurring items
    align_item_same_tuple: bool = True  # positives include items sharing the full SID tuple
    align_item_window: int = 3  # co-occurrence window (positions) when mining those positives
    align_item_max_items: int = 1024  # most distinct batch items in one item-level loss (M x M)
    align_seq: bool = True  # H2Rec: sequence-level masked-granularity contrastive loss
    align_seq_weight: float = 0.1  # weight of the sequence-level alignment loss
    align_seq_tau: float = 1.0  # temperature of the sequence-level alignment loss
    # the masked SID view's state is pulled to: "branch" (default), the SID branch's own state
    # (the HID branch's when model.branches="hid"; no extra backbone pass); "sid", the unmasked
    # fused SID view through a second backbone pass (the paper's); "hid", the HID branch's
    # state. Beauty validation NDCG@10, one seed: 0.0706 against 0.0695 (paired scores), 0.0736
    # against 0.0734 (fused scores), 4% less time a step
    align_seq_target: str = "branch"
    # H2Rec: what each branch's state is scored against. "fused" (default): both against the
    # item's HID + SID vector (the fusion baseline's item vector), so a rare item's score leans on
    # its codes in both halves; "paired" (the paper's): the SID branch against HID vectors, the
    # HID branch against SID vectors. Beauty validation NDCG@10, one seed: 0.0734 against 0.0695,
    # tail items 0.0408 against 0.0341 (SASRec: 0.0697, tail 0.0365)
    item_score: str = "fused"
    # H2Rec: weight of each branch's own recommendation loss (deep supervision): the SID and the
    # HID branch's states are also scored alone against the item vectors, so that neither
    # branch only completes the other on the training data. 0 = off (the sum alone is trained)
    branch_loss: float = 0.0
    # H2Rec: while training, the SID branch's state is left out of the user vector for this
    # share of the sequences (drawn per sequence, the rest scaled by 1 / (1 - p)), so that the
    # HID branch learns to stand alone and the SID branch to add to it rather than complete it.
    # 0 = off. Needs both branches and fused scores
    branch_dropout: float = 0.0
    hid_pop_gate: bool = False  # H2Rec: scale items' HID vectors in the score by a learned
    # sigmoid of their log training popularity, so rare items lean on their SID vectors
    # train with w_t * <q_t, e_i> added to each score, q_t the decayed sum of the text embeddings
    # of the items up to t and e_i item i's, w_t learned (see h2rec.models.text_match); needs
    # item embeddings. Beauty validation, H2Rec: NDCG@10 0.0757 -> 0.0758, head 0.1128 -> 0.1162,
    # tail 0.0413 -> 0.0384: trained jointly, the ID part leans on the text for popular items
    text_match: bool = False
    text_match_decay: float = 0.5  # q_t weighs the item k steps back by exp(-decay * k)
    text_match_init: float = 1.0  # w_t at the start of training (it is learned)

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        _choice("kind", self.kind, MODEL_KINDS)
        _choice("hid_init", self.hid_init, HID_INITS)
        _choice("sid_pooling", self.sid_pooling, SID_POOLINGS)
        _choice("sid_init", self.sid_init, SID_INITS)
        _choice("align_seq_target", self.align_seq_target, ALIGN_SEQ_TARGETS)
        _choice("branches", self.branches, BRANCHES)
        _choice("item_score", self.item_score, ITEM_SCORES)
        if not math.isfinite(self.branch_loss) or self.branch_loss < 0:
            raise ConfigError(f"model.branch_loss={self.branch_loss}: must be a finite number >= 0")
        for name in ("branch_loss", "branch_dropout"):
            if getattr(self, name) > 0 and self.kind != "h2rec":
                raise ConfigError(
                    f"model.{name}={getattr(self, name)} acts on H2Rec's two branches; "
                    f"model.kind={self.kind!r} has one stream (set it to 0)"
                )
        if not 0.0 <= self.branch_dropout < 1.0:
            raise ConfigError(f"model.branch_dropout={self.branch_dropout}: must be in [0, 1)")
        if self.branch_dropout > 0 and (self.branches != "both" or self.item_score != "fused"):
            raise ConfigError(
                f"model.branch_dropout={self.branch_dropout} leaves the SID branch's state out of "
                "the sum of the branches: it needs model.branches='both' and "
                f"model.item_score='fused' (got {self.branches!r}, {self.item_score!r})"
            )
        if self.branch_loss > 0 and (
            self.branches != "both" or self.item_score != "fused" or self.text_match
        ):
            raise ConfigError(
                f"model.branch_loss={self.branch_loss} scores each branch's state alone against "
                "the fused item vectors: it needs model.branches='both', "
                "model.item_score='fused' and model.text_match=false (got "
                f"{self.branches!r}, {self.item_score!r}, {self.text_match})"
            )
        needs = {"hid": "hid"}.get(self.align_seq_target)  # "branch": the model's own state
        if self.align_seq and needs and self.branches not in ("both", needs):
            raise ConfigError(
                f"model.align_seq_target={self.align_seq_target!r} reads the {needs.upper()} "
                f"branch's state, which model.branches={self.branches!r} leaves out; use 'sid' "
                "or model.align_seq=false"
            )
        positive = ("hidden", "n_layers", "n_heads", "max_len", "ffn_mult", "align_item_max_items",
                    "align_item_window")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}: must be >= 1")
        if self.hidden % self.n_heads != 0:
            raise ConfigError(
                f"model.n_heads={self.n_heads}: must divide model.hidden={self.hidden}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout!r}: must be in [0, 1)")
        for name in ("init_std", "align_item_tau", "align_seq_tau", "text_match_init"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0.0):
                raise ConfigError(f"model.{name}={value!r}: must be a finite number > 0")
        for name in ("gate_prior", "align_item_weight", "align_seq_weight", "text_match_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ConfigError(f"model.{name}={value!r}: must be a finite number >= 0")

    @property
    def uses_sids(self) -> bool:
        """Whether the model needs semantic IDs (SID-only, fusion and H2Rec)."""
        return self.kind in ("sid", "fusion", "h2rec")


_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
}


def _check_type(name: str, value: object, annotation: object) -> None:
    """Raise ConfigError unless ``value`` has the field's declared type (bool is not an int)."""
    allowed = _TYPES[str(annotation)]
    ok = isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
    if not ok:
        raise ConfigError(
            f"model.{name}={value!r}: expected {annotation}, got {type(value).__name__}"
        )


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"model.{name}={value!r}: must be one of {', '.join(choices)}")
