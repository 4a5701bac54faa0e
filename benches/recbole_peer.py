"""RecBole's SASRec on Amazon Beauty with h2rec's settings: the peer of the training-speed benches.

Run it with the Python of a separate RecBole environment (not h2rec's), e.g.::

    python3 -m venv /work/recbole-venv
    /work/recbole-venv/bin/pip install "recbole==1.2.1" "numpy<2" "pandas<3"
    /work/recbole-venv/bin/python benches/recbole_peer.py --epochs 1

RecBole 1.2.1 needs NumPy 1.x (its config touches ``np.float_``, removed in NumPy 2) and pandas
2.x (pandas 3 needs NumPy 2). It runs on current torch: this script never reloads a checkpoint
from disk (torch >= 2.6 defaults ``torch.load`` to ``weights_only``, which RecBole's checkpoints
fail), it keeps the best validation state in memory instead.

The Beauty sequences (``../shared/data/beauty/Beauty.txt``: ``user item1 item2 ...`` per line,
chronological) are written as RecBole atomic files into a temporary directory, never into the
repository (the data is research-licensed), with a synthetic increasing timestamp so that the order
is kept. The script works inside that directory (RecBole writes ``log_tensorboard/`` and
``saved/`` relative to the working directory) and removes it at the end.

Settings, as h2rec's SASRec defaults: hidden 64, 2 layers, 1 head, inner size 64 (ffn_mult=1),
dropout 0.5 (hidden and attention), max length 50, batch 128, Adam lr 1e-3, CE loss over all items,
leave-one-out split (valid = second-to-last item, test = last), full ranking, NDCG@10 / HR@10,
validation metric NDCG@10, no filtering (Beauty is already 5-core), seed 0, CPU.

Differences that stay RecBole's own: its sequential dataset trains on every prefix of every user's
training sequence as one sample (about 131k samples for Beauty, against h2rec's one sequence per
user with a loss at every position), its transformer is post-LayerNorm, and its full ranking of a
sequential model does not exclude the items of the user's history (h2rec's default does).

The last line printed on stdout is one JSON object: seconds of every training epoch, validation
NDCG@10 / HR@10 after each epoch with the wall time since the script started, and test NDCG@10 /
HR@10 of the best validation epoch. Progress goes to stderr.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # "the command's start": before the (slow) imports

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "beauty" / "Beauty.txt"
DATASET = "beauty"


def log(msg: str) -> None:
    print(f"[recbole_peer {time.perf_counter() - T0:8.1f}s] {msg}", file=sys.stderr, flush=True)


def write_atomic(src: Path, root: Path, max_users: int) -> tuple[int, int, int]:
    """Beauty.txt -> <root>/beauty/beauty.inter; returns (users, items, interactions)."""
    out_dir = root / DATASET
    out_dir.mkdir(parents=True)
    n_users, items, n_inter, ts = 0, set(), 0, 0
    with src.open() as f, (out_dir / f"{DATASET}.inter").open("w") as out:
        out.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if max_users and n_users >= max_users:
                break
            user, seq = parts[0], parts[1:]
            n_users += 1
            for item in seq:
                out.write(f"{user}\t{item}\t{ts}\n")  # one global counter: strictly increasing
                ts += 1
                items.add(item)
            n_inter += len(seq)
    return n_users, len(items), n_inter


def config_dict(root: Path, epochs: int, seed: int) -> dict:
    return {
        # data: atomic files in the temporary directory, no filtering, leave-one-out by time
        "data_path": str(root),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
        "filter_inter_by_user_or_item": False,
        "rm_dup_inter": None,
        "MAX_ITEM_LIST_LENGTH": 50,
        "eval_args": {
            "split": {"LS": "valid_and_test"},
            "order": "TO",
            "group_by": "user",
            "mode": "full",
        },
        # model: h2rec's SASRec defaults
        "hidden_size": 64,
        "n_layers": 2,
        "n_heads": 1,
        "inner_size": 64,
        "hidden_dropout_prob": 0.5,
        "attn_dropout_prob": 0.5,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "initializer_range": 0.02,
        "loss_type": "CE",
        "train_neg_sample_args": None,
        # training
        "epochs": epochs,
        "train_batch_size": 128,
        "learner": "adam",
        "learning_rate": 1e-3,
        "weight_decay": 0.0,
        "eval_step": 1,
        "stopping_step": 10,
        # evaluation
        "metrics": ["NDCG", "Hit"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        "eval_batch_size": 256,  # users per batch (sequential full ranking)
        "metric_decimal_place": 6,
        # environment
        "seed": seed,
        "reproducibility": True,
        "use_gpu": False,
        "device": "cpu",
        "worker": 0,
        "show_progress": False,
        "checkpoint_dir": str(root / "saved"),
        "log_wandb": False,
        "state": "WARNING",
    }


def run(args: argparse.Namespace, root: Path) -> dict:
    n_users, n_items, n_inter = write_atomic(args.data, root, args.max_users)
    log(f"atomic file: {n_users} users, {n_items} items, {n_inter} interactions")

    import numpy as np
    import recbole
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # pandas / torch.cuda.amp notices

    argv, sys.argv = sys.argv, sys.argv[:1]  # RecBole's Config parses --key=value from sys.argv
    try:
        config = Config(
            model="SASRec", dataset=DATASET, config_dict=config_dict(root, args.epochs, 0)
        )
    finally:
        sys.argv = argv
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = SASRec(config, train_data.dataset).to(config["device"])
    trainer = Trainer(config, model)
    setup_s = time.perf_counter() - T0
    log(
        f"setup done: {dataset.user_num - 1} users, {dataset.item_num - 1} items, "
        f"{len(train_data.dataset)} training samples, device {config['device']}, "
        f"{torch.get_num_threads()} threads"
    )

    epochs, best, best_state, best_epoch = [], -1.0, None, None
    for epoch in range(args.epochs):
        t = time.perf_counter()
        loss = trainer._train_epoch(train_data, epoch, show_progress=False)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        score, result = trainer._valid_epoch(valid_data, show_progress=False)
        valid_s = time.perf_counter() - t
        rec = {
            "epoch": epoch + 1,
            "train_seconds": train_s,
            "train_loss_sum": float(loss if not isinstance(loss, tuple) else sum(loss)),
            "valid_seconds": valid_s,
            "valid_ndcg@10": float(result["ndcg@10"]),
            "valid_hr@10": float(result["hit@10"]),
            "wall_seconds": time.perf_counter() - T0,
        }
        epochs.append(rec)
        log(json.dumps(rec))
        if score > best:
            best, best_epoch = score, epoch + 1
            best_state = copy.deepcopy(trainer.model.state_dict())

    out = {
        "tool": "recbole",
        "model": "SASRec",
        "versions": {
            "recbole": recbole.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "users": n_users,
        "items": n_items,
        "interactions": n_inter,
        "train_samples": len(train_data.dataset),
        "threads": torch.get_num_threads(),
        "setup_seconds": setup_s,
        "epochs": epochs,
        "epoch_seconds": [e["train_seconds"] for e in epochs],
        "seconds_per_epoch": (
            sum(e["train_seconds"] for e in epochs) / len(epochs) if epochs else None
        ),
        "best_epoch": best_epoch,
    }
    if best_state is not None:
        trainer.model.load_state_dict(best_state)
    t = time.perf_counter()
    test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    out["test_seconds"] = time.perf_counter() - t
    out["test_ndcg@10"] = float(test["ndcg@10"])
    out["test_hr@10"] = float(test["hit@10"])
    out["total_seconds"] = time.perf_counter() - T0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    p.add_argument("--max-users", type=int, default=0, help="first K users only (0: all)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Beauty.txt")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if not args.data.exists():
        print(f"{args.data} is not present", file=sys.stderr)
        return 2
    args.data = args.data.resolve()
    root = Path(tempfile.mkdtemp(prefix="h2rec-recbole-"))
    cwd = os.getcwd()
    try:
        os.chdir(root)  # RecBole writes log_tensorboard/ (and maybe log/, saved/) under the cwd
        out = run(args, root)
    finally:
        os.chdir(cwd)
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
