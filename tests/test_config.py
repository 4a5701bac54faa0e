"""Run configuration: TOML loading, typed ``--set`` overrides, JSON round trip, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from h2rec.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    read_config_json,
    save_config,
)
from h2rec.errors import ConfigError


def test_defaults_follow_the_spec() -> None:
    cfg = RunConfig()
    assert cfg.train.optimizer == "adam" and cfg.train.lr == 1e-3 and cfg.train.batch_size == 128
    assert cfg.eval.ks == (5, 10, 20) and cfg.eval.n_negatives == 100
    assert cfg.eval.exclude_history is True and cfg.eval.tail_share == 0.8
    assert cfg.eval.buckets == (10, 30, 60, 100)
    assert cfg.run_dir == Path("runs") / "h2rec"


def test_toml_file_sets_every_kind_of_field(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text(
        'name = "beauty"\n'
        '[train]\nlr = 3e-4\nbatch_size = 256\nloss = "sampled_softmax"\namp = false\n'
        '[eval]\nks = [1, 10]\nprotocol = "sampled"\n'
        '[model]\nkind = "sasrec"\nhidden = 32\ndropout = 0\n'
    )
    cfg = load_config(f)
    assert cfg.name == "beauty"
    assert cfg.train.lr == 3e-4 and cfg.train.batch_size == 256 and cfg.train.amp is False
    assert cfg.train.loss == "sampled_softmax"
    assert cfg.eval.ks == (1, 10) and cfg.eval.protocol == "sampled"
    assert cfg.model.kind == "sasrec" and cfg.model.hidden == 32
    # an integer where a float is declared is widened, not rejected
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("train.lr=3e-4", ["train", "lr"], 3e-4),
        ("train.epochs=7", ["train", "epochs"], 7),
        ("train.amp=false", ["train", "amp"], False),
        ("train.loss=bce", ["train", "loss"], "bce"),
        ('data.path="/a b/c"', ["data", "path"], "/a b/c"),
        ("data.path=/tmp/x", ["data", "path"], "/tmp/x"),
        ("eval.ks=[1, 5]", ["eval", "ks"], [1, 5]),
        ("name=run-1", ["name"], "run-1"),
    ],
)
def test_parse_override(text: str, key: list[str], value: object) -> None:
    assert parse_override(text) == (key, value)


def test_overrides_apply_in_order_and_are_typed() -> None:
    cfg = apply_overrides(
        RunConfig(),
        ["train.lr=0.01", "train.lr=0.02", "model.kind=sid", "eval.ks=[5,10]", "train.seed=3"],
    )
    assert cfg.train.lr == 0.02 and cfg.model.kind == "sid" and cfg.eval.ks == (5, 10)
    assert cfg.train.seed == 3
    assert RunConfig().train.lr == 1e-3  # frozen defaults untouched


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("train.lrr=0.1", ["train.lrr", "0.1", "unknown"]),
        ("nosuch.key=1", ["nosuch", "unknown"]),
        ("train.lr=fast", ["train.lr", "fast", "number"]),
        ("train.epochs=2.5", ["train.epochs", "2.5", "integer"]),
        ("train.epochs=true", ["train.epochs", "True", "integer"]),
        ("train.amp=1", ["train.amp", "1", "true or false"]),
        ("train.optimizer=sgd", ["train.optimizer", "sgd", "adam"]),
        ("eval.ks=10", ["eval.ks", "10", "list"]),
        ("eval.ks=[5, 20]", ["eval.ks", "include 10"]),
        ("train.lr=-1", ["train.lr", "-1", "> 0"]),
        ("model.hidden=0", ["model.hidden", "0"]),
        ("model.kind=bert", ["model.kind", "bert"]),
        ("train=1", ["train", "section"]),
        ("train.lr", ["train.lr", "section.key=value"]),
        ("name=a/b", ["name", "a/b"]),
    ],
)
def test_bad_overrides_name_key_and_value(override: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), [override])
    for fragment in fragments:
        assert fragment in str(err.value)


def test_bad_toml_names_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[train]\nbatchsize = 64\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*train\.batchsize.*64"):
        load_config(f)
    f.write_text("[train]\nbatch_size = '64'\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*train\.batch_size='64'.*integer"):
        load_config(f)
    f.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_json_round_trip(tmp_path: Path) -> None:
    cfg = apply_overrides(RunConfig(), ["eval.ks=[10, 50]", "model.kind=sasrec", "name=x"])
    save_config(cfg, tmp_path / "config.json")
    assert read_config_json(tmp_path / "config.json") == cfg
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["eval"]["ks"] == [10, 50] and raw["model"]["kind"] == "sasrec"
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


def test_config_is_frozen() -> None:
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_the_papers_setting_ships_as_a_config_file() -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / "paper.toml"
    cfg = load_config(path)
    assert (cfg.train.loss, cfg.train.n_negatives, cfg.train.loss_scale) == ("bce", 1, "batch")
    assert (cfg.model.kind, cfg.model.max_len, cfg.train.batch_size) == ("h2rec", 200, 256)
    assert cfg.model.causal  # the leak of the paper's mask-free training is refused
    assert cfg.train.text_blend == "off"  # the paper scores with the model alone
    default = load_config()
    assert default.train.loss != cfg.train.loss  # the defaults use the loss that wins

