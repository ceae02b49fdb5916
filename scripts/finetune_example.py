"""Fine-tune LLaVA-NeXT with a plain PyTorch loop: synthetic "what colour is this image?" samples.

No trainer framework: build_labels turns conversations into inputs + labels (only the answers
are supervised), AdamW takes parameter groups by hub name, the model returns its own loss.
At the end the model is saved with save_pretrained, reloaded, and its loss must be unchanged.

    # a tiny random model (hidden 64) with the Mistral tokenizer: runs in seconds on a laptop CPU
    python scripts/finetune_example.py --tokenizer ../shared/fixtures/tokenizers/mistral_7b_v0.1_tokenizer.model
    # any llava-hf checkpoint folder (model + processor files)
    python scripts/finetune_example.py --model path/to/llava-v1.6-mistral-7b-hf --projector-only
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from llava_next import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor  # noqa: E402
from llava_next.image_processing import LlavaNextImageProcessor  # noqa: E402
from llava_next.tokenizer import AddedToken, LlavaNextTokenizer  # noqa: E402
from llava_next.training import build_labels, parameter_groups, projector_only  # noqa: E402

COLOURS = {"Red": (220, 30, 30), "Green": (30, 200, 40), "Blue": (30, 40, 220), "Yellow": (240, 230, 20),
           "White": (250, 250, 250), "Black": (5, 5, 5)}
DEFAULT_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures",
                                 "tokenizers", "mistral_7b_v0.1_tokenizer.model")
TILE = 56  # 4x4 patches of 14 px: the real anyres arithmetic at a toy size
TINY = {
    "image_token_index": 32000, "vision_feature_layer": -2,
    "image_grid_pinpoints": [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]],
    "vision_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          image_size=TILE, patch_size=14),
    "text_config": dict(model_type="mistral", vocab_size=32064, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                        rms_norm_eps=1e-5, rope_theta=1e6, pad_token_id=32001),
}


def tiny_model_and_processor(tokenizer_file):
    """A random tiny model (our constructor initialises it) and a processor for its geometry."""
    if not os.path.isfile(tokenizer_file):
        sys.exit(f"no tokenizer at {tokenizer_file}: pass --tokenizer (a Llama/Mistral sentencepiece "
                 "tokenizer.model) or --model (a checkpoint folder)")
    model = LlavaNextForConditionalGeneration(LlavaNextConfig.from_dict(TINY))
    tokenizer = LlavaNextTokenizer(tokenizer_file, pad_token="<pad>",
                                   added_tokens={32000: AddedToken("<image>"), 32001: AddedToken("<pad>")})
    images = LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size=TILE,
                                     image_grid_pinpoints=TINY["image_grid_pinpoints"])
    return model, LlavaNextProcessor(images, tokenizer, patch_size=14, chat_format="mistral")


def samples(rng):
    """One conversation and one solid-colour square image of a random size per colour."""
    conversations, images = [], []
    for name, rgb in COLOURS.items():
        side = rng.integers(24, 57)  # one 56-px tile: 36 image tokens
        images.append([np.full((side, side, 3), rgb, np.uint8)])
        conversations.append([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this image?"}]},
            {"role": "assistant", "content": f"{name}."},
        ])
    return conversations, images


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (model + processor files); default: a tiny random model")
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer.model for the tiny random model")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--projector-only", action="store_true", help="LLaVA's stage 1: train only the projector")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--out", help="where to save the fine-tuned model (default: a temporary folder, removed at exit)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    if args.model:
        model = LlavaNextForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
        processor = LlavaNextProcessor.from_pretrained(args.model)
    else:
        model, processor = tiny_model_and_processor(args.tokenizer)
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    conversations, images = samples(np.random.default_rng(args.seed))
    batch = build_labels(processor, conversations, images=images).to(model.device)
    print(f"{len(conversations)} samples, {batch['input_ids'].shape[1]} tokens each (padded), "
          f"{int((batch['labels'] != -100).sum())} supervised")

    if args.projector_only:
        groups = projector_only(model, lr=args.lr)
    else:  # everything trains; the vision tower more gently, as in LLaVA-NeXT's second stage
        groups = parameter_groups(model, {"vision_tower.*": args.lr / 10}, default_lr=args.lr, weight_decay=0.0)
    optimizer = torch.optim.AdamW(groups)
    print("trainable:", ", ".join(f"{sum(p.numel() for p in g['params']):,} params at lr {g['lr']:g}"
                                  for g in groups))

    loop_start = time.perf_counter()
    for step in range(args.steps):
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        print(f"step {step:3d}  loss {loss.item():.4f}")

    print(f"{args.steps} steps in {time.perf_counter() - loop_start:.1f} s")

    scratch = None if args.out else tempfile.TemporaryDirectory(prefix="llava_next_finetune_")  # removed at exit
    out = args.out or scratch.name
    model.save_pretrained(out)
    processor.save_pretrained(out)
    model.eval()
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(out, dtype=torch.float32).to(model.device)
    with torch.no_grad():
        before, after = model(**batch).loss.item(), reloaded(**batch).loss.item()
    print(f"saved to {out}; reloaded: loss {after:.6f} (before saving: {before:.6f})")
    if abs(after - before) > 1e-5:
        sys.exit("the reloaded model's loss differs from the trained model's")

    # What did it learn? Greedy answers for the training images.
    prompts = [[m for m in c if m["role"] == "user"] for c in conversations]
    inputs = processor(text=[processor.apply_chat_template(p, add_generation_prompt=True) for p in prompts],
                       images=images, padding=True)
    new = reloaded.generate(**inputs.to(model.device), max_new_tokens=4, do_sample=False)
    answers = processor.batch_decode(new[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print("answers:", ", ".join(f"{c}->{a.strip()!r}" for c, a in zip(COLOURS, answers)))
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
