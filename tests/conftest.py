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


def decode_token_by_token(model, ids, prefill: int):
    """Logits of ``ids`` from a prefill of its first ``prefill`` tokens and then one token a step through the
    cache, as ``generate`` runs a model; and the cache at the end."""
    from t2r.models import output_cache

    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(steps, 1), cache

