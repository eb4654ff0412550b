"""``t2r export --eval-results FILE``: the scores ``t2r eval --out FILE`` wrote, for the model card: a
``model-index`` block in the Hub's metadata format (what the Hub shows as evaluation results) and a
table beside the teacher's. Local paths (a corpus file, a task's data) appear by their last part only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import T2RError
from ..hub import HUB_ID, public_name


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def scores(results: dict) -> list[dict]:
    """One row per scored data set: {dataset, type, metric, value, teacher, label}."""
    rows = []
    seq_len = results.get("seq_len")
    for corpus, e in (results.get("corpora") or {}).items():
        if isinstance(e, dict) and _number(e.get("model")):
            name = public_name(corpus)
            rows.append({"dataset": name, "type": name, "metric": "perplexity", "value": e["model"],
                         "teacher": e.get("teacher"), "label": f"perplexity ({seq_len}-token rows)" if seq_len
                         else "perplexity"})
    for task, e in (results.get("lm_eval") or {}).items():
        if isinstance(e, dict) and _number(e.get("model")):
            metric = str(e.get("metric") or "acc")
            dataset = e.get("dataset") if isinstance(e.get("dataset"), str) and HUB_ID.match(e["dataset"]) else None
            rows.append({"dataset": public_name(task), "type": dataset or public_name(task),
                         "metric": "accuracy" if metric == "acc" else metric, "value": e["model"],
                         "teacher": e.get("teacher"), "label": f"{metric} (lm-evaluation-harness)"})
    return rows


def read_eval_results(path) -> dict:
    """The JSON of ``t2r eval --out``, checked: one-line errors for a missing, unreadable or empty file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise T2RError(f"--eval-results {path}: no such file; write one with: t2r eval MODEL --teacher T --out FILE")
    try:
        results = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise T2RError(f"--eval-results {path} is not JSON ({e}); pass the file `t2r eval --out` wrote") from None
    if not isinstance(results, dict) or not scores(results):
        raise T2RError(f"--eval-results {path} holds no score of a model (t2r eval --out writes perplexities under "
                       "'corpora' and lm-eval accuracies under 'lm_eval'); pass the file `t2r eval --out` wrote")
    return results


def model_index(name: str, results: dict) -> list[dict]:
    """The ``model-index`` metadata: this model's scores (the teacher's are in the card's table)."""
    entries = [{"task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": {"name": r["dataset"], "type": r["type"]},
                "metrics": [{"type": r["metric"], "value": round(float(r["value"]), 4), "name": r["label"]}]}
               for r in scores(results)]
    return [{"name": name, "results": entries}]


def eval_table(results: dict) -> list[str]:
    def cell(row, who):
        v = row[who]
        if not _number(v):
            return "-"
        return f"{v:,.2f}" if row["metric"] == "perplexity" else f"{v:.1%}" if 0 <= v <= 1 else f"{v:,.4g}"

    lines = ["Scored with `t2r eval` beside the teacher on the same data (perplexity: lower is better):", "",
             "| data set | metric | this model | teacher |", "|---|---|---|---|"]
    return lines + [f"| {r['dataset']} | {r['label']} | **{cell(r, 'value')}** | {cell(r, 'teacher')} |"
                    for r in scores(results)]
