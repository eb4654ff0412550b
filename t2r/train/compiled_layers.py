"""``model.compile``: each decoder layer of a finetune run's models compiled with ``torch.compile``.

A small model's training step is a few thousand short kernels (norms, SwiGLU, residuals, LoRA's
matmuls and casts, the gate math), each launched from Python; on a GPU the step waits on those
launches more than on the math. Compiling each decoder layer fuses the elementwise work between the
matmuls into a few generated kernels. The layers are compiled one by one ("regional" compilation):
they share one code object, so a model of any depth compiles a layer once, in seconds, and recompiles
only for a new shape or mode (train, eval, attention transfer).

The GSA and GLA kernel calls stay outside the compiled graphs (``torch.compiler.disable`` on the
layers' operator calls): they are hand-written Triton kernels already, and torch.compile leaves them
to run as they are. Only the forward the modules call changes, on these module objects, for this run:
the weights, state-dict names, saved folders and exported code stay plain torch.
"""
from __future__ import annotations

import torch

from ..errors import T2RError

COMPILE_CHOICES = ("auto", "always", "off")
RECOMPILE_LIMIT = 64


def resolve_compile(choice: str, device, sharded: bool = False, checkpointing: bool = False) -> tuple[bool, str]:
    """(whether a run compiles its decoder layers; why, in words) for ``model.compile``. ``auto`` (YAML's
    true) compiles on CUDA only: on a CPU the compile time outweighs a short run; ``always`` on any device.
    Under FSDP (``sharded``) ``auto`` stays eager (not timed on GPUs) and ``always`` compiles: it gave DDP's
    losses under FSDP2 on CPUs (``scripts/check_fsdp.sh --cpu --set model.compile=always``). With gradient
    checkpointing (``checkpointing``) ``auto`` stays eager: compiled layers train there (on an H100 too)
    but measured no faster (Mistral-7B shapes, 8 x 2048: 12,351 tok/s against 12,479 eager); ``always``
    compiles them."""
    device = torch.device(device)
    if choice not in COMPILE_CHOICES:
        raise T2RError(f"model.compile must be one of {', '.join(COMPILE_CHOICES)}, got {choice!r}")
    if choice == "off":
        return False, "model.compile: off"
    if sharded and choice == "auto":
        return False, "model.compile: auto, under FSDP"
    if choice == "auto" and device.type != "cuda":
        return False, f"model.compile: auto, not on CUDA ({device.type})"
    if choice == "auto" and checkpointing:
        return False, "model.compile: auto, with gradient checkpointing (no faster there; always compiles)"
    return True, f"model.compile: {choice}, on {device.type}"


def decoder_layer_classes(model: torch.nn.Module) -> tuple[type, ...]:
    """The decoder layer classes of ``model`` (a t2r model, a transformers teacher, or either under peft):
    those its transformers classes name in ``_no_split_modules``."""
    names = set()
    for module in model.modules():
        names.update(getattr(type(module), "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile every decoder layer of ``model`` in place (``nn.Module.compile``); how many."""
    classes = decoder_layer_classes(model)
    if not classes:
        raise T2RError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); "
                       "set model.compile: off")
    layers = [m for m in model.modules() if isinstance(m, classes)]
    # one compiled variant per layer kind (GSA, softmax), mode (training, attention transfer, the teacher's
    # forward with the adapters off, evaluation) and whether the layer's input needs a gradient (not the
    # first layer's, under frozen embeddings): more than dynamo's default of 8 a function, past which it
    # would run the rest eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
