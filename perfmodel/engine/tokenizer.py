"""The byte-level BPE tokenizer stored in a GGUF file, built with the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path


class GGUFTokenizer:
    def __init__(self, path: str | Path):
        import gguf
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        r = gguf.GGUFReader(str(path))

        def strings(key):
            f = r.fields[key]
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

        tokens = strings("tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
        types = r.fields["tokenizer.ggml.token_type"]
        kinds = [int(types.parts[i][0]) for i in types.data]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        # SmolLM2's pre-tokenizer: single digits, then GPT-2 byte-level splitting
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
        special = [t for t, k in zip(tokens, kinds) if k == 3]  # control tokens: <|im_start|>, <|endoftext|> ...
        tok.add_special_tokens(special)
        self._tok = tok
        field = r.fields["tokenizer.ggml.eos_token_id"]
        self.eos_id = int(field.parts[field.data[0]][0])
        self.vocab_size = len(tokens)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
