from .cache import T2RCache
from .configuration_t2r import T2RConfig
from .static_cache import T2RStaticCache
from .modeling_t2r import T2RForCausalLM, T2RModel, output_cache

__all__ = ["T2RCache", "T2RConfig", "T2RForCausalLM", "T2RModel", "T2RStaticCache", "output_cache"]
