import hashlib
import json

import pytest

from app.data.hellaswag import is_held_out, load_examples, preprocess, split_examples, to_example


def test_lm_eval_preprocessing():
    raw = {
        "activity_label": "Making a cake",
        "ctx_a": "[header] How to bake [title] Preheat the oven.",
        "ctx_b": "then",
        "endings": ["[step] Mix  the flour.", "Eat it."],
        "label": "1",
        "source_id": "wikihow~123",
        "split_type": "zeroshot",
    }
    ex = to_example(raw, 0)
    # lm-eval's rules, including their quirks: the tag leaves a leading space behind.
    assert ex.context == "Making a cake: How to bake. Preheat the oven. Then"
    assert ex.endings == ("  Mix the flour.", " Eat it.")
    assert ex.label == 1 and ex.source == "wikihow" and ex.split_type == "zeroshot"
    assert preprocess(" a [x] b  c ") == "a b c"


def test_split_rule_matches_spec():
    ids = [f"activitynet~v_{i}" for i in range(200)]
    for sid in ids:
        assert is_held_out(sid) == (int(hashlib.sha256(sid.encode("utf-8")).hexdigest(), 16) % 5 == 0)


def test_jsonl_loading(tmp_path):
    rows = [{"activity_label": "A", "ctx_a": "x", "ctx_b": "y", "endings": ["1", "2", "3", "4"], "label": 2,
             "source_id": f"s{i}", "split_type": "indomain"} for i in range(10)]
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    examples = load_examples(path)
    assert len(examples) == 10 and examples[0].label == 2
    held, train = split_examples(examples, "held_out"), split_examples(examples, "train")
    assert len(held) + len(train) == 10


@pytest.mark.real_model
def test_embedded_split_is_deterministic_grouped_and_documented(real_assets):
    examples = load_examples(real_assets.data_dir)
    assert len(examples) == 10_042
    held, train = split_examples(examples, "held_out"), split_examples(examples, "train")
    assert (len(held), len(train)) == (2_043, 7_999)  # the counts the README documents
    assert len({e.source_id for e in held}) == 1_712
    assert not ({e.source_id for e in held} & {e.source_id for e in train})  # grouped
    again = split_examples(load_examples(real_assets.data_dir), "held_out")
    assert [e.row for e in again] == [e.row for e in held]
    assert all(e.label in range(4) and len(e.endings) == 4 for e in examples)
