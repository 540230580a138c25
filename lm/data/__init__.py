"""Data: corpora, tokenizers, packing and the grain input pipeline.

    load_tokenizer(spec)                               -> Tokenizer
    load_documents(cfg, split)                         -> list[str]
    train_iterator(cfg, tok, batch_size, seed, process_index=0, process_count=1)
                                                       -> grain.DatasetIterator
    eval_batches(cfg, tok, batch_size, max_batches=0)  -> list[dict]
    target_bytes(batch, tok)                           -> np.ndarray
    Prefetcher(iterator, transform, depth)             -> batches read ahead in a thread
    prefetch_depth(data.prefetch, platform)            -> the depth (-1 = auto by backend)
    prepare(cfg, out_dir)                              -> dict of stats

User-caused problems raise DataError (a one-line ValueError). Row format (ROW_DTYPES,
the one definition of the batch keys and dtypes): see lm/data/pipeline.py.
"""

from lm.data.errors import DataError
from lm.data.pipeline import (ROW_DTYPES, ROW_KEYS, eval_batches, eval_batches_by_source,
                              packed_rows, target_bytes, train_iterator)
from lm.data.prefetch import Prefetcher, prefetch_depth
from lm.data.prepare import prepare
from lm.data.sources import SHAKESPEARE_VALIDATION_WORKS, load_documents
from lm.data.tokenizers import Tokenizer, load_tokenizer

__all__ = [
    "DataError", "Tokenizer", "load_tokenizer", "load_documents", "train_iterator",
    "eval_batches", "eval_batches_by_source", "target_bytes", "prepare", "packed_rows", "ROW_KEYS", "ROW_DTYPES",
    "Prefetcher", "prefetch_depth",
    "SHAKESPEARE_VALIDATION_WORKS",
]
