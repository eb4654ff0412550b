"""``T2RLM``: lm-evaluation-harness's model ``t2r`` (``lm_eval.simple_evaluate(model="t2r", ...)``
once this module is imported), for any model ``t2r eval`` loads.

It is lm-eval's ``HFLM`` with t2r's loader in front: a converted folder, a finetune run's output
folder (its ``model/``), an export, or a teacher (alias, Hub id, folder, .gguf) run through t2r's
softmax-only conversion with ``teacher=True``. Scoring is HFLM's teacher-forced forward, right-padded
in batches: the model is causal, so the padding after a row's last token changes none of that row's
log-probabilities (GSA states and softmax windows only look back). Generation is HFLM's
left-padded ``model.generate``, which on a converted model carries each GSA layer's recurrent state
and masks the padding out of it, so a batch decodes like each prompt alone.
"""
from __future__ import annotations

import logging

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM


def _flag(value) -> bool:
    """model_args come as strings from lm-eval's command line: 'True', 'false', '1'."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


@register_model("t2r")
class T2RLM(HFLM):
    def __init__(self, pretrained, tokenizer=None, teacher=False, device: str | None = None, dtype: str = "auto",
                 batch_size: int | str = 1, max_length: int | None = None, **kwargs):
        """``pretrained``: a path / alias / Hub id for t2r's loader, or an already loaded model (then
        ``tokenizer`` is needed). ``dtype``: auto | fp32 | bf16 | fp16, as ``t2r eval --dtype``."""
        self.source = pretrained if isinstance(pretrained, str) else getattr(pretrained.config, "_name_or_path", "")
        if isinstance(pretrained, str):
            from ..generation import pick_device
            from .command import load_model_any

            pretrained, loaded_tokenizer = load_model_any(pretrained, pick_device(device), dtype,
                                                          teacher=_flag(teacher))
            tokenizer = tokenizer or loaded_tokenizer
        if tokenizer is None:
            raise ValueError("T2RLM: pass the tokenizer with an already loaded model")
        hf_logger = logging.getLogger("lm_eval.models.huggingface")
        level = hf_logger.level
        hf_logger.setLevel(logging.ERROR)  # HFLM warns that a loaded model skips its own loading: that is the point
        try:
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                             max_length=max_length, **kwargs)
        finally:
            hf_logger.setLevel(level)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits of a right-padded batch, teacher-forced, without building a decoding cache."""
        with torch.no_grad():
            return self.model(input_ids=inps, use_cache=False).logits

    def get_model_info(self) -> dict:
        """What lm-eval records about the model, without asking the Hub about a local source."""
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype), "t2r_source": str(self.source)}
