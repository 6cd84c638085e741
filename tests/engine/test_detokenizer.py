from pagedserve.engine.detokenizer import IncrementalDetokenizer, _held_back


def _stream(tokenizer, text: str, stop=(), include_stop=False):
    ids = tokenizer.encode(text)
    d = IncrementalDetokenizer(tokenizer, [], list(stop), include_stop)
    deltas, hit = [], None
    for i, t in enumerate(ids):
        hit = d.add_token(t)
        deltas.append(d.release(finished=hit is not None or i == len(ids) - 1))
        if hit:
            break
    return d, deltas, hit


def test_multibyte_characters_are_never_split(smollm2_tokenizer):
    text = "Café ☕ naïve 日本語 🎉🎉 done"
    d, deltas, _ = _stream(smollm2_tokenizer, text)
    assert "".join(deltas) == text == d.text
    assert not any("\ufffd" in x for x in deltas)


def test_stop_string_spanning_tokens_is_cut_and_never_released(smollm2_tokenizer):
    text = "Hello there. The END OF STORY marker follows and more text."
    d, deltas, hit = _stream(smollm2_tokenizer, text, stop=["END OF STORY"])
    assert hit == "END OF STORY"
    assert d.text == "Hello there. The "
    assert "".join(deltas) == "Hello there. The "
    assert not any("END" in x for x in deltas)


def test_include_stop_str_in_output(smollm2_tokenizer):
    d, _, hit = _stream(smollm2_tokenizer, "one two three four", stop=[" three"], include_stop=True)
    assert hit == " three" and d.text == "one two three"


def test_held_back_suffix():
    assert _held_back("abc EN", ["END"]) == 2
    assert _held_back("abc E", ["END", "Ex"]) == 1
    assert _held_back("abc", ["END"]) == 0
