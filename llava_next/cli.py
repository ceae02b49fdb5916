"""The `llava-next` command: `generate` answers one question about an image, `chat` talks.

    llava-next generate --image cat.jpg --prompt "What is shown in this image?"
    llava-next chat --image cat.jpg          (then type; /image PATH attaches another image)

Bad arguments print one line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

DEFAULT_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"
IMAGE_TOKEN = "<image>"
DTYPES = ["auto", "float32", "float16", "bfloat16"]


class UsageError(Exception):
    """A problem with what the user asked for: one line on stderr, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llava-next", description="LLaVA-NeXT in plain PyTorch: ask questions about images.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    common = Parser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint folder or hub id (default {DEFAULT_MODEL})")
    common.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights dtype; auto = float16 on CUDA, float32 on CPU")
    common.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    common.add_argument("--attn", default=None, choices=["auto", "eager", "sdpa", "triton"],
                        help="attention implementation (default auto: the Triton kernels on CUDA, sdpa on CPU)")
    common.add_argument("--max-new-tokens", type=int, default=512,
                        help="at most this many tokens per answer, never past the model's context, whatever the "
                             "checkpoint's generation config says (default 512)")
    # Sampling flags left out take the checkpoint's generation_config.json, else transformers' defaults.
    ckpt = "default: the checkpoint's generation_config.json, else"
    common.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                        help=f"sample instead of decoding greedily ({ckpt} greedy)")
    common.add_argument("--temperature", type=float, default=None, help=f"sampling temperature ({ckpt} 1.0)")
    common.add_argument("--top-k", type=int, default=None, help=f"sample from the k likeliest tokens, 0: all ({ckpt} 50)")
    common.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling mass ({ckpt} 1.0: off)")
    common.add_argument("--repetition-penalty", type=float, default=None, help=f"({ckpt} 1.0: off)")
    common.add_argument("--num-beams", type=int, default=None,
                        help=f"beam search over this many beams; the answer is printed when complete ({ckpt} 1)")
    common.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    common.add_argument("--prompt-format", default=None, choices=["mistral", "vicuna", "chatml"],
                        help="prompt template (default: the checkpoint's)")
    common.add_argument("--system", default=None, help="system message")
    common.add_argument("--no-cuda-graph", action="store_true",
                        help="on CUDA, decode without replaying each step as a CUDA graph (the graph is "
                             "used with the Triton kernels by default)")
    g = sub.add_parser("generate", parents=[common],
                       help="answer one prompt about an image (streams the answer, unless beam search)")
    g.add_argument("--image", action="append", default=[], help="image path or http(s) URL; repeatable")
    g.add_argument("--prompt", required=True, help="the question; the CLI places one <image> per --image itself")
    c = sub.add_parser("chat", parents=[common], help="interactive multi-turn chat; /image PATH attaches an image")
    c.add_argument("--image", action="append", default=[],
                   help="image path or http(s) URL for the first message; repeatable")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
        if args.command == "generate":
            return run_generate(args)
        return run_chat(args)
    except UsageError as e:
        print(f"llava-next: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def check_args(args) -> None:
    """Everything that can be checked before loading gigabytes."""
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature is not None and args.temperature <= 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_p is not None and not 0 <= args.top_p <= 1:
        raise UsageError(f"--top-p must be in [0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0: no top-k), got {args.top_k}")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise UsageError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.num_beams is not None and args.num_beams < 1:
        raise UsageError(f"--num-beams must be >= 1, got {args.num_beams}")
    for image in args.image:
        if not image.startswith(("http://", "https://")) and not os.path.isfile(image):
            raise UsageError(f"image file not found: {image}")
    if args.command == "generate" and IMAGE_TOKEN in args.prompt:
        raise UsageError(f"leave {IMAGE_TOKEN} out of --prompt: the CLI places one for each --image itself")
    from .hub import is_repo_id

    if os.path.isfile(args.model):
        raise UsageError(f"model {args.model!r} is a file; expected a checkpoint folder (the one holding "
                         "config.json) or a hub id")
    if not os.path.isdir(args.model) and not is_repo_id(args.model):
        raise UsageError(f"model {args.model!r}: no such folder, and not a hub id like {DEFAULT_MODEL}")
    device = args.device
    import torch

    if device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise UsageError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available here")
        if kind not in ("cpu", "cuda"):  # mps, xpu, meta, ...: never tried here
            raise UsageError(f"--device {device}: the CLI runs on cpu or cuda")
    if args.dtype == "auto":
        args.dtype = "float16" if args.device.startswith("cuda") else "float32"


def _user_error(fn, *args, **kwargs):
    """Run a loading step; its expected failures become one-line usage errors."""
    from .hub import HubError
    from .loading import CheckpointError

    try:
        return fn(*args, **kwargs)
    except (HubError, CheckpointError, OSError, ValueError) as e:
        raise UsageError(str(e).replace("\n", " ")) from None


def load_processor_and_config(args):
    from .config import LlavaNextConfig
    from .hub import resolve_folder
    from .processing import LlavaNextProcessor

    processor = _user_error(LlavaNextProcessor.from_pretrained, args.model, chat_format=args.prompt_format)
    folder = _user_error(resolve_folder, args.model, ["config.json"])
    config = _user_error(LlavaNextConfig.from_pretrained, folder)
    return processor, config


def load_model(args):
    import torch

    from .model import LlavaNextForConditionalGeneration

    model = _user_error(LlavaNextForConditionalGeneration.from_pretrained, args.model,
                        torch_dtype=getattr(torch, args.dtype), device_map=args.device,
                        attn_implementation=args.attn, progress=True)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    return model


def open_image(ref: str):
    from PIL import Image

    if ref.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(ref, timeout=30) as r:
                data = r.read()
        except OSError as e:
            raise UsageError(f"cannot download {ref}: {e}") from None
        try:
            return Image.open(io.BytesIO(data))
        except OSError:
            raise UsageError(f"{ref} is not an image") from None
    return ref  # a path: the processor opens it and names it in any error


def prepare(processor, config, conversation, images):
    """Model inputs for a conversation, refused before any compute when they exceed the context."""
    try:
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    except (ValueError, OSError) as e:  # an unknown prompt format, an unreadable image, ...
        raise UsageError(str(e).replace("\n", " ")) from None
    n, context = inputs["input_ids"].shape[1], config.text_config.max_position_embeddings
    if n >= context:
        raise UsageError(f"the prompt is {n} tokens, the model's context is {context}: use fewer or smaller images "
                         "or a shorter prompt")
    return inputs


def answer(processor, model, inputs, args) -> str:
    """Stream the reply to stdout (beam search: print it once complete) and return it."""
    from .generation import TextStreamer

    n, context = inputs["input_ids"].shape[1], model.config.text_config.max_position_embeddings
    beams = model.generation_config.value("num_beams", args.num_beams)
    # a beam's text is not final until the search ends, so beam search cannot stream
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if beams == 1 else None
    graph = False if args.no_cuda_graph else None  # None: generate()'s default, the graph on CUDA with Triton
    out = _user_error(model.generate, **inputs.to(model.device), max_new_tokens=min(args.max_new_tokens, context - n),
                      do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      repetition_penalty=args.repetition_penalty, num_beams=beams, streamer=streamer,
                      cuda_graph=graph, num_return_sequences=1,
                      return_dict_in_generate=False,  # whatever the checkpoint's config says
                      tokenizer=processor.tokenizer)  # for stop_strings in that config
    reply = processor.decode(out[0, n:], skip_special_tokens=True).strip()
    if streamer is None:
        print(reply, flush=True)
    return reply


def user_turn(text: str, n_images: int) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def with_system(conversation, system):
    return ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + conversation


def run_generate(args) -> int:
    images = [open_image(i) for i in args.image]
    processor, config = load_processor_and_config(args)
    inputs = prepare(processor, config, with_system([user_turn(args.prompt, len(images))], args.system), images)
    answer(processor, load_model(args), inputs, args)
    return 0


def run_chat(args) -> int:
    processor, config = load_processor_and_config(args)
    model = load_model(args)
    conversation, images = [], [open_image(i) for i in args.image]
    pending = len(images)  # images not yet placed in a user turn
    print("Chat with LLaVA-NeXT. /image PATH attaches an image to your next message, /reset starts over, "
          "/quit leaves.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            conversation, images, pending = [], [], 0
            continue
        if line.startswith("/image"):
            ref = line[len("/image"):].strip()
            if not ref or (not ref.startswith(("http://", "https://")) and not os.path.isfile(ref)):
                print(f"image file not found: {ref or '(none given)'}", file=sys.stderr)
                continue
            try:
                images.append(open_image(ref))
            except UsageError as e:
                print(e, file=sys.stderr)
                continue
            pending += 1
            continue
        if IMAGE_TOKEN in line:
            print(f"leave {IMAGE_TOKEN} out of your message: /image PATH attaches an image", file=sys.stderr)
            continue
        conversation.append(user_turn(line, pending))
        print("assistant> ", end="", flush=True)
        try:
            inputs = prepare(processor, config, with_system(conversation, args.system), images)
            reply = answer(processor, model, inputs, args)
        except UsageError as e:  # the turn is dropped; its images stay attached for the next try
            print(f"\nerror: {e}", file=sys.stderr)
            conversation.pop()
            continue
        pending = 0
        conversation.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})


if __name__ == "__main__":
    sys.exit(main())
