"""Engram's compressed ids: one canonical id per distinct normalised token text.

Cheng et al. (arXiv 2601.07372) hash n-grams of *compressed* ids, so that "The", "the" and " the"
variants of one word share their n-gram rows (the paper reports 23% fewer ids on DeepSeek-V3's
vocabulary). The map is built once from the tokenizer, stored in the model (EngramVocab.compress in
seekling/model/engram.py) and saved with its checkpoint, so the model never imports the tokenizer.

The key of a token, as DeepSeek's `engram_demo_v1.py`: its decoded text, normalised by NFKC, NFD,
strip accents, lowercase, runs of spaces / tabs / newlines collapsed to one space, then stripped;
a token that is whitespace only keeps the key " " (the demo's sentinel), and one that normalises to
nothing keeps its raw text. Tokens with equal keys share an id; ids are numbered in order of each
key's first token id, so the map is a pure function of the vocabulary (deterministic across runs,
processes and machines with the same `tokenizers` release).

Two choices of ours, both about tokens whose text is not a word:
- a byte-level token that is not valid UTF-8 on its own decodes to U+FFFD; the demo keys it by its
  token string, we key it by its raw bytes: either way every such token keeps its own id, where
  keying by the decoded text would merge all of them into one;
- special tokens (seekling's <|pad|>, <|user|>, ...) are keyed by their id, so a special never
  shares an id with ordinary text that happens to spell it.

Left out: any merging beyond the demo's normaliser (stemming, punctuation folding): the paper's
ablation is of this normaliser, and more aggressive folding would blur real distinctions.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, normalizers

_SENTINEL = "\ue000"  # private-use character: survives Strip, so a whitespace-only token keeps " "

# The demo's normaliser, from the same `tokenizers` library the demo uses, so the keys match it exactly.
_NORMALIZER = normalizers.Sequence([
    normalizers.NFKC(),
    normalizers.NFD(),
    normalizers.StripAccents(),
    normalizers.Lowercase(),
    normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
    normalizers.Replace(Regex(r"^ $"), _SENTINEL),
    normalizers.Strip(),
    normalizers.Replace(_SENTINEL, " "),
])


def normalize_token_text(text: str) -> str:
    """The demo's canonical form of a token's text ('' when nothing is left)."""
    return _NORMALIZER.normalize_str(text)


@dataclass(frozen=True)
class CompressedVocab:
    """compress[token id] = compressed id; n_compressed distinct ids, numbered by first appearance."""

    compress: tuple[int, ...]
    n_compressed: int
    keys: tuple  # the key of each compressed id, for inspection

    @property
    def vocab_size(self) -> int:
        return len(self.compress)

    @property
    def reduction(self) -> float:
        """Fraction of ids merged away (the paper's 23% on DeepSeek-V3's 128k vocabulary)."""
        return 1.0 - self.n_compressed / self.vocab_size

    def padded(self, vocab_size: int) -> tuple[int, ...]:
        """The map for a model whose id space is larger than the tokenizer's (vocab_size rounded up):
        the ids past the tokenizer's never come out of it, and each gets an id of its own."""
        if vocab_size < self.vocab_size:
            raise ValueError(f"the model's vocab_size ({vocab_size}) is smaller than the tokenizer's ({self.vocab_size})")
        extra = vocab_size - self.vocab_size
        return self.compress + tuple(range(self.n_compressed, self.n_compressed + extra))

    def summary(self) -> str:
        return (f"compressed vocabulary: {self.vocab_size} -> {self.n_compressed} ids "
                f"({100 * self.reduction:.1f}% fewer)")


def token_key(tokenizer, token_id: int):
    """The merge key of one token (see the module docstring)."""
    special_ids = set(getattr(tokenizer, "special_ids", {}).values())
    if token_id in special_ids:
        return ("special", token_id)
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:
        raw = tokenizer.token_bytes(token_id) if hasattr(tokenizer, "token_bytes") else text
        return ("raw", raw)
    norm = normalize_token_text(text)
    return norm if norm else text


def build_compressed_vocab(tokenizer) -> CompressedVocab:
    """The compressed-id map of a tokenizer (anything with vocab_size and decode; seekling's adds
    special_ids and token_bytes)."""
    V = tokenizer.vocab_size
    if V <= 0:
        raise ValueError("the tokenizer has an empty vocabulary; load or train one first")
    first: dict = {}
    compress = []
    for i in range(V):
        compress.append(first.setdefault(token_key(tokenizer, i), len(first)))
    return CompressedVocab(tuple(compress), len(first), tuple(first))


def install_engram_vocab(model, tokenizer) -> None:
    """Give a fresh Engram model (seekling Transformer) the tokenizer's compressed-id map; it is saved with
    the model, so only a run that starts from fresh weights (pretraining, SFT from a preset) calls this."""
    eng = model.cfg.engram
    if eng.pad_id != tokenizer.pad_id:
        raise ValueError(f"ModelConfig.engram: pad_id is {eng.pad_id} but the tokenizer's pad id is "
                         f"{tokenizer.pad_id}; set engram pad_id={tokenizer.pad_id}")
    cv = build_compressed_vocab(tokenizer)
    model.engram_vocab.load_map(cv.padded(model.cfg.vocab_size))
    print(f"engram: {cv.summary()}")
