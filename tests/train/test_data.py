"""Data: real `datasets` over the stdlib corpus and local files; packing, boundaries, caching, order."""
import json

import pytest
import torch

from t2r.errors import T2RError
from t2r.tiny import byte_level_tokenizer
from t2r.train.config import DataConfig
from t2r.train.data import RowOrder, collate, load_documents, load_sources, packed_rows, tokenize_and_pack


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


def test_stdlib_corpus_splits_held_out_modules_apart():
    cfg = DataConfig(dataset="python-stdlib", max_documents=200, held_out=0.2)
    train, held = load_documents(cfg)
    train_paths, held_paths = set(train["path"]), set(held["path"])
    assert not train_paths & held_paths and len(train_paths) + len(held_paths) == 200
    assert 20 <= len(held_paths) <= 60  # ~20% of modules
    again_train, _ = load_documents(cfg)
    assert set(again_train["path"]) == train_paths  # the same split every time (and in every process)


def test_packed_rows_keep_document_boundaries(tok):
    docs = ["def a():\n    return 1\n", "x = 2\n" * 30, "import os\n"]
    from datasets import Dataset

    cfg = DataConfig(dataset="python-stdlib", seq_len=64)
    rows = tokenize_and_pack(Dataset.from_dict({"text": docs}), tok, cfg, cache_dir=None)
    lengths = [len(tok(d)["input_ids"]) + 1 for d in docs]  # + EOS
    assert all(len(r["input_ids"]) == 64 for r in rows)
    assert len(rows) == sum(lengths) // 64  # the partial last row is dropped
    flat = [t for r in rows for t in r["input_ids"]]
    assert flat[lengths[0] - 1] == tok.eos_token_id  # every document ends with EOS
    assert [n for r in rows for n in r["doc_lens"]][:2] == [lengths[0], 64 - lengths[0]]
    batch = collate([rows[0], rows[1]], tok.pad_token_id)
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == 128 and 64 in cu and lengths[0] in cu
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_unpacked_rows_are_padded_with_a_mask(tok):
    from datasets import Dataset

    cfg = DataConfig(dataset="python-stdlib", seq_len=16, packing=False)
    rows = tokenize_and_pack(Dataset.from_dict({"text": ["ab", "a much longer document here"]}), tok, cfg, None)
    batch = collate(list(rows), tok.pad_token_id)
    assert "cu_seqlens" not in batch and batch["attention_mask"].tolist()[0] == [1] * 3 + [0] * 13
    assert (batch["labels"][0, 3:] == -100).all() and len(rows[1]["input_ids"]) == 16


