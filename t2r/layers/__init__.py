from .attention import AttentionContext, SoftmaxAttention
from .gla import GatedLinearAttention
from .gsa import GatedSlotAttention, slot_gates

__all__ = ["AttentionContext", "SoftmaxAttention", "GatedSlotAttention", "GatedLinearAttention", "slot_gates"]
