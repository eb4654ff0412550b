"""``t2r eval MODEL [--teacher SRC] [--tasks ppl,mqar,passkey] [--corpus ...]``: a model beside its teacher.

MODEL is a converted folder, a finetune run's output folder (its ``model/``), an export, or any
supported checkpoint (alias, Hub id, local folder). The teacher is loaded as it is and run through
t2r's softmax-only conversion, which reproduces it exactly and honours packed-document
boundaries, so both score the same tokens under the same masks. Corpora: ``python-stdlib`` (the
modules a finetune holds out with ``held_out``), ``english-prose`` (the public-domain book a
finetune on english-prose holds out: The Adventures of Sherlock Holmes), or local files.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..dtypes import DTYPE_CHOICES, LOADING_HELP
from ..errors import T2RError
from ..train.run_folder import RunFolder

CORPUS_NAMES = ("python-stdlib", "english-prose")


def load_model_any(source: str, device, dtype: str = "auto", teacher: bool = False):
    """(model, tokenizer) from a t2r folder (or its Hub id), a run folder, or a teacher checkpoint (converted with
    every layer kept softmax, which reproduces it). ``teacher=True`` always takes the latter route."""
    import t2r  # noqa: F401  (registers the t2r model type)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..convert import ConversionOptions, convert_model, load_teacher
    from ..dtypes import loading_dtype
    from ..hub import converted_folder, resolve_model

    path = Path(source).expanduser()
    run = RunFolder(path)
    if run.summary.is_file() and run.model.is_dir():
        path = run.model
    torch_dtype = loading_dtype(dtype, device)
    folder = None if teacher else converted_folder(path)  # a t2r folder, or the Hub id of one (downloaded)
    if folder is not None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        teacher_model, tokenizer = load_teacher(resolve_model(str(source)), dtype)
        model = convert_model(teacher_model, ConversionOptions(softmax_layers="all"), source=str(source))
        if torch_dtype != "auto":
            model = model.to(torch_dtype)
    return model.to(device).eval(), tokenizer


def eval_rows(corpus: str, tokenizer, seq_len: int, max_rows: int, held_out: float = 0.05):
    """Packed rows of a corpus's held-out part, the same split a finetune with this ``held_out`` keeps
    out of training: python-stdlib's held-out modules, english-prose's held-out book, or local files
    (all of them)."""
    from ..train.config import DataConfig
    from ..train.data import load_documents, tokenize_and_pack

    if corpus in CORPUS_NAMES:
        cfg = DataConfig(dataset=corpus, held_out=held_out, seq_len=seq_len)
    else:
        cfg = DataConfig(files=[corpus], held_out=0, seq_len=seq_len)
    train, held = load_documents(cfg)
    docs = held if held is not None else train
    rows = tokenize_and_pack(docs, tokenizer, cfg, None)
    if len(rows) == 0:
        raise T2RError(f"{corpus}: its held-out text is shorter than one row of {seq_len} tokens; lower --seq-len")
    return list(rows.select(range(min(max_rows, len(rows)))))


TASKS = ("ppl", "mqar", "passkey")


def evaluate(model_src: str, teacher_src: str | None, corpora: list[str], seq_len: int = 2048, max_rows: int = 32,
             batch_size: int = 4, device: str | None = None, dtype: str = "auto", branches: bool = False,
             tasks: tuple[str, ...] = ("ppl",), samples: int = 3, log=print, lm_eval_limit: int | None = None,
             lm_eval_fewshot: int | None = None) -> dict:
    """Perplexities on each corpus (``ppl``) and in-context recall grids (``mqar``, ``passkey``) of the
    model and of its teacher on the same tokens; with ``branches``, a windowed model's GSA-only and
    window-only perplexities too; ``lm-eval:`` tasks (:func:`t2r.eval.harness.split_tasks`) score both
    through lm-evaluation-harness. Returns the JSON-able result."""
    import torch

    from ..generation import pick_device
    from .harness import harness_scores, split_tasks, task_manager
    from .perplexity import perplexity
    from .recall import MQAR_CELLS, PASSKEY_CELLS, recall_grid

    tasks, harness_specs = split_tasks(tasks, TASKS)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise T2RError(f"unknown eval task(s) {bad}; choose from {', '.join(TASKS)}, or lm-eval:TASK for "
                       "lm-evaluation-harness tasks (lm-eval:commonsense, lm-eval:mmlu, lm-eval:piqa,arc_easy)")
    manager = task_manager(harness_specs, lm_eval_limit, lm_eval_fewshot)
    dev = pick_device(device)
    result = {"model": str(model_src), "teacher": teacher_src, "seq_len": seq_len, "corpora": {}, "recall": {}}
    if manager is not None:
        result["lm_eval"] = {}
    rows = None
    for who, src in (("model", model_src), ("teacher", teacher_src)):
        if src is None:
            continue
        model, tokenizer = load_model_any(src, dev, dtype, teacher=who == "teacher")
        model.eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if "ppl" in tasks:
            rows = rows or {c: eval_rows(c, tokenizer, seq_len, max_rows) for c in corpora}
            variants = {who: {}}
            if who == "model" and branches and getattr(model.config, "window_size", 0):
                variants.update({"gsa_only": {"window": False}, "window_only": {"gsa": False}})
            for corpus, r in rows.items():
                entry = result["corpora"].setdefault(corpus, {})
                for name, switch in variants.items():
                    with model.window_branches(**switch) if switch else torch.no_grad():
                        entry[name], entry["tokens"] = perplexity(model, r, batch_size, pad, dev)
        for task, cells in (("mqar", MQAR_CELLS), ("passkey", PASSKEY_CELLS)):
            if task in tasks:
                grid = recall_grid(model, tokenizer, task, cells, samples, dev)
                for cell, acc in grid.items():
                    result["recall"].setdefault(task, {}).setdefault(cell, {})[who] = acc
        if manager is not None:
            scores = harness_scores(model, tokenizer, harness_specs, manager, batch_size, lm_eval_limit,
                                    lm_eval_fewshot)
            for task, s in scores.items():
                result["lm_eval"].setdefault(task, {"metric": s["metric"], "dataset": s["dataset"]})[who] = s["value"]
        del model
    for entry in result["corpora"].values():
        if "teacher" in entry:
            entry["ratio"] = entry["model"] / entry["teacher"]
    log(format_table(result))
    return result


def format_table(result: dict) -> str:
    cols = ["model", "gsa_only", "window_only", "teacher", "ratio"]
    present = [c for c in cols if any(c in e for e in result["corpora"].values())]
    lines = []
    if result["corpora"]:
        lines += ["| corpus | tokens | " + " | ".join(present) + " |", "|---" * (len(present) + 2) + "|"]
        for corpus, e in result["corpora"].items():
            cells = [f"{e[c]:.3f}" + ("x" if c == "ratio" else "") if c in e and math.isfinite(e[c]) else "-"
                     for c in present]
            lines.append(f"| {corpus} | {e['tokens']:,} | " + " | ".join(cells) + " |")
    for task, grid in result.get("recall", {}).items():
        lines += ["", f"| {task} (accuracy) | model | teacher |", "|---|---|---|"]
        for cell, e in grid.items():
            lines.append(f"| {cell} | " + " | ".join(f"{e[w]:.0%}" if w in e else "-" for w in ("model", "teacher"))
                         + " |")
    if result.get("lm_eval"):
        lines += ["", "| lm-eval task | metric | model | teacher |", "|---|---|---|---|"]
        for task, e in result["lm_eval"].items():
            lines.append(f"| {task} | {e['metric']} | " + " | ".join(f"{e[w]:.1%}" if w in e else "-"
                                                                     for w in ("model", "teacher")) + " |")
    return "\n".join(lines)


def run(args) -> int:
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    result = evaluate(args.model, args.teacher, args.corpus or list(CORPUS_NAMES), args.seq_len, args.max_rows,
                      args.batch_size, args.device, args.dtype, args.branches, tasks, args.samples,
                      lm_eval_limit=args.lm_eval_limit, lm_eval_fewshot=args.lm_eval_fewshot)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    """Add ``eval`` to the ``t2r`` command's subparsers."""
    p = subparsers.add_parser("eval", help="held-out perplexity of a model beside its teacher, on the same tokens")
    p.add_argument("model", help="converted folder, finetune output folder, export, or alias / Hub id / checkpoint")
    p.add_argument("--teacher", default=None, help="the teacher (alias, Hub id, folder) scored on the same rows")
    p.add_argument("--corpus", action="append", default=None,
                   help=f"{' or '.join(CORPUS_NAMES)} or a local file/glob; repeat for several (default: both)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default %(default)s)")
    p.add_argument("--max-rows", type=int, default=32, help="rows scored per corpus (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per forward (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help=LOADING_HELP)
    p.add_argument("--branches", action="store_true",
                   help="for a window hybrid, also score its GSA-only and window-only ablations")
    p.add_argument("--tasks", default="ppl", help="comma-separated: ppl (held-out perplexity), mqar (multi-query "
                   "associative recall), passkey (a number hidden in filler text), lm-eval:TASK[,TASK...] "
                   "(lm-evaluation-harness tasks, presets commonsense and mmlu, or a task YAML) (default %(default)s)")
    p.add_argument("--samples", type=int, default=3, help="contexts per mqar/passkey cell (default %(default)s)")
    p.add_argument("--lm-eval-limit", type=int, default=None, help="examples per lm-eval task (default: all)")
    p.add_argument("--lm-eval-fewshot", type=int, default=None,
                   help="few-shot examples per lm-eval question (default: each task's own)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=run)
