"""In-context recall probes for pretrained LMs, written as plain text (no trained toy model):

- ``mqar``: multi-query associative recall. A list of ``word: number`` pairs, optionally a stretch
  of filler text, then the same words queried in a new order with their numbers; a query counts as
  recalled when the model predicts every token of its number (teacher-forced: one forward per
  context scores all its queries). Cells: number of pairs x filler tokens between pairs and queries.
- ``passkey``: a five-digit pass key hidden at a depth (0 = start, 1 = end) of filler text of a given
  length, then asked for; recalled when every digit token is predicted. Cells: length x depth.

Both report accuracy per cell. A model whose memory is a fixed-size state loses the pairs or the key
as the context grows; the teacher's KV cache does not, which is what the grids show side by side.
"""
from __future__ import annotations

import random

import torch

WORDS = """apple river candle mirror garden pencil rocket window tiger violin marble castle ladder
button forest silver dragon pepper anchor basket camera desert feather guitar helmet island jacket
kettle lemon magnet needle orange parrot quartz rabbit saddle tomato umbrella valley walnut yogurt
zebra bridge cactus dolphin engine falcon glacier hammer iguana jungle koala lantern meadow nickel
oyster pillow quiver raven sponge tunnel unicorn velvet wagon yarn bamboo cobalt daisy ember fossil
goblet harbor ivory jigsaw kernel lotus mango nectar onion pebble quilt ribbon salmon thistle urchin
vapor willow bison clover donkey easel fabric gravel hazel insect jasmine kayak lagoon muffin
nutmeg otter puzzle raisin scarf tulip vessel wheat banjo cherry denim elbow fiddle ginger hornet
iris jelly kiwi lizard mitten noodle olive peach radish sailor tractor velcro walrus acorn beetle
copper domino eagle fern goose honey igloo juniper ketchup llama mustard nylon orchid penguin
quokka robin spruce turnip vinyl waffle yacht badger cedar dune emerald flute grape heron""".split()

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.\n")


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _filler(tokenizer, n_tokens: int) -> str:
    per = max(1, len(_tokens(tokenizer, FILLER)))
    return FILLER * max(0, n_tokens // per)


@torch.no_grad()
def _recalled(model, ids: list[int], spans: list[tuple[int, int]], device) -> list[bool]:
    """Teacher-forced: for each [start, end) span of answer tokens, whether argmax predicts all."""
    x = torch.tensor([ids], device=device)
    pred = model(x, use_cache=False).logits[0].argmax(-1).tolist()  # pred[t] guesses ids[t + 1]
    return [all(pred[t - 1] == ids[t] for t in range(a, b)) for a, b in spans]


def mqar_example(tokenizer, pairs: int, gap_tokens: int, rng: random.Random):
    """(token ids, answer spans) of one MQAR context."""
    if pairs > len(WORDS):
        raise ValueError(f"mqar: at most {len(WORDS)} pairs, got {pairs}")
    words = rng.sample(WORDS, pairs)
    values = {w: str(rng.randint(10, 99)) for w in words}
    ids = _tokens(tokenizer, "Remember the number given to each word.\n")
    for w in words:
        ids += _tokens(tokenizer, f"{w}: {values[w]}\n")
    if gap_tokens:
        ids += _tokens(tokenizer, _filler(tokenizer, gap_tokens) + "\n")
    ids += _tokens(tokenizer, "Now the numbers again.\n")
    spans = []
    for w in rng.sample(words, pairs):
        ids += _tokens(tokenizer, f"{w}:")
        answer = _tokens(tokenizer, f" {values[w]}")
        spans.append((len(ids), len(ids) + len(answer)))
        ids += answer + _tokens(tokenizer, "\n")
    return ids, spans


def passkey_example(tokenizer, length: int, depth: float, rng: random.Random):
    """(token ids, answer span) of one passkey context of about ``length`` tokens."""
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\nWhat is the pass key? The pass key is"
    budget = length - len(_tokens(tokenizer, PASSKEY_INTRO + needle + question)) - 8
    hay = _filler(tokenizer, max(0, budget))
    cut = int(len(hay) * depth)
    cut = hay.rfind(". ", 0, cut) + 2 if cut < len(hay) and hay.rfind(". ", 0, cut) >= 0 else cut
    ids = _tokens(tokenizer, PASSKEY_INTRO + hay[:cut] + needle + hay[cut:] + question)
    answer = _tokens(tokenizer, f" {key}")
    return ids + answer, [(len(ids), len(ids) + len(answer))]


def recall_grid(model, tokenizer, task: str, cells: list[tuple], samples: int, device, seed: int = 0) -> dict:
    """{cell name: accuracy} over ``samples`` contexts per cell (mqar: every query of each context)."""
    out = {}
    for cell in cells:
        rng = random.Random(f"{seed}-{task}-{cell}")
        hits = []
        for _ in range(samples):
            if task == "mqar":
                ids, spans = mqar_example(tokenizer, cell[0], cell[1], rng)
            else:
                ids, spans = passkey_example(tokenizer, cell[0], cell[1], rng)
            hits += _recalled(model, ids, spans, device)
        name = f"{cell[0]} pairs, +{cell[1]} filler" if task == "mqar" else f"{cell[0]} tokens, depth {cell[1]:g}"
        out[name] = sum(hits) / len(hits)
    return out


MQAR_CELLS = [(4, 0), (16, 0), (64, 0), (16, 512), (16, 2048)]
# up to 8k: SmolLM2's own context, four times the shipped recipes' training length
PASSKEY_CELLS = [(n, d) for n in (256, 1024, 4096, 8192) for d in (0.0, 0.5, 1.0)]
