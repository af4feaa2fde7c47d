"""Tokenizers: the byte-level one pinned by hand."""

import pytest
import torch

from tokenizer import get_tokenizer, tokenize


def test_byte_tokens_by_hand():
    t = tokenize(["ab", "é"], 6)
    assert t.dtype == torch.long and t.shape == (2, 6)
    assert t[0].tolist() == [257, 98, 99, 258, 0, 0]
    assert t[1].tolist() == [257, 0xC3 + 1, 0xA9 + 1, 258, 0, 0]  # UTF-8 bytes of é, shifted by one


def test_byte_round_trip_and_eot_is_argmax():
    texts = ["a red circle left of a blue square", "  two   spaces\tand a tab "]
    t = tokenize(texts, 64)
    for row, text in zip(t, texts):
        eot = row.argmax().item()
        assert row[eot] == 258 and row[0] == 257 and (row[eot + 1:] == 0).all()
        assert bytes(v - 1 for v in row[1:eot].tolist()).decode() == " ".join(text.split())


def test_byte_truncation_keeps_eot_last():
    t = tokenize("x" * 100, 16)[0]
    assert t[0] == 257 and t[-1] == 258 and (t[1:-1] == ord("x") + 1).all()
    assert tokenize("abc", 5)[0].tolist() == [257, 98, 99, 100, 258]  # exactly fits: nothing lost
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a", 1)


def test_get_tokenizer():
    tok = get_tokenizer("byte")
    assert tok.name == "byte" and tok.vocab_size == 259
    assert torch.equal(tok(["hi"], 8), tokenize(["hi"], 8))
    assert tokenize("hi", 8).max() < tok.vocab_size
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("gpt2")
