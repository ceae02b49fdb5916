"""Write a tiny random LLaVA-NeXT checkpoint folder in the llava-hf layout, with our own code.

The folder has everything `from_pretrained` reads (config.json, model.safetensors, tokenizer and
processor files), so the whole pipeline (processor, model, generate, CLI) runs offline. The
geometry is the real one (336 px tiles of 14 px patches, the llava-hf pinpoints); only the widths
are tiny, so the answers are random tokens.

    python scripts/make_tiny_checkpoint.py OUT_DIR --tokenizer path/to/tokenizer.model [--family mistral]
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llava_next.config import LlavaNextConfig  # noqa: E402
from llava_next.image_processing import LlavaNextImageProcessor  # noqa: E402
from llava_next.model import LlavaNextForConditionalGeneration  # noqa: E402
from llava_next.processing import LlavaNextProcessor  # noqa: E402
from llava_next.tokenizer import AddedToken, LlavaNextTokenizer  # noqa: E402

FIXTURE_TOKENIZERS = os.path.join(ROOT, "..", "shared", "fixtures", "tokenizers")
FAMILIES = {
    # text model_type, default tokenizer file, kv heads, pad token
    "mistral": ("mistral", "mistral_7b_v0.1_tokenizer.model", 2, "<pad>"),
    "vicuna": ("llama", "llama2_tokenizer.model", 4, "<unk>"),
}


def tiny_config(family: str) -> LlavaNextConfig:
    model_type, _, kv_heads, _ = FAMILIES[family]
    return LlavaNextConfig.from_dict({
        "model_type": "llava_next",
        "text_config": dict(model_type=model_type, vocab_size=32064, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                            max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=None,
                            pad_token_id=32001 if family == "mistral" else 0),
        "vision_config": dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=2, image_size=336, patch_size=14),
        "image_token_index": 32000,
    })


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write")
    ap.add_argument("--family", default="mistral", choices=list(FAMILIES))
    ap.add_argument("--tokenizer", default=None,
                    help="a sentencepiece tokenizer.model with 32000 pieces (default: the shared fixture)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    _, default_tok, _, pad = FAMILIES[args.family]
    tok_path = args.tokenizer or os.path.join(FIXTURE_TOKENIZERS, default_tok)
    if not os.path.isfile(tok_path):
        ap.error(f"tokenizer model {tok_path} not found; pass --tokenizer path/to/tokenizer.model")

    added = {32000: AddedToken("<image>")}
    if pad == "<pad>":
        added[32001] = AddedToken("<pad>")
    try:  # before anything is written: a bad tokenizer leaves no half-made folder
        tokenizer = LlavaNextTokenizer(tok_path, added_tokens=added, pad_token=pad)
    except (RuntimeError, OSError, ValueError) as e:
        ap.error(f"{tok_path} is not a sentencepiece tokenizer.model: {e}")
    if tokenizer.vocab_size != 32000:
        ap.error(f"{tok_path} has {tokenizer.vocab_size} pieces; the tiny config expects 32000")

    torch.manual_seed(args.seed)
    config = tiny_config(args.family)
    model = LlavaNextForConditionalGeneration(config)  # random weights
    model.save_pretrained(args.out)
    image_processor = LlavaNextImageProcessor(image_grid_pinpoints=config.image_grid_pinpoints)
    LlavaNextProcessor(image_processor, tokenizer, patch_size=config.vision_config.patch_size).save_pretrained(args.out)
    print(f"wrote a tiny random {args.family} checkpoint to {args.out}")


if __name__ == "__main__":
    main()
