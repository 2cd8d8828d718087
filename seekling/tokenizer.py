"""Byte-level BPE tokenizer: training, encode/decode, the chat template, Hugging Face layout.

Byte-level means every string is first turned into its UTF-8 bytes, each byte is one of 256 base
tokens, and merges are learned on top; so any Unicode text encodes, and ``decode(encode(s)) == s``
exactly (no normalizer, no prefix space, no space clean-up on decode).

Special tokens have fixed ids 0..8 in the order of ``SPECIAL_TOKENS`` (the trainer adds them first),
so every tokenizer this module trains agrees on them. Inside text they are handled so:

- ``encode(text)`` treats special-token look-alikes as plain text ("<|user|>" becomes ordinary
  byte tokens). That keeps the round trip exact and stops a document or a user message from
  forging structure. ``encode(text, allow_special=True)`` parses them into their ids instead,
  which is what Hugging Face's ``tokenizer.encode`` does by default.
- The chat template parses ``<think>`` / ``</think>`` inside message content (the reasoning model
  writes them in its turns) but treats role, turn and document markers in content as plain text.
  For content without those markers our ids equal transformers' ``apply_chat_template`` ids.

Chat format (one line, no newlines added around markers because role tokens already delimit):
``<|begin_of_text|><|system|>S<|end_of_turn|><|user|>U<|end_of_turn|><|assistant|>A<|end_of_turn|>``
An assistant message may carry ``reasoning_content``, rendered as ``<think>R</think>`` before its
content. Generation stops at ``<|end_of_turn|>`` (chat) or ``<|end_of_text|>`` (raw text).

Left out on purpose: a normalizer (NFKC etc. would break the exact round trip), tool-call roles,
and a post-processor that adds BOS (callers add BOS explicitly: the data pipeline and the chat
template both do).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end_of_turn|>"
THINK = "<think>"
END_THINK = "</think>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN, THINK, END_THINK)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# 256 byte tokens + the specials: the smallest vocabulary that can still encode everything.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# The shipped tokenizer: 4096 ids trained on the embedded corpus's train split. A small vocabulary
# keeps the tiny models' embedding and output layers small (4096 x d_model). Measured bytes/token
# on the held-out plays: 2048 -> 2.59, 4096 -> 2.83, 8192 -> 3.04, 16384 -> 3.20; each doubling
# buys ~7% fewer tokens for twice the embedding parameters, and with ~1.5M training tokens rarer
# tokens would also be seen too seldom to learn. 4096 is a multiple of 128, as matmuls like.
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_TOKENIZER_DIR = Path(__file__).parent / "data" / "tokenizer"

# Jinja twin of SeeklingTokenizer.render_chat, stored in tokenizer_config.json so that
# transformers.AutoTokenizer renders the same string; tests keep the two in step.
CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('role must be system, user or assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' -}}"
    "{%- if message['role'] == 'assistant' and message.get('reasoning_content') -%}"
    "{{- '<think>' + message['reasoning_content'] + '</think>' -}}"
    "{%- endif -%}"
    "{{- message['content'] + '<|end_of_turn|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)

_THINK_SPLIT = re.compile(f"({re.escape(THINK)}|{re.escape(END_THINK)})")


def _byte_alphabet() -> dict[str, int]:
    """Map the printable stand-in character of each byte back to the byte (GPT-2's convention).

    Byte-level BPE stores byte b as a visible character so vocab files stay printable: bytes that
    are already printable Latin-1 stand for themselves, the remaining 68 take code points 256+
    in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            char_to_byte[chr(256 + extra)] = b
            extra += 1
    return char_to_byte


class SeeklingTokenizer:
    """A trained byte-level BPE tokenizer with seekling's special tokens and chat template."""

    def __init__(self, tokenizer: Tokenizer):
        added = {tok.content: i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}
        missing = [tok for tok in SPECIAL_TOKENS if tok not in added]
        if missing:
            raise ValueError(
                f"tokenizer lacks the special tokens {missing}; train it with "
                "seekling.tokenizer.train_tokenizer (or `seekling tokenizer train`)"
            )
        # Two handles on one vocabulary: whether specials in text are parsed is a flag on the
        # Rust object, and flipping it per call would race between threads.
        self._special = tokenizer
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self.special_ids = {tok: added[tok] for tok in SPECIAL_TOKENS}
        self.bos_id, self.eos_id, self.pad_id = (self.special_ids[t] for t in (BOS, EOS, PAD))
        self.eot_id = self.special_ids[END_OF_TURN]
        self.think_id, self.end_think_id = self.special_ids[THINK], self.special_ids[END_THINK]
        self.role_ids = {role: self.special_ids[tok] for role, tok in ROLE_TOKENS.items()}
        self._token_bytes = self._build_token_bytes()

    # -- basics -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are 0..vocab_size-1)."""
        return self._special.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        """Hash of the canonical tokenizer.json text; keys token caches to this exact vocabulary."""
        return hashlib.sha256(self._special.to_str().encode("utf-8")).hexdigest()

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of text; special-token strings are plain text unless allow_special."""
        tok = self._special if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = False) -> list[list[int]]:
        """encode() over many texts at once (the Rust side runs them in parallel)."""
        tok = self._special if allow_special else self._plain
        return [enc.ids for enc in tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of ids; special tokens appear as their strings unless skip_special."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside this tokenizer's vocabulary 0..{self.vocab_size - 1}")
        return self._special.decode(ids, skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes a token stands for; a special token gives its UTF-8 string."""
        return self._token_bytes[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Bytes of ids, for streaming: a token may end mid-way through a UTF-8 character."""
        return b"".join(self._token_bytes[i] for i in ids)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes of text behind each id, 0 for special tokens (the bits-per-byte denominator)."""
        specials = set(self.special_ids.values())
        return [0 if i in specials else len(b) for i, b in enumerate(self._token_bytes)]

    def _build_token_bytes(self) -> list[bytes]:
        char_to_byte = _byte_alphabet()
        specials = {i: tok for tok, i in self.special_ids.items()}
        table = []
        for i in range(self.vocab_size):
            if i in specials:
                table.append(specials[i].encode("utf-8"))
            else:
                table.append(bytes(char_to_byte[ch] for ch in self._special.id_to_token(i)))
        return table

    # -- chat ---------------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat as text, exactly as CHAT_TEMPLATE renders it."""
        parts = [BOS]
        for role, reasoning, content in _check_messages(messages):
            parts.append(ROLE_TOKENS[role])
            if reasoning:
                parts += [THINK, reasoning, END_THINK]
            parts += [content, END_OF_TURN]
        if add_generation_prompt:
            parts.append(ASSISTANT)
        return "".join(parts)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the chat; markers are placed by id, so content cannot forge a turn."""
        ids = [self.bos_id]
        for role, reasoning, content in _check_messages(messages):
            ids.append(self.role_ids[role])
            if reasoning:
                ids += [self.think_id, *self._encode_content(reasoning), self.end_think_id]
            ids += [*self._encode_content(content), self.eot_id]
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
        return ids

    def _encode_content(self, text: str) -> list[int]:
        # Split on the think markers only; each piece between them is encoded on its own, which is
        # also what HF does (it cuts at added tokens before pre-tokenizing), so the ids agree.
        ids: list[int] = []
        for piece in _THINK_SPLIT.split(text):
            if piece == THINK:
                ids.append(self.think_id)
            elif piece == END_THINK:
                ids.append(self.end_think_id)
            elif piece:
                ids += self.encode(piece)
        return ids

    # -- files --------------------------------------------------------------------------------

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (HF layout)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
        config = {
            # transformers 4.x loads PreTrainedTokenizerFast; 5.x maps the name to TokenizersBackend.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            "add_bos_token": False,
            "add_eos_token": False,
            # HF's default clean-up deletes the space before punctuation, breaking the round trip.
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
        _write_atomic(out / "tokenizer.json", self._special.to_str(pretty=True))
        _write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        _write_atomic(out / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike = DEFAULT_TOKENIZER_DIR) -> SeeklingTokenizer:
        """Load a directory written by save() (or any HF dir whose tokenizer.json has our specials)."""
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {directory}; train one with `seekling tokenizer train "
                f"--out {directory}` or point at a directory saved by SeeklingTokenizer.save"
            )
        return cls(Tokenizer.from_file(str(path)))


def _check_messages(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str, str]]:
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_TOKENS:
            raise ValueError(f"message {i} has role {role!r}; use one of {sorted(ROLE_TOKENS)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} needs a string 'content', got {type(content).__name__}")
        reasoning = message.get("reasoning_content") or ""
        if not isinstance(reasoning, str) or (reasoning and role != "assistant"):
            raise ValueError(f"message {i}: 'reasoning_content' must be a string on an assistant message")
        checked.append((role, reasoning, content))
    return checked


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; these are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, out_dir: str | os.PathLike | None = None
) -> SeeklingTokenizer:
    """Train a byte-level BPE on texts (deterministic for the same texts in the same order)."""
    if not MIN_VOCAB_SIZE <= vocab_size <= 2**31 - 1:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special "
            f"tokens), got {vocab_size}; {DEFAULT_VOCAB_SIZE} suits the embedded corpus"
        )
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("cannot train a tokenizer on no text; pass at least one non-empty document")
    tok = Tokenizer(models.BPE())
    # The GPT-2 split regex keeps merges inside words/number runs/punctuation runs; no prefix
    # space, so a text's first word is encoded as written and the round trip stays exact.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # min_frequency=2: a pair seen once is memorisation, not a reusable unit. With little text
        # the trainer therefore stops early and the vocabulary is smaller than asked for.
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    result = SeeklingTokenizer(tok)
    if out_dir is not None:
        result.save(out_dir)
    return result


def load_default_tokenizer() -> SeeklingTokenizer:
    """The tokenizer shipped with seekling (trained on the embedded corpus's train split)."""
    return SeeklingTokenizer.load(DEFAULT_TOKENIZER_DIR)
