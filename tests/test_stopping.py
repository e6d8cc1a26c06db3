from app.engine.stopping import StopState


def decode(ids):
    return "".join(chr(i) for i in ids)


def run(state, text):
    out = []
    for ch in text:
        if state.finished:
            break
        out.append(state.append(ord(ch)))
    return "".join(out)


def test_stop_string_cut_and_never_streamed():
    st = StopState(decode=decode, stop=("END",), max_new_tokens=100)
    streamed = run(st, "hello ENDmore")
    assert st.finish_reason == "stop"
    assert st.text == "hello " and streamed == "hello "


def test_partial_stop_prefix_is_held_back_then_released():
    st = StopState(decode=decode, stop=("END",), max_new_tokens=100)
    deltas = [st.append(ord(c)) for c in "ab EN"]
    assert "".join(deltas) == "ab "  # "EN" might become END
    deltas.append(st.append(ord("d")))
    assert "".join(deltas) == "ab ENd"


def test_eos_and_length():
    st = StopState(decode=decode, eos_ids=frozenset({0}), max_new_tokens=100)
    run(st, "hi")
    st.append(0)
    assert st.finish_reason == "eos" and st.text == "hi" and st.token_ids == [ord("h"), ord("i")]
    st2 = StopState(decode=decode, max_new_tokens=3)
    assert run(st2, "abcdef") == "abc" and st2.finish_reason == "length"


def test_context_window_ends_generation():
    st = StopState(decode=decode, max_new_tokens=100, max_total_tokens=5, prompt_tokens=3)
    run(st, "abcdef")
    assert st.text == "ab" and st.finish_reason == "length"


def test_incomplete_utf8_tail_held_back():
    pieces = {1: "caf", 2: "\ufffd", 3: "é"}

    def dec(ids):
        # token 2 alone is half a character; with 3 after it the pair decodes to "é"
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdé", "é")

    st = StopState(decode=dec, max_new_tokens=10)
    assert st.append(1) == "caf"
    assert st.append(2) == ""
    assert st.append(3) == "é"
