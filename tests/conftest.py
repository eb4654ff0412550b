import pytest
import torch

import t2r  # noqa: F401  (registers the t2r model type)
from t2r.convert import ConversionOptions, convert_model
from t2r.tiny import tiny_teacher


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def converted(family="llama", seed=0, teacher_overrides=None, dtype=torch.float32, **options):
    """(teacher, converted model, tokenizer): the teacher is rebuilt, since conversion takes its tensors."""
    teacher, tok = tiny_teacher(family, seed=seed, **(teacher_overrides or {}))
    source = tiny_teacher(family, seed=seed, **(teacher_overrides or {}))[0].to(dtype)
    return teacher.to(dtype), convert_model(source, ConversionOptions(**options)), tok
