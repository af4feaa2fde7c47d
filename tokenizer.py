"""
Tokenizers for the CLIP text tower: a byte-level one (the default for the synthetic set, no files) and
OpenAI CLIP's BPE (49,408 ids, for real captions and open_clip interop), written with the standard
library only.

Both share open_clip's conventions: every sequence is [SOT, ids..., EOT, 0, 0, ...] of a fixed context
length; a caption that is too long is truncated and its last slot forced to EOT; EOT has the largest id of
the vocabulary, so the text tower can pool at tokens.argmax(-1).

Byte tokenizer: pad 0, byte b -> b + 1, SOT 257, EOT 258, vocabulary 259. Text is stripped and runs of
whitespace collapsed to one space; it is not lower-cased (every byte is kept).
"""

import torch

# -----------------------------------------------------------------------------
# byte-level


class ByteTokenizer:
    """UTF-8 bytes as tokens: pad 0, byte b -> b + 1, SOT 257, EOT 258 (largest id), vocab 259."""

    name = "byte"
    vocab_size = 259
    sot, eot = 257, 258

    def encode(self, text):
        return [b + 1 for b in " ".join(text.split()).encode("utf-8")]

    def __call__(self, texts, context_length):
        return _pack([self.encode(t) for t in _as_list(texts)], self.sot, self.eot, context_length)


def _as_list(texts):
    return [texts] if isinstance(texts, str) else list(texts)


def _pack(id_lists, sot, eot, context_length):
    """[SOT, ids, EOT] padded with 0 to context_length; truncated ones end with EOT."""
    if context_length < 2:
        raise ValueError(f"context_length={context_length} is too short: it needs room for SOT and EOT (>= 2)")
    out = torch.zeros(len(id_lists), context_length, dtype=torch.long)
    for i, ids in enumerate(id_lists):
        seq = [sot] + ids + [eot]
        if len(seq) > context_length:
            seq = seq[:context_length]
            seq[-1] = eot
        out[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


_BYTE = ByteTokenizer()


def tokenize(texts, context_length):
    """Byte-level tokens of a string or a list of strings: LongTensor [N, context_length]."""
    return _BYTE(texts, context_length)


# -----------------------------------------------------------------------------


def get_tokenizer(name, bpe_path=None):
    """The tokenizer called `name` ("byte" or "clip-bpe"); bpe_path locates bpe_simple_vocab_16e6.txt.gz."""
    if name == "byte":
        return _BYTE
    raise ValueError(f"unknown tokenizer {name!r}: use 'byte' or 'clip-bpe'")
