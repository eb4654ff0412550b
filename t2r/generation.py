"""``t2r generate``: load a converted model (a folder, or its Hub id) or any causal LM and stream a completion;
and ``static_generate``, the fast decoding loop of a converted model (prefill through the chunk kernel,
then one CUDA-graphed step per token on a ``T2RStaticCache``)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .errors import T2RError


def pick_device(device: str | None = None) -> torch.device:
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise T2RError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise T2RError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise T2RError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                       f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def check_request(prompt: str, max_new_tokens: int, temperature: float) -> None:
    """The generation arguments, checked before any model is loaded."""
    if not prompt:
        raise T2RError("--prompt is empty; give the text to continue, e.g. --prompt 'Once upon a time'")
    if max_new_tokens < 1:
        raise T2RError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise T2RError(f"--temperature must be 0 (greedy) or positive, got {temperature}")


def load_for_inference(model_dir: str | Path, device: str | None = None, dtype: str = "auto"):
    """(model, tokenizer) from a converted folder or the Hub id of a converted model (downloaded, or read
    from the cache when the Hub is unreachable), on ``device``, in eval mode. A teacher (alias, .gguf,
    or the Hub id of an unconverted model) runs as itself, through the softmax-only conversion."""
    import t2r  # noqa: F401  (registers the t2r model type)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .dtypes import loading_dtype
    from .hub import ALIASES, check_model_folder, converted_folder, hub_repo

    dev = pick_device(device)
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        folder = converted_folder(str(model_dir))
        if folder is not None:
            path = folder
        elif str(model_dir).lower() in ALIASES or path.suffix == ".gguf" or hub_repo(model_dir):
            from .eval.command import load_model_any

            return load_model_any(str(model_dir), dev, dtype, teacher=True)
        else:
            raise T2RError(f"{path} is not a model folder (no config.json); convert one first: t2r convert MODEL "
                           "--out DIR")
    check_model_folder(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=loading_dtype(dtype, dev), use_safetensors=True).to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def encode_prompt(tokenizer, prompt: str, chat: bool | None = None) -> dict:
    """Token ids for ``prompt``; through the chat template when the tokenizer has one (``chat=None``)."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise T2RError("--chat was given but this tokenizer has no chat template; drop --chat")
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)
    return tokenizer(prompt, return_tensors="pt")


def use_static_cache(model, static: bool | None) -> bool:
    """Whether to decode on a ``T2RStaticCache``: asked for (``static``), or by default on CUDA; only
    converted models (and teachers run through the softmax-only conversion) have one."""
    from .models import T2RForCausalLM

    if static is None:
        return isinstance(model, T2RForCausalLM) and model.device.type == "cuda"
    if static and not isinstance(model, T2RForCausalLM):
        raise T2RError(f"--static on: {type(model).__name__} is not a t2r model and has no static cache; "
                       "drop --static or give a converted model")
    return static


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool | None = None,
                  temperature: float = 0.0, stream: bool = True, static: bool | None = None) -> tuple[str, dict]:
    """Greedy (temperature 0) or sampled completion of ``prompt``; printed as it is made when ``stream``.
    ``static``: decode on a static cache (each step a CUDA graph on CUDA; None: on CUDA), through
    transformers' generate either way (the same sampling options).

    Returns the text and stats: new tokens, seconds, and the bytes of the cache at the end.
    """
    from transformers import TextStreamer

    from .models import output_cache

    check_request(prompt, max_new_tokens, temperature)
    enc = {k: v.to(model.device) for k, v in encode_prompt(tokenizer, prompt, chat).items()}
    if enc["input_ids"].shape[1] == 0:
        raise T2RError(f"--prompt {prompt!r} encodes to no tokens; give some text to continue")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    if use_static_cache(model, static):
        sampling["cache_implementation"] = "static"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.time()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=pad,
                             return_dict_in_generate=True, **sampling)
    new = out.sequences[0, enc["input_ids"].shape[1]:]
    cache = output_cache(out)
    stats = {"prompt_tokens": enc["input_ids"].shape[1], "new_tokens": len(new), "seconds": time.time() - start,
             "cache_bytes": cache.nbytes() if hasattr(cache, "nbytes") else None}
    return tokenizer.decode(new, skip_special_tokens=True), stats


@torch.no_grad()
def static_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 64, temperature: float = 0.0, eos_token_id=None, pad_token_id: int = 0,
                    cache=None, cuda_graph: bool = True, streamer=None) -> torch.Tensor:
    """New tokens [B, n <= max_new_tokens] of a converted model for left-padded prompts ``input_ids``
    [B, T]: the prompt runs in parallel (the chunk kernel) into a ``T2RStaticCache``, then each token is
    one step on it, replayed as a CUDA graph on CUDA (unless ``cuda_graph=False``). Greedy at
    temperature 0, else sampled from softmax(logits / temperature) (Gumbel-max). A row that has made
    ``eos_token_id`` (an id or a list) continues with ``pad_token_id``; the loop stops early when all
    have, checked every 16 tokens (the only host synchronisation besides ``streamer``, which is given
    each token [B] as it is made). ``cache``: a static cache to reuse (its buffers and captured graphs),
    emptied first; by default one for this batch and length.
    """
    from .models import T2RForCausalLM, T2RStaticCache
    from .models.step_graph import run_step

    if not isinstance(model, T2RForCausalLM):
        raise T2RError(f"static_generate needs a t2r model (T2RForCausalLM), got {type(model).__name__}")
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise T2RError(f"input_ids must be [batch, prompt length] with at least one token, "
                       f"got {tuple(input_ids.shape)}")
    check_request("x", max_new_tokens, temperature)
    B, T = input_ids.shape
    if cache is None:
        cache = T2RStaticCache(model.config, B, T + max_new_tokens, cuda_graph=cuda_graph)
    elif cache.max_length and T + max_new_tokens > cache.max_length:
        raise T2RError(f"{T} prompt + {max_new_tokens} new tokens do not fit the cache's max_length={cache.max_length}")
    cache.reset()
    eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, device=input_ids.device).view(-1)
    out = input_ids.new_full((B, max_new_tokens), pad_token_id)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    if streamer is not None:
        streamer.put(input_ids.cpu())  # transformers' streamers take the prompt first (and may skip it)
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1).logits[:, -1]
    for i in range(max_new_tokens):
        scores = logits.float()
        if temperature > 0:
            scores = scores / temperature - torch.empty_like(scores).exponential_().log()
        token = scores.argmax(-1)
        if eos is not None:
            token = torch.where(done, pad_token_id, token)
            done |= torch.isin(token, eos)
        out[:, i] = token
        if streamer is not None:
            streamer.put(token.cpu())
        if i + 1 == max_new_tokens or (eos is not None and (i + 1) % 16 == 0 and bool(done.all())):
            break
        logits = run_step(model, cache, token[:, None])[:, -1]
    if streamer is not None:
        streamer.end()
    return out[:, :i + 1]
