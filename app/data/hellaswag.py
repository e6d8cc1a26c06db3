"""HellaSwag loading, lm-evaluation-harness preprocessing and the project's grouped split.

Sources: the embedded validation split (a ``datasets`` save_to_disk folder whose arrow file is
an IPC *stream*), rowanz-format JSONL (``hellaswag_{train,val,test}.jsonl``), or a hub dataset
name where the hub is reachable.

Preprocessing is lm-eval's ``hellaswag`` task: query = ``activity_label: ctx_a Ctx_b``,
`` [title]`` -> ``. ``, bracketed tags removed, double spaces collapsed; each ending is prefixed
with one space (the task's target delimiter), so length normalization counts that space too.

The train split is not obtainable offline, so the validation rows are split deterministically,
grouped by ``source_id`` (no source on both sides): a row is held out when
``int(sha256(source_id), 16) % 5 == 0`` -> 2,043 held-out rows (1,712 sources), 7,999 training.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

HELD_OUT_MODULUS = 5


@dataclass(frozen=True)
class Example:
    row: int
    source_id: str
    context: str
    endings: tuple[str, ...]
    label: int
    split_type: str
    activity_label: str

    @property
    def source(self) -> str:
        """activitynet or wikihow (source ids look like ``activitynet~v_xyz``)."""
        return self.source_id.split("~", 1)[0] if "~" in self.source_id else "unknown"


def preprocess(text: str) -> str:
    text = text.strip()
    # Brackets are artifacts of the WikiHow scrape.
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    text = text.replace("  ", " ")
    return text


def to_example(raw: dict, row: int) -> Example:
    ctx = raw["ctx_a"] + " " + raw["ctx_b"].capitalize()
    label = raw.get("label")
    return Example(
        row=row,
        source_id=str(raw.get("source_id", raw.get("ind", row))),
        context=preprocess(raw["activity_label"] + ": " + ctx),
        endings=tuple(" " + preprocess(e) for e in raw["endings"]),
        label=int(label) if label not in (None, "") else -1,
        split_type=str(raw.get("split_type", "unknown")),
        activity_label=raw["activity_label"],
    )


def is_held_out(source_id: str) -> bool:
    return int(hashlib.sha256(source_id.encode("utf-8")).hexdigest(), 16) % HELD_OUT_MODULUS == 0


def read_arrow_folder(folder: Path) -> list[dict]:
    import pyarrow as pa

    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"no .arrow files in {folder}: run `hellaswag-fetch-assets` first")
    rows: list[dict] = []
    for path in files:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source).read_all()
        rows.extend(table.to_pylist())
    return rows


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets  # optional: only where the hub is reachable
    except ImportError as exc:
        raise RuntimeError("hub datasets need the `datasets` package and network access") from exc
    return list(datasets.load_dataset(name, split=split))


def load_rows(source: str | Path, split: str = "validation") -> list[dict]:
    path = Path(source)
    if path.is_dir():
        return read_arrow_folder(path)
    if path.is_file():
        return read_jsonl(path)
    return read_hub(str(source), split)


Part = Literal["train", "held_out", "all"]


def split_examples(examples: Iterable[Example], part: Part) -> list[Example]:
    if part == "all":
        return list(examples)
    want_held_out = part == "held_out"
    return [ex for ex in examples if is_held_out(ex.source_id) == want_held_out]


def default_dataset_dir(data_dir: Path) -> Path:
    from app.assets import HELLASWAG_DIRNAME

    return data_dir / HELLASWAG_DIRNAME


def load_examples(source: str | Path, part: Part = "all") -> list[Example]:
    rows = load_rows(source)
    return split_examples((to_example(r, i) for i, r in enumerate(rows)), part)


def fixed_sample(examples: list[Example], n: int | None, seed: int = 0) -> list[Example]:
    """The same ``n`` examples every time (row order), or all of them when ``n`` is unset or too
    big: the one definition of a fixed subset for training curves, --limit and the results page."""
    if not n or n >= len(examples):
        return list(examples)
    return sorted(random.Random(seed).sample(examples, n), key=lambda e: e.row)


def split_fingerprint(examples: list[Example]) -> str:
    """Identifies exactly which rows a model was trained or evaluated on."""
    ids = ",".join(str(ex.row) for ex in examples)
    return hashlib.sha256(ids.encode()).hexdigest()[:16]
