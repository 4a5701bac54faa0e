"""The built-in dataset: a seeded, generated shop catalogue and its users. No third-party data.

``h2rec-train`` uses it when it is given no data. Everything below is written by this project:
the category words, the brand names, the generator.

Catalogue
    A three-level hierarchy: 8 departments x 4 categories x 4 product types (128 leaves). Each
    category has three brands of its own. An item is a leaf plus a brand and an adjective; its
    text is derived from exactly these, e.g. ``"Tidewell rugged trail shoes"`` with category
    ``"Outdoor > Hiking"`` and brand ``"Tidewell"``. Items are spread over the leaves evenly
    (a catalogue smaller than 128 items covers a random subset of the leaves).

Popularity
    Every item gets a Zipf weight ``1 / rank ** zipf`` (default exponent 1.1) for a random rank,
    so a few items are everywhere and most are rare: a long tail, as in real logs.

Users
    Each user likes a few departments (Dirichlet(0.3) weights) and has a sequence length of
    ``min_length + Geometric`` with the given mean (capped at ``max_length``). The first item is
    drawn by popularity within the liked departments. Each next item depends on the semantics
    of the recent items (one of the last three, chosen at random):
      - with ``p_same_category`` (0.55): an item of the same category, of the *next* product
        type in that category's fixed order with probability ``p_next_type`` (0.7), else of
        any type; e.g. tents -> sleeping bags -> camp stoves -> lanterns -> tents;
      - with ``p_same_department`` (0.2): an item of another category of the same department;
      - otherwise: a fresh draw by popularity within the liked departments.
    Inside a semantic candidate set items are drawn with weight ``popularity ** tail_power``
    (0.5), which flattens the head, so rare items appear mainly through these transitions and
    their text (category, type, brand) predicts what comes next. Users are brand-loyal, as
    shoppers are: each has one of the three brands of every category, and a semantic draw is
    restricted to that brand with probability ``p_brand`` (0.6), so a rare item's brand says who
    buys it. A user never repeats an item.

Output
    ``interactions.csv`` (``user_id,item_id,timestamp``, rows in global time order, unix
    seconds, gaps of about two days) and ``items.csv`` (``item_id,title,category,brand``), read
    by ``h2rec.data.prepare`` with ``BUILTIN_TEMPLATE``. User and item ids are strings such as
    ``u0042`` and ``i1337``, unrelated to the internal ids. The defaults give ~2,000 users,
    1,500 items and ~30,000 interactions; generation takes well under a second.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from h2rec.errors import DataError

logger = logging.getLogger(__name__)

BUILTIN_TEMPLATE = "{title}. Category: {category}. Brand: {brand}"

# department -> category -> product types (in the order users tend to move through them)
HIERARCHY: dict[str, dict[str, list[str]]] = {
    "Kitchen": {
        "Cookware": ["skillet", "saucepan", "stock pot", "lid set"],
        "Cutlery": ["chef knife", "cutting board", "knife sharpener", "knife block"],
        "Coffee": ["coffee grinder", "pour-over kettle", "paper filters", "travel mug"],
        "Baking": ["mixing bowls", "loaf pan", "cooling rack", "pastry brush"],
    },
    "Outdoor": {
        "Camping": ["tent", "sleeping bag", "camp stove", "lantern"],
        "Hiking": ["trail shoes", "daypack", "trekking poles", "water filter"],
        "Cycling": ["bike helmet", "bike lights", "saddle bag", "tire pump"],
        "Fishing": ["fishing rod", "spinning reel", "tackle box", "landing net"],
    },
    "Books": {
        "Mystery": ["detective novel", "crime thriller", "cozy mystery", "puzzle anthology"],
        "Science Fiction": ["space opera", "time travel novel", "robot stories", "alien saga"],
        "History": ["ancient history", "medieval chronicle", "war memoir", "biography"],
        "Cookbooks": ["baking book", "vegetarian cookbook", "grilling guide", "soup recipes"],
    },
    "Music": {
        "Guitar": ["acoustic guitar", "guitar strings", "capo", "guitar tuner"],
        "Keyboard": ["digital piano", "keyboard stand", "sustain pedal", "piano method book"],
        "Drums": ["drum pad", "drumsticks", "metronome", "practice kit"],
        "Recording": ["usb microphone", "audio interface", "studio headphones", "pop filter"],
    },
    "Garden": {
        "Planting": ["seed starter tray", "potting soil", "plant labels", "grow light"],
        "Tools": ["pruning shears", "garden trowel", "hand rake", "kneeling pad"],
        "Watering": ["garden hose", "hose nozzle", "watering can", "drip kit"],
        "Decor": ["planter box", "solar lights", "bird feeder", "wind chime"],
    },
    "Fitness": {
        "Yoga": ["yoga mat", "yoga blocks", "yoga strap", "meditation cushion"],
        "Strength": ["dumbbells", "kettlebell", "weight bench", "lifting gloves"],
        "Running": ["running shoes", "running belt", "sports watch", "compression socks"],
        "Recovery": ["foam roller", "massage ball", "resistance bands", "ice pack"],
    },
    "Pets": {
        "Dog": ["dog leash", "dog bed", "chew toy", "dog shampoo"],
        "Cat": ["scratching post", "cat litter", "cat toy wand", "cat tree"],
        "Aquarium": ["fish tank", "aquarium filter", "fish food", "water conditioner"],
        "Bird": ["bird cage", "bird seed", "perch set", "cuttlebone"],
    },
    "Office": {
        "Writing": ["fountain pen", "ink bottle", "notebook", "pen case"],
        "Desk": ["desk lamp", "monitor stand", "desk organizer", "cable tray"],
        "Paper": ["printer paper", "sticky notes", "index cards", "envelopes"],
        "Filing": ["file folders", "binder", "label maker", "storage box"],
    },
}

_BRAND_PARTS = (
    ["North", "Tide", "Ember", "Stone", "Fern", "Brook", "Cedar", "Lumen", "Harbor", "Quill",
     "Birch", "Copper", "Meadow", "Summit", "Willow", "Pebble"],
    ["wind", "well", "craft", "field", "line", "works", "forge", "mark", "leaf", "crest", "vale",
     "haven"],
)
_ADJECTIVES = [
    "compact", "classic", "deluxe", "lightweight", "rugged", "premium", "everyday", "eco",
    "professional", "travel", "large", "mini", "heavy-duty", "soft", "adjustable", "quiet",
]


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and behaviour of the generated dataset."""

    n_users: int = 2000  # users
    n_items: int = 1500  # catalogue size (spread over the 128 leaves)
    mean_length: float = 15.0  # mean interactions per user
    min_length: int = 5  # shortest user
    max_length: int = 80  # longest user
    zipf: float = 1.1  # popularity exponent
    tail_power: float = 0.5  # popularity ** tail_power inside semantic candidate sets
    p_same_category: float = 0.55  # next item from a recent item's category
    p_next_type: float = 0.7  # ... and of the next product type in that category
    p_same_department: float = 0.2  # next item from a recent item's department
    p_brand: float = 0.6  # a semantic draw keeps to the user's own brand of that category
    seed: int = 0  # everything is drawn from this seed


