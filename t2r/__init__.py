"""t2r: convert pretrained Transformers to Gated Slot Attention RNNs, finetune, export.

Importing t2r registers the converted model type ("t2r") with transformers' AutoConfig and
AutoModelForCausalLM, so converted folders load with plain ``from_pretrained``.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .models import T2RCache, T2RConfig, T2RForCausalLM, T2RModel, T2RStaticCache

__version__ = "0.1.0"

AutoConfig.register(T2RConfig.model_type, T2RConfig, exist_ok=True)
AutoModelForCausalLM.register(T2RConfig, T2RForCausalLM, exist_ok=True)

__all__ = ["T2RCache", "T2RConfig", "T2RForCausalLM", "T2RModel", "T2RStaticCache", "__version__"]
