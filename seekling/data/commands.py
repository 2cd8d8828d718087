"""The data command, taking plain arguments, for `seekling/cli.py` to call: train a tokenizer.

It lives here, not in `seekling/tokenizer.py`, because it reads documents through the data
package, and the data package builds on the tokenizer: the dependency points one way.
Left out: tokenizing a corpus ahead of training; `seekling train` builds its token cache itself.
"""

from __future__ import annotations

from seekling.data.corpus import corpus_documents
from seekling.data.dataset import read_documents
from seekling.tokenizer import SeeklingTokenizer, train_tokenizer


def tokenizer_train_command(data_paths: list[str] | None, vocab_size: int, out_dir: str) -> SeeklingTokenizer:
    """`seekling tokenizer train`: train on --data paths (or the embedded corpus's train split), save to out_dir."""
    if data_paths:
        texts = [doc.text for path in data_paths for doc in read_documents(path)]
        source = ", ".join(data_paths)
    else:
        texts = [text for _, text in corpus_documents("train")]
        source = "the embedded Shakespeare corpus (train split)"
    tok = train_tokenizer(texts, vocab_size, out_dir)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    print(
        f"trained a {tok.vocab_size}-token byte-level BPE on {source}: {len(texts)} documents, "
        f"{n_bytes:,} bytes -> {n_tokens:,} tokens ({n_bytes / n_tokens:.2f} bytes/token); saved to {out_dir}"
    )
    return tok