def _brands(rng: np.random.Generator, n: int) -> list[str]:
    names = [a + b for a in _BRAND_PARTS[0] for b in _BRAND_PARTS[1]]
    pick = rng.choice(len(names), size=n, replace=False)
    return [names[i] for i in pick]


@dataclass(frozen=True)
class _Catalogue:
    dept: np.ndarray  # (n,) department index
    cat: np.ndarray  # (n,) global category index
    ptype: np.ndarray  # (n,) global leaf index (category * 4 + type)
    weight: np.ndarray  # (n,) Zipf popularity weight
    titles: list[str]
    categories: list[str]
    brands: list[str]
    brand_idx: np.ndarray  # (n,) which of its category's three brands, 0..2


def _catalogue(config: SyntheticConfig, rng: np.random.Generator) -> _Catalogue:
    depts = list(HIERARCHY)
    leaves = [
        (d, c, t)
        for d, cats in enumerate(HIERARCHY.values())
        for c, types in enumerate(cats.values())
        for t in range(len(types))
    ]
    n = config.n_items
    leaf_of_item = np.arange(n) % len(leaves)
    rng.shuffle(leaf_of_item)
    n_cats = sum(len(c) for c in HIERARCHY.values())
    brand_names = _brands(rng, 3 * n_cats)
    dept = np.empty(n, dtype=np.int64)
    cat = np.empty(n, dtype=np.int64)
    ptype = np.empty(n, dtype=np.int64)
    titles: list[str] = []
    categories: list[str] = []
    brands: list[str] = []
    adjectives = rng.integers(0, len(_ADJECTIVES), size=n)
    brand_pick = rng.integers(0, 3, size=n)
    for i in range(n):
        d, c, t = leaves[leaf_of_item[i]]
        cat_names = list(HIERARCHY[depts[d]])
        g_cat = d * 4 + c
        dept[i], cat[i], ptype[i] = d, g_cat, g_cat * 4 + t
        brand = brand_names[g_cat * 3 + brand_pick[i]]
        product = HIERARCHY[depts[d]][cat_names[c]][t]
        titles.append(f"{brand} {_ADJECTIVES[adjectives[i]]} {product}")
        categories.append(f"{depts[d]} > {cat_names[c]}")
        brands.append(brand)
    ranks = rng.permutation(n) + 1
    weight = 1.0 / ranks.astype(np.float64) ** config.zipf
    return _Catalogue(dept, cat, ptype, weight, titles, categories, brands, brand_pick)


