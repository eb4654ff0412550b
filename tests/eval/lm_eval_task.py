"""A local lm-evaluation-harness task for the tests: multiple choice over a jsonl file (no Hub access)."""

MC_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def multiple_choice_task(name: str, data) -> str:
    """The YAML of task ``name`` over ``data`` (jsonl rows {question, choices, answer})."""
    return MC_TASK.format(name=name, data=data)
