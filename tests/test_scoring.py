import math

import pytest

from app.model.scoring import (
    ScoreItem, argmax, encode_item, encode_pair, join_for_scoring, normalize, pack_items, reference_logprob,
    score_items, softmax, continuation_logprob_tensors, per_token_logprobs,
)


@pytest.mark.parametrize(
    "context, ending, expected",
    [
        ("He", "runs.", ("He", " runs.")),  # one space joins them
        ("He ", "runs.", ("He", " runs.")),  # context's trailing space moves to the ending (lm-eval)
        ("He", " runs.", ("He", " runs.")),  # ending already starts with whitespace
        ("He\n", "runs.", ("He", "\nruns.")),
        ("He  ", " runs.", ("He", "   runs.")),
    ],
)
def test_join_rule(context, ending, expected):
    assert join_for_scoring(context, ending) == expected


def test_encode_pair_takes_tail_of_joint_encoding(tiny_loaded):
    tok = tiny_loaded.tokenizer
    ctx, cont = encode_pair(tok, "The chef is", " preparing a meal.")
    whole = tok("The chef is preparing a meal.", add_special_tokens=False)["input_ids"]
    assert ctx == tok("The chef is", add_special_tokens=False)["input_ids"]
    assert cont == whole[len(ctx):]
    assert len(cont) > 0


def test_pack_layout_and_mask():
    items = [ScoreItem((5, 6, 7), ((8, 9), (10,))), ScoreItem((1,), ((2, 3, 4),))]
    packed = pack_items(items, pad_id=0)
    # item 0: ctx 3 + (2-1) + (1-1) = 4 tokens; item 1: 1 + 2 = 3 tokens
    assert packed.input_ids.tolist() == [[5, 6, 7, 8], [1, 2, 3, 0]]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3]
    assert packed.position_ids[1].tolist() == [0, 1, 2, 0]
    m = packed.attention_mask[0, 0]
    assert m[3, :4].tolist() == [True, True, True, True]  # ending token sees context + itself
    assert m[2, 3].item() is False  # context never sees endings
    # targets: item0 cont0 tokens 8 (from pos 2), 9 (from pos 3); cont1 token 10 (from pos 2)
    assert packed.owners[:3] == [(0, 0), (0, 0), (0, 1)]
    assert packed.target_positions[:3].tolist() == [2, 3, 2]
    assert packed.target_ids[:3].tolist() == [8, 9, 10]
    # padding row attends to itself only (no NaN rows)
    assert packed.attention_mask[1, 0, 3].tolist() == [False, False, False, True]


def test_packed_scores_equal_full_sequence_reference(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    requests = [
        ("The chef is preparing a meal. He", [" takes out a knife.", " runs.", " plays with the dog in the park", "!"]),
        ("Kids", [" are playing in the park while their parents watch.", " cut onions"]),
        ("How to make tea: boil the water", [", add the leaves and wait three minutes.", "."]),
    ]
    items = [encode_item(tok, c, e) for c, e in requests]
    batched = score_items(model, items, pad_id=tok.pad_token_id)
    alone = [score_items(model, [it], pad_id=tok.pad_token_id)[0] for it in items]
    worst = 0.0
    for item, got, solo in zip(items, batched, alone):
        for cont, lp, lp_solo in zip(item.continuations, got, solo):
            ref = reference_logprob(model, item.context_ids, cont)
            worst = max(worst, abs(ref - lp), abs(ref - lp_solo))
    assert worst < 1e-3, worst


def test_per_token_sum_matches_and_top_alternatives(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    item = encode_item(tok, "A man is sitting on a roof. He", [" starts pulling up roofing."])
    lps, tops = per_token_logprobs(model, [item], pad_id=tok.pad_token_id, top_k=3)
    total = continuation_logprob_tensors(model, [item], pad_id=tok.pad_token_id)[0][0].item()
    assert math.isclose(sum(lps[0][0]), total, abs_tol=1e-4)
    assert len(tops[0][0]) == len(lps[0][0])
    for lp, alts in zip(lps[0][0], tops[0][0]):
        assert len(alts) == 3
        assert alts[0][1] >= lp - 1e-5  # the best alternative is at least as likely as the target


def test_normalization_and_softmax():
    endings = [" ab", " abcd"]
    norms = normalize([-3.0, -4.0], endings)
    assert norms == [-1.0, -0.8]
    assert argmax(norms) == 1 and argmax([-3.0, -4.0]) == 0
    probs = softmax(norms)
    assert math.isclose(sum(probs), 1.0) and probs[1] > probs[0]
