"""lm-evaluation-harness on t2r models (``t2r eval --tasks lm-eval:...``), on local tasks: the Hub's
data sets are out of reach here, so each task is a YAML over a jsonl file written by the test."""
import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from t2r.cli import main
from t2r.eval.harness import PRESETS, split_tasks
from t2r.tiny import tiny_teacher
from tests.eval.lm_eval_task import multiple_choice_task

QUESTIONS = [("The sky is", ["blue", "loud", "salty"], 0), ("Two plus two is", ["four", "green"], 0),
             ("Fish live in", ["trees", "the water"], 1), ("Snow is", ["hot", "cold", "purple"], 1),
             ("The sun rises in the", ["east", "north"], 0), ("A cat says", ["moo", "meow"], 1),
             ("Ice is made of", ["frozen water", "sand"], 0), ("At night the sky is", ["bright", "dark"], 1)]
GEN_TASK = """task: t2r_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (root / "mc.yaml").write_text(multiple_choice_task("t2r_tiny_mc", data))
    (root / "gen.yaml").write_text(GEN_TASK.format(data=data))
    # a GSA conversion with every kind of layer: GSA + a 4-token softmax window, and one softmax layer
    assert main(["convert", "tiny-random-llama", "--out", str(root / "cnv"), "--window-size", "4",
                 "--softmax-layers", "3"]) == 0
    teacher, tok = tiny_teacher("llama")
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    return root


def _run(lm, task_file, **kwargs):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(lm, tasks=[str(task_file)], task_manager=TaskManager(include_defaults=False),
                          bootstrap_iters=0, log_samples=True, **kwargs)
    name = next(iter(out["samples"]))
    return out["results"][name], out["samples"][name]


def _logliks(samples) -> list[float]:
    return [ll for s in sorted(samples, key=lambda s: s["doc_id"]) for ll, _ in s["filtered_resps"]]


def test_loglikelihoods_are_a_plain_forwards_batched_or_not(env):
    from t2r.eval.lm_eval_model import T2RLM

    one, samples = _run(T2RLM(str(env / "cnv"), device="cpu", batch_size=1), env / "mc.yaml")
    four, batched = _run(T2RLM(str(env / "cnv"), device="cpu", batch_size=4), env / "mc.yaml")
    model = AutoModelForCausalLM.from_pretrained(env / "cnv").eval()
    tok = AutoTokenizer.from_pretrained(env / "cnv")
    direct = []
    for question, choices, _ in QUESTIONS:
        for choice in choices:  # log p(" choice" | question), by one unpadded forward
            n = len(tok(question).input_ids)
            ids = tok(question + " " + choice).input_ids
            with torch.no_grad():
                logp = model(torch.tensor([ids]), use_cache=False).logits[0].log_softmax(-1)
            direct.append(sum(logp[i - 1, ids[i]].item() for i in range(n, len(ids))))
    assert len(direct) == 18
    assert _logliks(samples) == pytest.approx(direct, abs=1e-4)
    assert _logliks(batched) == pytest.approx(_logliks(samples), abs=1e-5)  # right padding changes nothing
    right, i = 0, 0
    for _, choices, answer in QUESTIONS:  # accuracy: the answer has the highest log-likelihood
        scores, i = direct[i:i + len(choices)], i + len(choices)
        right += scores.index(max(scores)) == answer
    assert one["acc,none"] == four["acc,none"] == right / 8


def test_generation_runs_the_models_generate_left_padded_batches_like_each_prompt_alone(env):
    from t2r.eval.lm_eval_model import T2RLM

    _, alone = _run(T2RLM(str(env / "cnv"), device="cpu", batch_size=1), env / "gen.yaml")
    _, batched = _run(T2RLM(str(env / "cnv"), device="cpu", batch_size=8), env / "gen.yaml")
    texts = [s["filtered_resps"][0] for s in sorted(alone, key=lambda s: s["doc_id"])]
    assert texts == [s["filtered_resps"][0] for s in sorted(batched, key=lambda s: s["doc_id"])]
    model = AutoModelForCausalLM.from_pretrained(env / "cnv").eval()
    tok = AutoTokenizer.from_pretrained(env / "cnv")
    for (question, _, _), text in zip(QUESTIONS, texts):
        ids = tok(question, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]


def test_t2r_eval_scores_model_and_teacher_and_the_teacher_matches_lm_evals_own_hf(env, tmp_path, capsys):
    from lm_eval.models.huggingface import HFLM

    from t2r.eval.lm_eval_model import T2RLM

    out = tmp_path / "eval.json"
    assert main(["eval", str(env / "cnv"), "--teacher", str(env / "teacher"), "--tasks",
                 f"lm-eval:{env / 'mc.yaml'}", "--batch-size", "3", "--device", "cpu", "--out", str(out)]) == 0
    entry = json.loads(out.read_text())["lm_eval"]["t2r_tiny_mc"]
    assert entry["metric"] == "acc" and {"model", "teacher"} <= set(entry)
    assert f"| t2r_tiny_mc | acc | {entry['model']:.1%} | {entry['teacher']:.1%} |" in capsys.readouterr().out
    hf, hf_samples = _run(HFLM(pretrained=str(env / "teacher"), device="cpu", dtype="float32"), env / "mc.yaml")
    assert entry["teacher"] == hf["acc,none"]
    _, ours = _run(T2RLM(str(env / "teacher"), teacher=True, device="cpu", batch_size=4), env / "mc.yaml")
    assert _logliks(ours) == pytest.approx(_logliks(hf_samples), abs=1e-4)


def test_task_list_syntax_and_bad_tasks_are_one_line_errors(tmp_path, capsys, monkeypatch):
    assert split_tasks(["ppl", "lm-eval:commonsense", "mmlu", "mqar", "lm-eval:piqa"], ("ppl", "mqar", "passkey")) \
        == (["ppl", "mqar"], list(PRESETS["commonsense"]) + ["mmlu"])
    for tasks, message in ((f"lm-eval:{tmp_path / 'missing.yaml'}", "missing.yaml does not exist"),
                           ("lm-eval:piqaa", "lm-eval task 'piqaa' is unknown (did you mean piqa"),
                           ("ppl,mmlu", "or lm-eval:TASK for lm-evaluation-harness tasks"),
                           ("lm-eval:", "names no task")):
        assert main(["eval", "tiny-random-llama", "--tasks", tasks]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["eval", "tiny-random-llama", "--lm-eval-limit", "5"]) == 2
    assert "--lm-eval-limit applies to lm-eval tasks" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    assert main(["eval", "tiny-random-llama", "--tasks", "lm-eval:commonsense"]) == 2
    err = capsys.readouterr().err
    assert "pip install 't2r[lm-eval]'" in err and err.count("\n") == 1
