"""The weights' dtypes by the short names that flags and configs use (``--dtype bf16``): one table. Importing this
module imports no torch (the command line's parser reads the names)."""
from __future__ import annotations

DTYPE_NAMES = ("fp32", "bf16", "fp16")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)  # auto: keep the dtype the weights were saved in
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    """The torch dtype a short name stands for; None for ``auto``."""
    if name == "auto":
        return None
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def short_name(torch_name: str | None) -> str:
    """The short name of a dtype as config.json spells it (``"bfloat16"`` -> ``"bf16"``); fp32 when unknown."""
    return {v: k for k, v in _TORCH_NAMES.items()}.get(str(torch_name or "").removeprefix("torch."), "fp32")


LOADING_HELP = "weights' dtype (auto: as saved on cuda, fp32 on cpu)"  # --dtype of the commands that load a model


def loading_dtype(name: str, device):
    """What ``from_pretrained`` gets for ``--dtype NAME`` on ``device``: the named dtype, or for ``auto`` the saved
    one on CUDA and fp32 on CPU (half precision is slow there)."""
    import torch

    return torch_dtype(name) or ("auto" if torch.device(device).type == "cuda" else torch.float32)
