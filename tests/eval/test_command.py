"""``t2r eval``: the model and its teacher scored on the same tokens; recall probes score exactly
the answer tokens."""
import json
import random
import re

from t2r.cli import main
from t2r.convert import ConversionOptions, convert
from t2r.eval.recall import PASSKEY_CELLS, mqar_example, passkey_example
from t2r.tiny import byte_level_tokenizer


def test_softmax_only_conversion_scores_exactly_as_its_teacher(tmp_path, capsys):
    """The teacher runs through the same code path as the model: a conversion that keeps every layer
    softmax must give the teacher's perplexity and recall, cell by cell."""
    convert("tiny-random-llama", tmp_path / "cnv", ConversionOptions(softmax_layers="all"), log=lambda *_: None)
    out = tmp_path / "eval.json"
    code = main(["eval", str(tmp_path / "cnv"), "--teacher", "tiny-random-llama", "--tasks", "ppl,mqar,passkey",
                 "--samples", "1", "--seq-len", "128", "--max-rows", "2", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["corpora"]) == {"python-stdlib", "english-prose"}
    for e in result["corpora"].values():
        assert e["tokens"] == 2 * 127 and e["model"] == e["teacher"] and e["ratio"] == 1.0
    assert len(result["recall"]["mqar"]) == 5 and len(result["recall"]["passkey"]) == len(PASSKEY_CELLS)
    for grid in result["recall"].values():
        for cell in grid.values():
            assert cell["model"] == cell["teacher"]
    printed = capsys.readouterr().out
    assert "| python-stdlib | 254 |" in printed and "| passkey (accuracy) | model | teacher |" in printed


def test_a_gsa_conversion_is_scored_against_its_teacher(tmp_path):
    convert("tiny-random-llama", tmp_path / "cnv", ConversionOptions(window_size=8), log=lambda *_: None)
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "cnv"), "--teacher", "tiny-random-llama", "--corpus", "english-prose",
                 "--seq-len", "64", "--max-rows", "2", "--branches", "--out", str(out)]) == 0
    e = json.loads(out.read_text())["corpora"]["english-prose"]
    assert e["model"] != e["teacher"] and abs(e["ratio"] - e["model"] / e["teacher"]) < 1e-12
    assert {"gsa_only", "window_only"} <= set(e)  # the window hybrid's branch ablations


def test_unknown_task_is_a_one_line_error(tmp_path, capsys):
    assert main(["eval", "tiny-random-llama", "--tasks", "ppl,mmlu"]) == 2
    assert "unknown eval task(s) ['mmlu']" in capsys.readouterr().err


def test_recall_probes_score_the_answer_tokens():
    tok = byte_level_tokenizer()
    ids, spans = mqar_example(tok, 16, 100, random.Random(0))
    text = tok.decode(ids)
    pairs = dict(re.findall(r"(\w+): (\d+)\n", text.split("Now the numbers again.")[0]))
    assert len(pairs) == 16 and len(spans) == 16
    for a, b in spans:  # each span is the number of the word queried just before it
        word = tok.decode(ids[:a]).rsplit("\n", 1)[-1].rstrip(":")
        assert tok.decode(ids[a:b]) == " " + pairs[word]
    ids, spans = passkey_example(tok, 600, 0.5, random.Random(1))
    text = tok.decode(ids)
    key = re.search(r"The pass key is (\d{5})\.", text).group(1)
    assert tok.decode(ids[spans[0][0]:spans[0][1]]) == " " + key and abs(len(ids) - 600) < 120
    assert 0.3 < text.index(key) / len(text) < 0.7  # hidden half way through the filler
