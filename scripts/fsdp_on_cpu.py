"""``t2r`` with accelerate's FSDP on CPU processes joined over gloo, for checking t2r's FSDP logic
(sharded precision, stage freezing, gathered state dicts, resume) on a machine without GPUs.

accelerate turns an FSDP config into plain multi-CPU data parallelism (DDP over gloo) when there is
no GPU, and t2r refuses an FSDP config there (it would not shard). This launcher lifts both gates for one process:
torch's FSDP2 (``fully_shard``) then shards the model over the gloo group as it would over NCCL.
bf16 compute, NCCL and GPU memory are not covered. Used by ``scripts/check_fsdp.sh OUT --cpu``:

    accelerate launch --config_file configs/accelerate/fsdp-2gpu.yaml scripts/fsdp_on_cpu.py finetune CONFIG ...
"""
import os
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`
_accelerator_state_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _accelerator_state_init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = self.distributed_type
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()


if __name__ == "__main__":
    import t2r.train.loop as loop
    from t2r.cli import main

    AcceleratorState.__init__ = _fsdp_on_cpu
    loop.check_fsdp_has_cuda = lambda: None
    sys.exit(main())