class _Sampler:
    """Weighted draws from item groups by cumulative sums and a uniform number."""

    def __init__(self, keys: np.ndarray, weight: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        self.items = order
        sorted_keys = keys[order]
        n_keys = int(keys.max()) + 1
        self.start = np.searchsorted(sorted_keys, np.arange(n_keys), side="left")
        self.stop = np.searchsorted(sorted_keys, np.arange(n_keys), side="right")
        self.cum = np.cumsum(weight[order])

    def draw(self, key: int, u: float) -> int:
        """An item of group ``key`` by weight, or -1 when the group is empty (small catalogues
        leave some leaves without items)."""
        if key >= self.start.size:
            return -1
        lo, hi = int(self.start[key]), int(self.stop[key])
        if hi <= lo:
            return -1
        base = self.cum[lo - 1] if lo > 0 else 0.0
        target = base + u * (self.cum[hi - 1] - base)
        pos = int(np.searchsorted(self.cum[lo:hi], target, side="right")) + lo
        return int(self.items[min(pos, hi - 1)])


def generate_frames(
    config: SyntheticConfig = SyntheticConfig(),
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The interaction log and the item table as polars frames (see the module docstring)."""
    if config.n_items < 10:
        raise DataError(f"synthetic n_items={config.n_items}: need at least 10")
    if config.n_users < 1 or config.min_length < 3 or config.max_length < config.min_length:
        raise DataError(
            f"synthetic n_users={config.n_users}, min_length={config.min_length}, "
            f"max_length={config.max_length}: need n_users >= 1 and 3 <= min_length <= max_length"
        )
    if not 0.0 <= config.p_brand <= 1.0:
        raise DataError(f"synthetic p_brand={config.p_brand} must be in [0, 1]")
    if config.mean_length <= config.min_length:
        raise DataError(f"synthetic mean_length={config.mean_length} must exceed min_length")
    rng = np.random.default_rng(config.seed)
    cat = _catalogue(config, rng)
    n_depts = len(HIERARCHY)
    flat = cat.weight**config.tail_power
    by_dept = _Sampler(cat.dept, cat.weight)
    by_cat = _Sampler(cat.cat, flat)
    by_type = _Sampler(cat.ptype, flat)
    # the same groups split by brand: key = group * 3 + brand
    by_cat_brand = _Sampler(cat.cat * 3 + cat.brand_idx, flat)
    by_type_brand = _Sampler(cat.ptype * 3 + cat.brand_idx, flat)
    global_cum = np.cumsum(cat.weight)

    extra = rng.geometric(1.0 / (config.mean_length - config.min_length + 1), size=config.n_users)
    lengths = np.minimum(config.min_length + extra - 1, config.max_length)
    prefs = rng.dirichlet(np.full(n_depts, 0.3), size=config.n_users)
    n_cats = n_depts * 4
    loyal = rng.integers(0, 3, size=(config.n_users, n_cats))  # each user's brand per category
    users: list[int] = []
    items: list[int] = []
    times: list[int] = []
    for u in range(config.n_users):
        seen: set[int] = set()
        seq: list[int] = []
        t = 1_600_000_000 + int(rng.integers(0, 180 * 86_400))
        uniforms = rng.random((int(lengths[u]) * 25, 6))  # enough draws for retries
        k = 0
        while len(seq) < lengths[u] and k < uniforms.shape[0]:
            r_mode, r_pick, r_item, r_type, r_gap, r_brand = uniforms[k]
            k += 1
            own = r_brand < config.p_brand  # keep to the user's brand in this draw
            if seq and r_mode < config.p_same_category:
                anchor = seq[-1 - int(r_pick * min(3, len(seq)))]
                item = -1
                c = int(cat.cat[anchor])
                if r_type < config.p_next_type:
                    leaf = int(cat.ptype[anchor])
                    nxt = (leaf // 4) * 4 + (leaf % 4 + 1) % 4
                    if own:
                        item = by_type_brand.draw(nxt * 3 + int(loyal[u, c]), r_item)
                    if item < 0:
                        item = by_type.draw(nxt, r_item)
                if item < 0 and own:
                    item = by_cat_brand.draw(c * 3 + int(loyal[u, c]), r_item)
                if item < 0:  # the anchor's category always has the anchor itself
                    item = by_cat.draw(c, r_item)
            elif seq and r_mode < config.p_same_category + config.p_same_department:
                anchor = seq[-1 - int(r_pick * min(3, len(seq)))]
                d = int(cat.dept[anchor])
                other = d * 4 + (int(cat.cat[anchor]) % 4 + 1 + int(r_type * 3)) % 4
                item = by_cat_brand.draw(other * 3 + int(loyal[u, other]), r_item) if own else -1
                if item < 0:
                    item = by_cat.draw(other, r_item)
                if item < 0:
                    item = by_dept.draw(d, r_item)
            else:
                d = int(np.searchsorted(np.cumsum(prefs[u]), r_pick * prefs[u].sum()))
                item = by_dept.draw(min(d, n_depts - 1), r_item)
                if item < 0:  # a department without items: any item by popularity
                    item = int(np.searchsorted(global_cum, r_item * global_cum[-1], side="right"))
                    item = min(item, config.n_items - 1)
            if item in seen:
                continue
            seen.add(item)
            seq.append(item)
            t += 600 + int(-np.log1p(-r_gap * 0.999) * 2 * 86_400)
            users.append(u)
            items.append(item)
            times.append(t)
    item_ids = [f"i{i:04d}" for i in rng.permutation(config.n_items)]
    user_ids = [f"u{u:04d}" for u in range(config.n_users)]
    log = pl.DataFrame(
        {
            "user_id": [user_ids[u] for u in users],
            "item_id": [item_ids[i] for i in items],
            "timestamp": times,
        },
        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64},
    ).sort("timestamp", maintain_order=True)
    table = pl.DataFrame(
        {"item_id": item_ids, "title": cat.titles, "category": cat.categories, "brand": cat.brands},
        schema=dict.fromkeys(("item_id", "title", "category", "brand"), pl.String),
    )
    return log, table


def generate(out_dir: str | Path, config: SyntheticConfig = SyntheticConfig()) -> tuple[Path, Path]:
    """Write ``interactions.csv`` and ``items.csv`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log, table = generate_frames(config)
    paths = (out_dir / "interactions.csv", out_dir / "items.csv")
    for frame, path in zip((log, table), paths, strict=True):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        frame.write_csv(tmp)
        os.replace(tmp, path)
    logger.info("synthetic: %d interactions, %d items in %s", log.height, table.height, out_dir)
    return paths


def builtin_dataset(
    root: str | Path, config: SyntheticConfig = SyntheticConfig(), overwrite: bool = False
) -> Path:
    """Generate (if needed) and prepare the built-in dataset under ``root``; return the dataset
    directory ``root/dataset``. An existing one made with the same config is reused."""
    from h2rec.data import ItemTableOptions, prepare

    root = Path(root)
    dataset = root / "dataset"
    stamp = root / "synthetic.json"
    wanted = asdict(config)
    if not overwrite and dataset.is_dir() and stamp.exists():
        try:
            if json.loads(stamp.read_text("utf8")) == wanted:
                return dataset
        except json.JSONDecodeError:
            pass
    inter, items = generate(root / "source", config)
    prepare(
        inter,
        dataset,
        items=items,
        item_table=ItemTableOptions(id_col="item_id", template=BUILTIN_TEMPLATE),
        name="builtin",
        overwrite=True,
    )
    tmp = stamp.with_name(f".{stamp.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(wanted, indent=2) + "\n", "utf8")
    os.replace(tmp, stamp)
    return dataset


__all__ = [
    "BUILTIN_TEMPLATE",
    "HIERARCHY",
    "SyntheticConfig",
    "builtin_dataset",
    "generate",
    "generate_frames",
]
