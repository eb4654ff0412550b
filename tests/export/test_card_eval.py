"""``t2r export --eval-results``: the scores of ``t2r eval --out`` in the card, as the Hub's
``model-index`` metadata and as a table beside the teacher's; a card names no local path in full."""
import json

import yaml
from huggingface_hub import ModelCard

from t2r.cli import main
from t2r.tiny import tiny_teacher
from tests.eval.lm_eval_task import multiple_choice_task

PROSE = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
         "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 4


def test_eval_results_go_into_the_cards_model_index_and_table_without_local_paths(tmp_path, capsys):
    teacher, tok = tiny_teacher("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    assert main(["convert", str(tmp_path / "teacher"), "--out", str(tmp_path / "cnv"), "--num-slots", "8"]) == 0
    (tmp_path / "corpus.txt").write_text(PROSE)
    questions = [("Snow is", ["cold", "hot"], 0), ("Fire is", ["cold", "hot"], 1)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                              for q, c, a in questions))
    (tmp_path / "task.yaml").write_text(multiple_choice_task("t2r_card_mc", tmp_path / "q.jsonl"))
    results = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "cnv"), "--teacher", str(tmp_path / "teacher"), "--corpus",
                 str(tmp_path / "corpus.txt"), "--seq-len", "32", "--max-rows", "2", "--device", "cpu",
                 "--tasks", f"ppl,lm-eval:{tmp_path / 'task.yaml'}", "--out", str(results)]) == 0
    scores = json.loads(results.read_text())
    ppl, acc = scores["corpora"][str(tmp_path / "corpus.txt")], scores["lm_eval"]["t2r_card_mc"]

    assert main(["export", str(tmp_path / "cnv"), "--out", str(tmp_path / "gsa-export"),
                 "--eval-results", str(results)]) == 0
    card = (tmp_path / "gsa-export" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n", 2)[1])
    (index,) = meta["model-index"]
    assert index["name"] == "gsa-export"
    by_dataset = {r["dataset"]["name"]: r for r in index["results"]}
    assert set(by_dataset) == {"corpus.txt", "t2r_card_mc"}
    for r in index["results"]:
        assert r["task"]["type"] == "text-generation" and r["dataset"]["type"]
    assert by_dataset["corpus.txt"]["metrics"] == [
        {"type": "perplexity", "value": round(ppl["model"], 4), "name": "perplexity (32-token rows)"}]
    assert by_dataset["t2r_card_mc"]["metrics"][0]["type"] == "accuracy"
    assert by_dataset["t2r_card_mc"]["metrics"][0]["value"] == acc["model"]
    hub = ModelCard(card).data.eval_results  # the Hub's own reader of model-index
    assert sorted((e.dataset_name, e.metric_type, e.metric_value) for e in hub) == [
        ("corpus.txt", "perplexity", round(ppl["model"], 4)), ("t2r_card_mc", "accuracy", acc["model"])]
    assert (f"| corpus.txt | perplexity (32-token rows) | **{ppl['model']:,.2f}** | {ppl['teacher']:,.2f} |"
            in card)
    assert f"| t2r_card_mc | acc (lm-evaluation-harness) | **{acc['model']:.1%}** | {acc['teacher']:.1%} |" in card
    # the teacher folder and the corpus file are local: named by their last part only (the usage snippet
    # names the export's own folder until it is pushed, when it names the repo)
    for local in ("teacher", "corpus.txt", "task.yaml", "q.jsonl"):
        assert str(tmp_path / local) not in card and str(tmp_path.resolve() / local) not in card
    export = tmp_path / "gsa-export"
    assert "`teacher` (llama family)" in card and f'from_pretrained("{export}", trust_remote_code=True)' in card


def test_bad_eval_results_are_one_line_errors_before_any_work(tmp_path, capsys, monkeypatch):
    assert main(["convert", "tiny-random-llama", "--out", str(tmp_path / "cnv"), "--num-slots", "8"]) == 0
    capsys.readouterr()
    (tmp_path / "text.json").write_text("perplexity: 3.1")
    (tmp_path / "empty.json").write_text(json.dumps({"model": "x", "corpora": {}, "recall": {}}))
    for name, message in (("missing.json", "no such file; write one with: t2r eval"), ("text.json", "is not JSON"),
                          ("empty.json", "holds no score of a model")):
        assert main(["export", str(tmp_path / "cnv"), "--out", str(tmp_path / "e"), "--eval-results",
                     str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert not (tmp_path / "e").exists()
    (tmp_path / "ok.json").write_text(json.dumps({"seq_len": 64, "corpora": {"python-stdlib": {"model": 3.5}}}))
    assert main(["export", str(tmp_path / "cnv"), "--out", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")  # refused before any upload is tried
    assert main(["export", str(tmp_path / "e"), "--push-to-hub", "org/name",
                 "--eval-results", str(tmp_path / "ok.json")]) == 2
    assert "export again with --out DIR --eval-results FILE" in capsys.readouterr().err  # a pushed export is as it is
