from .attention import AttentionContext, SoftmaxAttention
from .gsa import GatedSlotAttention, slot_gates

__all__ = ["AttentionContext", "SoftmaxAttention", "GatedSlotAttention", "slot_gates"]
