"""How many steps a decoder from scratch takes to learn the demo's existence questions, by init scale.

    python bench/exist_init_scale.py --init-std 0.02 0.1 [--steps 600] [--batch 32] [--lr 1e-3]

The demo's "Is there a red shape?" has no first-order signal: neither the question nor the image
tells the answer alone, only whether the question's word matches one of the image tokens. A model
from scratch has to leave a saddle to learn that match, and how long it sits there depends on the
scale of its initial weights (the attention logits of a fresh model are about std^2 times the
width: near zero at the usual 0.02). This measures that in isolation, with the tower taken out: each
of the 4 image tokens is an MLP of an exact one-hot of its cell's kind and color (or zeros for an
empty cell), the question is "is there a <kind> ?" or "is there a <color> shape ?" with yes and no
equally likely, and a Hugging Face LLaMA of the demo decoder's shape (4 layers of 128, 8 heads, 4
query groups, ffn 344) predicts the answer after the prompt. Every init scale trains on the same
batches. It prints the training loss and accuracy (on each fresh batch, so also held out) every 50
steps; 0.693 and 0.5 are chance. Results are in docs/performance.md ("The demo on CPU").
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

KINDS, COLORS, CELLS, HIDDEN = 4, 6, 4, 128
WORDS = ["<s>", "is", "there", "a", "shape", "?", "[/INST]", "yes", "no",
         *(f"kind{i}" for i in range(KINDS)), *(f"color{i}" for i in range(COLORS))]
TOKEN = {word: index for index, word in enumerate(WORDS)}


def scene_and_question(rng: random.Random) -> tuple[torch.Tensor, list[int], bool]:
    """One example: cell features `[CELLS, KINDS + COLORS]` (one to three filled cells), the question's
    token ids and whether the answer is yes."""
    cells = torch.zeros(CELLS, KINDS + COLORS)
    kinds, colors = set(), set()
    for cell in rng.sample(range(CELLS), rng.randint(1, 3)):
        kind, color = rng.randrange(KINDS), rng.randrange(COLORS)
        cells[cell, kind] = cells[cell, KINDS + color] = 1
        kinds.add(kind)
        colors.add(color)
    yes = rng.random() < 0.5
    forms = [("kind", KINDS, kinds), ("color", COLORS, colors)]
    rng.shuffle(forms)
    for form, count, present in forms:  # three kinds can leave no absent one; a color always is
        choices = [v for v in range(count) if (v in present) == yes]
        if choices:
            value = rng.choice(choices)
            words = [f"kind{value}", "?"] if form == "kind" else [f"color{value}", "shape", "?"]
            return cells, [TOKEN[w] for w in ("is", "there", "a", *words)], yes
    raise AssertionError("unreachable: at most three of six colors are present")


def batch(rng: random.Random, size: int) -> list[tuple[torch.Tensor, list[int], bool]]:
    return [scene_and_question(rng) for _ in range(size)]


def train(init_std: float, args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=HIDDEN, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=32,
                         initializer_range=init_std)
    model = LlamaForCausalLM(config)
    projector = torch.nn.Sequential(torch.nn.Linear(KINDS + COLORS, HIDDEN), torch.nn.GELU(),
                                    torch.nn.Linear(HIDDEN, HIDDEN))
    params = [*model.parameters(), *projector.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    rng = random.Random(args.seed)  # the same batches for every init scale
    embed = model.get_input_embeddings()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / 20)
        examples = batch(rng, args.batch)
        # [image tokens] after <s>, then the question and [/INST], left-padded to one length.
        rows = [torch.cat([embed(torch.tensor([TOKEN["<s>"]])), projector(cells),
                           embed(torch.tensor([*question, TOKEN["[/INST]"]]))]) for cells, question, _ in examples]
        length = max(len(row) for row in rows)
        inputs = torch.zeros(len(rows), length, HIDDEN)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            inputs[i, length - len(row):], mask[i, length - len(row):] = row, 1
        answers = torch.tensor([TOKEN["yes"] if yes else TOKEN["no"] for _, _, yes in examples])
        logits = model(inputs_embeds=inputs, attention_mask=mask).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, answers)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 50 == 0:
            said_yes = logits[:, TOKEN["yes"]] > logits[:, TOKEN["no"]]
            accuracy = (said_yes == (answers == TOKEN["yes"])).float().mean().item()
            print(f"init std {init_std:g} step {step:>5}: loss {loss.item():.3f} accuracy {accuracy:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init-std", type=float, nargs="+", default=[0.02, 0.1])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for init_std in args.init_std:
        train(init_std, args)


if __name__ == "__main__":
    main()
