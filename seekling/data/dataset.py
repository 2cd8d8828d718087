"""Text in, token shards on disk, deterministic (x, y) batches out.

Three stages, top to bottom:

1. Ingestion: ``--data PATH`` is a .txt/.md file (one document), a .jsonl file (one document per
   line, from its string ``"text"`` field), or a directory searched recursively for those (sorted
   paths, hidden files and directories skipped). CRLF becomes LF and a UTF-8 BOM is dropped;
   anything else that is wrong (missing path, non-UTF-8 bytes, a bad jsonl line, an unknown
   extension, no text at all) is a ValueError/FileNotFoundError naming the file and the fix.
2. Tokenizing once: every document becomes ``<|begin_of_text|> ids <|end_of_text|>`` (BOS so a
   document starts the way a prompt does at inference, EOS so the model learns to stop) in one flat
   stream of uint16 (uint32 if the vocabulary exceeds 65536) ``.bin`` shards plus ``index.json``.
   The cache dir is ``<cache>/<key>/`` where key hashes the input files' contents and names, the
   tokenizer (its canonical tokenizer.json), and the layout settings; ``<cache>`` is the argument,
   else ``$SEEKLING_CACHE/tokens``, else ``$XDG_CACHE_HOME/seekling/tokens`` (~/.cache/...). It is
   written to a temporary sibling and renamed into place, so a crash leaves no half cache (at
   most a ``.tmp-*`` sibling, which is never read).
3. Batches: the stream has a train range and a val range. The embedded corpus splits by whole
   works (``VAL_WORKS`` are stored last); user data holds out the last ``val_fraction`` of the
   stream, like nanoGPT, cutting mid-document if it must. Training batches are a pure function of
   (seed, step, rank): no RNG state to save, so a resumed run sees bit-identical batches.
   Validation batches tile the val range in order and are the same every time.

Left out on purpose: document-aware attention masks (windows cross document boundaries, the
BOS/EOS tokens tell the model where one ends), shuffling at the document level (window-level
shuffling already decorrelates batches), and streaming of single files larger than memory.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from seekling.data.corpus import CORPUS_PATH, VAL_WORKS, corpus_documents
from seekling.device import cache_dir
from seekling.tokenizer import SeeklingTokenizer

SUPPORTED_SUFFIXES = (".txt", ".md", ".jsonl")
FORMAT_VERSION = 1
DEFAULT_VAL_FRACTION = 0.05
# 16M tokens = 32 MiB per uint16 shard: few files for small data, no single huge file for big data.
DEFAULT_SHARD_TOKENS = 1 << 24
# Texts longer than this are encoded in pieces (at boundaries that do not change the ids, see
# _chunks) so that the tokenizer never holds a gigabyte document's offsets at once.
MAX_ENCODE_CHARS = 1 << 22
_ENCODE_BATCH_CHARS = 1 << 23  # chars handed to one encode_batch call (parallel in Rust)


# --- 1. ingestion ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    source: str  # "file" or "file:line", for messages
    text: str


def find_data_files(path: str | os.PathLike) -> list[Path]:
    """The files --data PATH names: the file itself, or the supported files under a directory."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"data path {root} does not exist; pass a .txt, .md or .jsonl file or a directory of them"
        )
    if root.is_file():
        if root.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise ValueError(
                f"{root} has unsupported extension {root.suffix or '(none)'!r}; seekling reads .txt and "
                '.md (plain text) and .jsonl (one JSON object with a "text" field per line)'
            )
        return [root]
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(
            f"directory {root} holds no .txt, .md or .jsonl files (searched recursively, hidden "
            "files skipped); add some or point --data at a file"
        )
    return files


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not valid UTF-8: {e.reason} at byte offset {e.start} "
            f"(bytes {data[e.start:e.start + 4].hex(' ')}); re-save it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > fixed{path.suffix}`"
        ) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def _file_documents(path: Path) -> Iterator[Document]:
    text = _decode(path, path.read_bytes())
    if path.suffix.lower() != ".jsonl":
        if text.strip():
            yield Document(str(path), text)
        return
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028, which splitlines cuts at.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f'{where}: not valid JSON ({e.msg}); each line must be one object like {{"text": "..."}}'
            ) from None
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f'{where}: no "text" field; each line must be a JSON object with a string "text" field')
        if not isinstance(record["text"], str):
            raise ValueError(f'{where}: "text" must be a string, got {type(record["text"]).__name__}')
        if record["text"].strip():
            yield Document(where, record["text"])


