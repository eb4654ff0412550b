"""lm-evaluation-harness tasks in ``t2r eval``: ``--tasks lm-eval:commonsense`` or ``lm-eval:piqa,arc_easy``.

A ``--tasks`` item starting with ``lm-eval:`` names a harness task, a preset (``commonsense``,
``mmlu``) or a task YAML file; the items after it are harness tasks too, up to the next of t2r's own
(``ppl``, ``mqar``, ``passkey``). Each model runs through :class:`t2r.eval.lm_eval_model.T2RLM`.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from ..errors import T2RError

PREFIX = "lm-eval:"
PRESETS = {"commonsense": ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai"),
           "mmlu": ("mmlu",)}
MISSING = "lm-eval tasks need lm-evaluation-harness, which is not installed: pip install 't2r[lm-eval]'"


def split_tasks(items, own: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(t2r's own tasks, harness task specs with presets expanded, in order, once each)."""
    ours, specs, harness = [], [], False
    for item in items:
        if item.startswith(PREFIX):
            harness, item = True, item[len(PREFIX):].strip()
            if not item:
                raise T2RError(f"--tasks {PREFIX} names no task; e.g. {PREFIX}commonsense or {PREFIX}piqa,arc_easy")
        elif item in own or not harness:
            harness = False
            ours.append(item)
            continue
        specs += [s for s in PRESETS.get(item, (item,)) if s not in specs]
    return ours, specs


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise T2RError(MISSING) from None


def _is_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def task_manager(specs: list[str], limit: int | None = None, num_fewshot: int | None = None):
    """lm-eval's task index (None without ``specs``), checked against ``specs`` and with their data
    sets loaded once, so a wrong name or an unreachable data set fails before any model loads."""
    for flag, value, least in (("--lm-eval-limit", limit, 1), ("--lm-eval-fewshot", num_fewshot, 0)):
        if value is not None and not specs:
            raise T2RError(f"{flag} applies to lm-eval tasks; add them (--tasks lm-eval:commonsense) or drop {flag}")
        if value is not None and value < least:
            raise T2RError(f"{flag} must be at least {least}, got {value}")
    if not specs:
        return None
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    for spec in filter(_is_file, specs):
        if not Path(spec).is_file():
            raise T2RError(f"lm-eval task file {spec} does not exist; give the path of a task YAML")
    manager = TaskManager(include_defaults=not all(map(_is_file, specs)))  # the default index takes seconds
    for spec in specs:
        if not _is_file(spec) and spec not in manager.all_tasks:
            near = difflib.get_close_matches(spec, manager.all_tasks, n=3)
            raise T2RError(f"lm-eval task {spec!r} is unknown" + (f" (did you mean {', '.join(near)}?)" if near else "")
                           + f"; presets: {', '.join(PRESETS)}; all tasks: lm-eval ls tasks")
    _loading(manager.load, specs)
    return manager


def _loading(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ConnectionError as e:  # datasets: "Couldn't reach 'baber/piqa' on the Hub (...)"
        raise T2RError(f"lm-eval: {e}. The task's data set is fetched from the Hugging Face Hub once and cached: run "
                       "where the Hub is reachable first (or set HF_DATASETS_CACHE to a cache that has it)") from None


def _top_level(results: dict) -> list[str]:
    """The tasks and groups asked for: not the subtasks a group reports beside itself."""
    inside = {t for subtasks in results.get("group_subtasks", {}).values() for t in subtasks}
    return [name for name in results["results"] if name not in inside]


def _accuracy(scores: dict) -> tuple[str, float] | None:
    """'acc' where the task has it, else its first reported number (exact_match, ...)."""
    metrics = {k.split(",")[0]: v for k, v in scores.items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    if "acc" in metrics:
        return "acc", float(metrics["acc"])
    return next(((k, float(v)) for k, v in metrics.items()), None)


def _dataset(results: dict, name: str) -> str | None:
    """The Hub data set a task (or every task of a group) reads, for the model card."""
    leaves = results.get("group_subtasks", {}).get(name) or [name]
    paths = {(results.get("configs", {}).get(t) or {}).get("dataset_path") for t in leaves}
    path = paths.pop() if len(paths) == 1 else None
    return path if isinstance(path, str) and path.count("/") == 1 and not path.startswith((".", "/", "~")) else None


def harness_scores(model, tokenizer, specs: list[str], manager, batch_size: int = 1, limit: int | None = None,
                   num_fewshot: int | None = None) -> dict[str, dict]:
    """{task: {"metric": "acc", "value": 0.61, "dataset": "baber/piqa"}} for each task or group asked for."""
    from lm_eval import simple_evaluate

    from .lm_eval_model import T2RLM

    lm = T2RLM(model, tokenizer=tokenizer, batch_size=batch_size)
    out = _loading(simple_evaluate, lm, tasks=list(specs), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                   bootstrap_iters=0, log_samples=False)
    scores = {}
    for name in _top_level(out):
        found = _accuracy(out["results"][name])
        if found:
            scores[name] = {"metric": found[0], "value": found[1], "dataset": _dataset(out, name)}
    return scores
