from transformers import AutoConfig, AutoModelForCausalLM

from .cache import T2RCache
from .configuration_t2r import T2RConfig
from .modeling_t2r import T2RForCausalLM, T2RModel, output_cache

# Loading t2r's models registers the model type, so converted folders load with plain from_pretrained.
AutoConfig.register(T2RConfig.model_type, T2RConfig, exist_ok=True)
AutoModelForCausalLM.register(T2RConfig, T2RForCausalLM, exist_ok=True)

__all__ = ["T2RCache", "T2RConfig", "T2RForCausalLM", "T2RModel", "output_cache"]
