"""How many operators one finetune step dispatches, and which lines of t2r call them: the host's side
of a small model's step time.

A GPU runs a small model's training step faster than the host can issue it: every operator costs the
host microseconds, whatever its size. This runs one finetune step of a config (the first finetune
stage's losses: next-token loss and KL to the teacher; LoRA as in `scripts/bench_e2e.py --smollm2`,
or all weights with --lora 0) under bf16 autocast and counts the aten operators it dispatches, views
left out: in total, by operator, and by the line of t2r (or of the GSA kernels' Python) that called
them ("other": autograd's backward, peft, torch). On a CUDA GPU the step runs there as a finetune
runs it (liger's losses and fused layers where they import); on a CPU the GSA kernels run in the
Triton interpreter, whose own operators are left out, and the losses and layers are torch's.
The counts hardly depend on the sequence length; the default is short. Some operators a CPU splits
into several are one on CUDA (F.rms_norm's forward), so a CPU's count is somewhat higher.

    python scripts/step_ops.py --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback

import torch

if not torch.cuda.is_available():  # before anything imports triton: our kernels' wrappers, interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("T2R_GSA_BACKEND", "triton")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# aliasing and allocation operators: no kernel of their own
FREE = {"view", "_unsafe_view", "as_strided", "reshape", "expand", "permute", "transpose", "t", "unsqueeze",
        "squeeze", "select", "slice", "detach", "alias", "split", "unbind", "chunk", "split_with_sizes",
        "_reshape_alias", "lift_fresh", "empty", "empty_strided", "empty_like", "new_empty",
        "new_empty_strided", "set_"}
OURS = (os.sep + "t2r" + os.sep, os.sep + "kernels" + os.sep)


class OpCounter(TorchDispatchMode):
    """Counts dispatched operators (FREE and the Triton interpreter's left out) by name and by caller."""

    def __init__(self):
        super().__init__()
        self.by_op, self.by_line = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in FREE:
            return out
        stack = traceback.extract_stack()
        if any(f.filename.endswith(os.path.join("triton", "runtime", "interpreter.py")) for f in stack):
            return out
        ours = [f for f in stack if any(p in f.filename for p in OURS) and "step_ops.py" not in f.filename]
        where = f"{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno}" if ours else "other"
        self.by_op[name] += 1
        self.by_line[where] += 1
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "smollm2-135m-gsa.yaml"))
    ap.add_argument("--model", default=None, help="model.source instead of the config's")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lora", type=int, default=8, help="LoRA rank (0: every weight trains, lora: null)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, as `t2r finetune --set` does (e.g. loss.fused=chunked)")
    ap.add_argument("--top", type=int, default=20, help="rows of each table")
    args = ap.parse_args(argv)

    from t2r.train.config import FinetuneStage, LoraConfig, load_config
    from t2r.train.fused_layers import resolve_fused_layers, use_fused_layers
    from t2r.train.losses import resolve_fused
    from t2r.train.stages import add_lora, frozen_teacher, load_model, lora_input_casts_off, set_trainable, \
        stage_loss_sum

    overrides = ([f"model.source={args.model}"] if args.model else []) + args.sets
    cfg = load_config(args.config, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(cfg.model, log=lambda msg: None)
    lora = LoraConfig(rank=args.lora) if args.lora else None
    stage = next(s for s in cfg.stages if isinstance(s, FinetuneStage)).model_copy(update={"lora": lora})
    teacher = frozen_teacher(model).to(device) if lora is None and stage.kl_weight > 0 else None
    if lora is not None:
        model = add_lora(model, lora)
    trained = set_trainable(model, stage)
    for name, p in model.named_parameters():  # as the finetune loop trains them: fp32 whatever the weights
        if name in trained:
            p.data = p.data.float()
    model.to(device).train()
    losses, _ = resolve_fused(cfg.loss.fused, device)
    layers, _ = resolve_fused_layers(cfg.model.fused_layers, device)
    if layers == "liger":
        for m in (model, teacher):
            if m is not None:
                use_fused_layers(m)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), device=device)
    batch = {"input_ids": ids, "labels": ids}

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16), lora_input_casts_off(model):
            loss, _ = stage_loss_sum(model, batch, stage, teacher, losses, cfg.loss.chunk_size)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # the first step compiles and caches: not counted
    counter = OpCounter()
    with counter:
        step()
    total = sum(counter.by_op.values())
    print(f"{cfg.model.source}: one finetune step, {args.batch} x {args.seq_len} tokens, "
          f"{'LoRA rank ' + str(args.lora) if lora else 'all weights'}, kl_weight {stage.kl_weight}, on {device.type} "
          f"(losses: {losses}, layers: {'liger' if layers == 'liger' else 'torch'})")
    print(f"{total} operators dispatched (views and allocations left out)\n")
    for title, counts in (("by operator", counter.by_op), ("by caller", counter.by_line)):
        print(f"{title}:")
        for key, n in counts.most_common(args.top):
            print(f"{n:8d} {n / total:6.1%}  {key}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