def iter_documents(path: str | os.PathLike) -> Iterator[Document]:
    """Documents under --data PATH, in sorted-path order; blank documents are skipped."""
    empty = True
    for file in find_data_files(path):
        for doc in _file_documents(file):
            empty = False
            yield doc
    if empty:
        raise ValueError(f"{path} contains no text (every document is empty or whitespace); add text or point --data elsewhere")


def read_documents(path: str | os.PathLike) -> list[Document]:
    """iter_documents, as a list."""
    return list(iter_documents(path))


# --- 2. tokenizing into a cached shard set ----------------------------------------------------


def default_cache_dir() -> Path:
    """Where token shards live unless a cache_dir is passed."""
    return cache_dir() / "tokens"


_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def _chunks(text: str, max_chars: int = MAX_ENCODE_CHARS) -> list[str]:
    """Cut a long text into pieces whose encodings concatenate to the encoding of the whole.

    Cuts go just after a newline that sits between two non-space characters ("x\\n|y"): the
    byte-level pre-tokenizer's regex then makes "\\n" a token of its own in both the whole and
    the pieces, and BPE never merges across pre-tokens. A run of max_chars/2 with no such
    newline is cut blindly, which can change a token or two at that seam and nothing else.
    """
    pieces, start = [], 0
    while len(text) - start > max_chars:
        lo, hi = start + max_chars // 2, start + max_chars
        cuts = [m.start() for m in _SAFE_CUT.finditer(text, lo, hi)]
        cut = cuts[-1] if cuts else hi
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _ShardWriter:
    def __init__(self, root: Path, dtype: np.dtype, shard_tokens: int):
        self.root, self.dtype, self.shard_tokens = root, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self.total = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None:
                name = f"tokens_{len(self.shards):06d}.bin"
                self._file = open(self.root / name, "wb")
                self.shards.append({"file": name, "tokens": 0})
            room = self.shard_tokens - self.shards[-1]["tokens"]
            head, ids = ids[:room], ids[room:]
            self._file.write(head.astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += len(head)
            self.total += len(head)
            if self.shards[-1]["tokens"] == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def _tokenize_into(
    writer: _ShardWriter, docs: Iterator[Document], tokenizer: SeeklingTokenizer, bar: tqdm
) -> int:
    """Append each document as BOS ids EOS; returns the number of documents."""
    n_docs = 0
    pending: list[str] = []  # pieces of the documents gathered so far
    owners: list[int] = []  # which gathered document each piece belongs to

    def flush() -> None:
        ids_per_piece = tokenizer.encode_batch(pending)
        stream: list[int] = []
        for i, ids in enumerate(ids_per_piece):
            if i == 0 or owners[i] != owners[i - 1]:
                stream.append(tokenizer.bos_id)
            stream += ids
            if i + 1 == len(owners) or owners[i + 1] != owners[i]:
                stream.append(tokenizer.eos_id)
        writer.write(np.asarray(stream, dtype=np.int64))
        bar.update(sum(len(p) for p in pending))
        pending.clear()
        owners.clear()

    size = 0
    for doc in docs:
        for piece in _chunks(doc.text):
            pending.append(piece)
            owners.append(n_docs)
            size += len(piece)
        n_docs += 1
        if size >= _ENCODE_BATCH_CHARS:
            flush()
            size = 0
    if pending:
        flush()
    return n_docs


@dataclass(frozen=True, kw_only=True)
class TokenShards:
    """A tokenized data set on disk: shards of one token stream plus its train/val ranges."""

    root: Path
    dtype: str
    vocab_size: int
    tokenizer_sha256: str
    source: str
    documents: int
    shards: tuple[tuple[str, int], ...]
    splits: dict[str, dict[str, int]]  # name -> {"start", "end", "bytes"}
    from_cache: bool = False
    _open: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # memmaps, bounds

    @classmethod
    def open(cls, root: str | os.PathLike, *, from_cache: bool = True) -> TokenShards:
        """Open a shard directory written by prepare_tokens; checks it is complete."""
        root = Path(root)
        try:
            index = json.loads((root / "index.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{root} is not a complete token cache (no index.json); delete it and rerun") from None
        if index.get("format") != FORMAT_VERSION:
            raise ValueError(f"token cache {root} has format {index.get('format')}, expected {FORMAT_VERSION}; delete it and rerun")
        itemsize = np.dtype(index["dtype"]).itemsize
        for name, n in index["shards"]:
            path = root / name
            if not path.is_file() or path.stat().st_size != n * itemsize:
                raise ValueError(f"token cache {root} is damaged ({name} missing or truncated); delete it and rerun")
        return cls(
            root=root,
            dtype=index["dtype"],
            vocab_size=index["vocab_size"],
            tokenizer_sha256=index["tokenizer_sha256"],
            source=index["source"],
            documents=index["documents"],
            shards=tuple((name, n) for name, n in index["shards"]),
            splits=index["splits"],
            from_cache=from_cache,
        )

    @property
    def n_tokens(self) -> int:
        return sum(n for _, n in self.shards)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the whole stream, as int64, across shard boundaries."""
        if not self._open:
            self._open["maps"] = [np.memmap(self.root / name, dtype=self.dtype, mode="r") for name, _ in self.shards]
            self._open["bounds"] = [0, *np.cumsum([n for _, n in self.shards]).tolist()]
        maps, bounds = self._open["maps"], self._open["bounds"]
        assert 0 <= start and start + length <= bounds[-1], (start, length, bounds[-1])
        out = np.empty(length, dtype=np.int64)
        pos = 0
        shard = bisect.bisect_right(bounds, start) - 1
        while pos < length:
            offset = start + pos - bounds[shard]
            take = min(length - pos, self.shards[shard][1] - offset)
            out[pos : pos + take] = maps[shard][offset : offset + take]
            pos += take
            shard += 1
        return out

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes behind each token id (0 for special tokens), for bits per byte."""
        return np.fromfile(self.root / "token_bytes.bin", dtype=np.int32)

    def split(self, name: str) -> TokenDataset:
        """The "train" or "val" range of the stream."""
        if name not in self.splits:
            raise ValueError(f"split must be one of {sorted(self.splits)}, got {name!r}")
        s = self.splits[name]
        return TokenDataset(shards=self, name=name, start=s["start"], n_tokens=s["end"] - s["start"], n_bytes=s["bytes"])


def prepare_tokens(
    data: str | os.PathLike | None,
    tokenizer: SeeklingTokenizer,
    *,
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool | None = None,
) -> TokenShards:
    """Tokenize --data PATH (None: the embedded corpus) once; later calls reuse the cache."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if data is None:
        source = "embedded Shakespeare corpus"
        inputs = {"corpus": _file_sha256(CORPUS_PATH), "val_works": list(VAL_WORKS)}
    else:
        root = Path(data).expanduser()
        files = find_data_files(root)
        base = root if root.is_dir() else root.parent
        source = str(root.resolve())
        # Names are part of the key because they fix the document order; the absolute location
        # is not, so a moved directory keeps its cache.
        inputs = {"files": [[str(f.relative_to(base)), _file_sha256(f)] for f in files], "val_fraction": val_fraction}
    key = _key({"format": FORMAT_VERSION, "tokenizer": tokenizer.sha256, "shard_tokens": shard_tokens, **inputs})
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache / key
    if final.exists():
        return TokenShards.open(final, from_cache=True)

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache))
    try:
        _build(tmp, data, tokenizer, source=source, val_fraction=val_fraction, shard_tokens=shard_tokens, progress=progress)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process (e.g. a second rank) renamed its identical copy into place first.
            if not (final / "index.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenShards.open(final, from_cache=False)


def _build(
    tmp: Path,
    data: str | os.PathLike | None,
    tokenizer: SeeklingTokenizer,
    *,
    source: str,
    val_fraction: float,
    shard_tokens: int,
    progress: bool | None,
) -> None:
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    writer = _ShardWriter(tmp, dtype, shard_tokens)
    disable = not sys.stderr.isatty() if progress is None else not progress
    with tqdm(desc=f"tokenizing {source}", unit="char", unit_scale=True, disable=disable) as bar:
        if data is None:
            # Train works first, then VAL_WORKS, so each split is one contiguous range.
            n_docs = _tokenize_into(writer, (Document(t, x) for t, x in corpus_documents("train")), tokenizer, bar)
            val_start = writer.total
            n_docs += _tokenize_into(writer, (Document(t, x) for t, x in corpus_documents("val")), tokenizer, bar)
        else:
            n_docs = _tokenize_into(writer, iter_documents(data), tokenizer, bar)
            val_start = writer.total - int(round(writer.total * val_fraction))
    writer.close()

    lengths = np.asarray(tokenizer.token_byte_lengths(), dtype=np.int32)
    lengths.tofile(tmp / "token_bytes.bin")
    shards = TokenShards(
        root=tmp, dtype=dtype.name, vocab_size=tokenizer.vocab_size, tokenizer_sha256=tokenizer.sha256,
        source=source, documents=n_docs, shards=tuple((s["file"], s["tokens"]) for s in writer.shards), splits={},
    )
    splits = {}
    for name, (start, end) in {"train": (0, val_start), "val": (val_start, writer.total)}.items():
        n_bytes = 0
        for lo in range(start, end, 1 << 22):
            n_bytes += int(lengths[shards.read(lo, min(1 << 22, end - lo))].sum())
        splits[name] = {"start": start, "end": end, "bytes": n_bytes}
    index = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.sha256,
        "source": source,
        "documents": n_docs,
        "shards": [[s["file"], s["tokens"]] for s in writer.shards],
        "splits": splits,
    }
    # index.json last: its presence is what marks a shard directory complete.
    (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


# --- 3. batches ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TokenDataset:
    """One split: a contiguous range of the token stream."""

    shards: TokenShards
    name: str
    start: int
    n_tokens: int
    n_bytes: int  # UTF-8 bytes of the text behind these tokens (BOS/EOS count 0)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of this split, as int64."""
        assert 0 <= start and start + length <= self.n_tokens, (start, length, self.n_tokens)
        return self.shards.read(self.start + start, length)

    def _check_fits(self, seq_len: int) -> None:
        if self.n_tokens < seq_len + 1:
            raise ValueError(
                f"the {self.name} split of {self.shards.source} has {self.n_tokens} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1}; add more text, lower seq_len"
                + (" or raise val_fraction" if self.name == "val" else "")
            )


def _to_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(windows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


@dataclass(frozen=True, kw_only=True)
class TrainLoader:
    """Training batches as a pure function of (seed, step): resume by remembering step alone.

    The split is cut into W = (n-1) // seq_len windows of seq_len+1 tokens (x and its shifted y).
    Epoch e visits every window once, in an order and with a start offset (0..slack, so window
    edges move between epochs) drawn from a generator seeded by (seed, e). Global sample
    g = (step * world_size + rank) * batch_size + b lands in epoch g // W. Changing batch_size or
    world_size mid-run changes which windows later steps see, not the data's coverage.
    """

    data: TokenDataset
    batch_size: int
    seq_len: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    _perms: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # memo, pure

    def __post_init__(self):
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {self.batch_size} and {self.seq_len}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self.data._check_fits(self.seq_len)

    @property
    def windows_per_epoch(self) -> int:
        return (self.data.n_tokens - 1) // self.seq_len

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        if epoch not in self._perms:
            # PCG64's raw output is a fixed, documented stream; Generator.permutation and
            # .integers may change between numpy releases, so the order is built from raw bits
            # (stable argsort of random keys) to keep resumed runs identical across upgrades.
            bits = np.random.PCG64(np.random.SeedSequence([self.seed, epoch]))
            slack = self.data.n_tokens - 1 - self.windows_per_epoch * self.seq_len
            offset = int(bits.random_raw() % (slack + 1))
            order = np.argsort(bits.random_raw(self.windows_per_epoch), kind="stable")
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = (offset, order)
        return self._perms[epoch]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (batch_size, seq_len) int64, for this rank at this step."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        first = (step * self.world_size + self.rank) * self.batch_size
        windows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for b in range(self.batch_size):
            epoch, i = divmod(first + b, self.windows_per_epoch)
            offset, order = self._epoch(epoch)
            windows[b] = self.data.read(offset + int(order[i]) * self.seq_len, self.seq_len + 1)
        return _to_xy(windows)

    def epoch_of(self, step: int) -> float:
        """Fractional epochs completed before this step (for logging)."""
        return step * self.world_size * self.batch_size / self.windows_per_epoch


@dataclass(frozen=True, kw_only=True)
class ValLoader:
    """The fixed validation set: the split tiled in order by windows, the last batch possibly short."""

    data: TokenDataset
    batch_size: int
    seq_len: int
    max_batches: int | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {self.batch_size} and {self.seq_len}")
        self.data._check_fits(self.seq_len)

    @property
    def n_windows(self) -> int:
        n = (self.data.n_tokens - 1) // self.seq_len
        return n if self.max_batches is None else min(n, self.max_batches * self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self.n_windows / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, self.n_windows, self.batch_size):
            rows = range(first, min(first + self.batch_size, self.n_windows))
            yield _to_xy(np.stack([self.data.read(w * self.seq_len, self.seq_len + 1) for w in rows]))

    @property
    def n_target_tokens(self) -> int:
        """How many y tokens one pass scores."""
        return self.n_windows * self.seq_len

    @property
    def n_target_bytes(self) -> int:
        """UTF-8 bytes behind the y tokens one pass scores (BOS/EOS count 0)."""
        lengths = self.data.shards.token_byte_lengths()
        return int(lengths[self.data.read(1, self.n_target_tokens)].sum())


def bits_per_byte(mean_loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Tokenizer-independent loss: mean nats/token over n_tokens scored, covering n_bytes of text."""
    if n_bytes <= 0:
        raise ValueError("bits per byte needs a positive byte count")
    return mean_loss_nats * n_tokens / (n_bytes * math.log(2))