def test_tokenization_is_cached_on_disk(tok, tmp_path):
    cfg = DataConfig(dataset="python-stdlib", max_documents=30, held_out=0, seq_len=64)
    train, _ = load_documents(cfg)
    first = tokenize_and_pack(train, tok, cfg, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.endswith(".arrow") for f in files)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    second = tokenize_and_pack(load_documents(cfg)[0], tok, cfg, tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps  # reused, not rewritten
    assert first["input_ids"] == second["input_ids"]


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_local_files(tmp_path, fmt, tok):
    texts = [f"document {i}\n" + "word " * (i + 3) for i in range(12)]
    if fmt == "txt":
        for i, t in enumerate(texts):
            (tmp_path / f"d{i}.txt").write_text(t)
    elif fmt == "jsonl":
        (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    else:
        from datasets import Dataset

        Dataset.from_dict({"body": texts}).to_parquet(str(tmp_path / "d.parquet"))
    field = "text" if fmt == "txt" else "body"
    cfg = DataConfig(files=[str(tmp_path / f"*.{fmt}")], text_field=field, held_out=2, seq_len=16)
    train, held = load_documents(cfg)
    assert len(train) == 10 and len(held) == 2
    assert sorted(list(train[field]) + list(held[field])) == sorted(texts)  # whole files are documents


def test_data_errors_name_the_problem(tmp_path):
    with pytest.raises(T2RError, match="matches no file"):
        load_documents(DataConfig(files=[str(tmp_path / "none*.txt")]))
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(T2RError, match="text_field 'text' is not a column.*'body'"):
        load_documents(DataConfig(files=[str(tmp_path / "a.jsonl")]))


def test_streaming_gives_the_rows_of_the_map_style_path(tok):
    cfg = DataConfig(dataset="python-stdlib", max_documents=40, held_out=0.1, seq_len=64)
    rows = tokenize_and_pack(load_documents(cfg)[0], tok, cfg, None)
    stream_cfg = cfg.model_copy(update={"streaming": True})
    streamed = tokenize_and_pack(load_documents(stream_cfg)[0], tok, stream_cfg, None)
    first = [r["input_ids"] for _, r in zip(range(5), streamed)]
    assert first == rows["input_ids"][:5]


@pytest.mark.parametrize("streaming", [False, True])
def test_row_order_is_deterministic_and_resumable(tok, streaming):
    cfg = DataConfig(dataset="python-stdlib", max_documents=15, held_out=0, seq_len=256, streaming=streaming)
    rows = tokenize_and_pack(load_documents(cfg)[0], tok, cfg, None)
    order = RowOrder(rows, seed=3, shuffle_buffer=50)
    n = len(list(rows)) if streaming else len(rows)
    epoch_and_a_half = order.take(0, n + n // 2)
    resumed = RowOrder(rows, seed=3, shuffle_buffer=50).take(n - 2, 4)  # across the epoch boundary
    assert [r["input_ids"] for r in resumed] == [r["input_ids"] for r in epoch_and_a_half[n - 2:n + 2]]
    first_epoch = sorted(tuple(r["input_ids"]) for r in epoch_and_a_half[:n])
    assert first_epoch == sorted(tuple(r["input_ids"]) for r in rows)  # each row once per epoch
    assert [r["input_ids"] for r in epoch_and_a_half[:n]] != [r["input_ids"] for r in rows] or n < 3


def test_held_out_splits_that_leave_a_side_empty_are_one_line_errors(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"a short document called {name}\n")
    with pytest.raises(T2RError, match="picks none of the 2 documents for evaluation; use a count"):
        load_documents(DataConfig(files=[str(tmp_path / "*.txt")], held_out=0.1))
    assert len(load_documents(DataConfig(files=[str(tmp_path / "*.txt")], held_out=1))[1]) == 1
    with pytest.raises(T2RError, match="held_out=0.999 leaves none of the 50 documents to train on"):
        load_documents(DataConfig(dataset="python-stdlib", max_documents=50, held_out=0.999))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(T2RError, match="empty.jsonl is empty; remove it from data.files"):
        load_documents(DataConfig(files=[str(tmp_path / "empty.jsonl")]))


def test_bad_data_fails_before_the_model_loads_and_writes_nothing(tmp_path):
    from tests.train.runs import finetune_cmd, run

    (tmp_path / "a.txt").write_text("one short document\n")
    (tmp_path / "b.txt").write_text("another short document\n")
    out = tmp_path / "out"
    r = run(finetune_cmd(out, "data.dataset=null", f"data.files=[{tmp_path / '*.txt'}]", "data.seq_len=16"))
    assert r.returncode == 2 and "picks none of the 2 documents for evaluation" in r.stderr
    assert "converted" not in r.stdout and not out.exists()


def test_english_prose_holds_out_one_whole_book():
    from t2r.train.data import PROSE_HELD_OUT_BOOK

    train, held = load_documents(DataConfig(dataset="english-prose", held_out=0.05))
    assert set(held["book"]) == {PROSE_HELD_OUT_BOOK} and PROSE_HELD_OUT_BOOK not in set(train["book"])
    assert len(set(train["book"])) == 3 and sum(len(t) for t in held["text"]) > 400_000  # the whole book


def test_a_mix_draws_rows_by_weight_and_reads_every_source_whole(tok):
    cfg = DataConfig(mix=[{"dataset": "python-stdlib", "max_documents": 12, "weight": 3},
                          {"dataset": "english-prose", "max_documents": 30}], held_out=0.1, seq_len=256)
    sources = load_sources(cfg)
    alone = [tokenize_and_pack(train, tok, src, None) for src, _, train, _ in sources]
    code, prose = ({tuple(r) for r in rows["input_ids"]} for rows in alone)
    train, evals = packed_rows(sources, tok, None, seed=0)
    drawn = [tuple(r) for r in train["input_ids"]]
    assert set(drawn) == code | prose  # every row of each source, and rows never mix sources
    share = sum(r in prose for r in drawn) / len(drawn)
    assert abs(share - 0.25) < 0.05  # 3:1 by weight ...
    assert abs(len(prose) / (len(code) + len(prose)) - 0.25) > 0.3  # ... which the sizes alone would not give
    assert packed_rows(sources, tok, None, seed=0)[0]["input_ids"] == train["input_ids"]  # seeded
    held_alone = [tokenize_and_pack(held, tok, src, None)["input_ids"] for src, _, _, held in sources]
    assert evals["input_ids"][:2] == [held_alone[0][0], held_alone[1][0]]  # sources in turn
    assert sorted(map(tuple, evals["input_ids"])) == sorted(tuple(r) for h in held_alone for r in h)


def test_mix_mistakes_are_named(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exactly one of data.dataset.*got data.dataset and data.mix"):
        DataConfig(dataset="python-stdlib", mix=[{"dataset": "english-prose"}])
    with pytest.raises(ValidationError, match="exactly one of dataset"):
        DataConfig(mix=[{"dataset": "english-prose", "files": ["a.txt"]}])
    with pytest.raises(ValidationError, match="inside each source of the mix"):
        DataConfig(mix=[{"dataset": "english-prose"}], text_field="body")
    with pytest.raises(ValidationError, match="weight"):
        DataConfig(mix=[{"dataset": "english-prose", "weight": 0}])
    with pytest.raises(T2RError, match=r"data.mix\[1\] .*none\*.txt.* matches no file"):
        load_sources(DataConfig(mix=[{"dataset": "english-prose"}, {"files": [str(tmp_path / "none*.txt")]}]))
