"""The whole pipeline offline on a tiny checkpoint written by scripts/make_tiny_checkpoint.py:
the seed's usage example with only the import changed, and the CLI in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fixture_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = fixture_path("tokenizers", "mistral_7b_v0.1_tokenizer.model")
    folder = tmp_path_factory.mktemp("tiny-mistral")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), str(folder),
                          "--tokenizer", str(tok)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return folder


def test_seed_usage_example(tiny):
    # The llava-hf model card's example; only the import line, the model id, the device and
    # the image source differ.
    image_path = fixture_path("images", "llava_v1_5_radar.jpg")
    from llava_next import LlavaNextProcessor, LlavaNextForConditionalGeneration
    import torch
    from PIL import Image

    processor = LlavaNextProcessor.from_pretrained(tiny)
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny, torch_dtype=torch.float16, low_cpu_mem_usage=True)
    model.to("cpu")

    image = Image.open(image_path)
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is shown in this image?"},
                {"type": "image"},
            ],
        },
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == "[INST] <image>\nWhat is shown in this image? [/INST]"
    inputs = processor(prompt, image, return_tensors="pt").to("cpu")
    output = model.generate(**inputs, max_new_tokens=10)
    text = processor.decode(output[0], skip_special_tokens=True)
    assert inputs["input_ids"].shape == (1, 2652)  # REFERENCE.md: the radar prompt expands to 2652 ids
    assert output.shape[0] == 1 and 2652 < output.shape[1] <= 2662
    assert text.startswith("[INST]  \nWhat is shown in this image? [/INST]")


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "llava_next.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_cli_generate_streams_an_answer(tiny):
    image = fixture_path("images", "coco_000000039769_cats.png")
    run = cli("generate", "--model", tiny, "--image", image, "--prompt", "Describe the image.",
              "--max-new-tokens", "6", "--dtype", "float32", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "Traceback" not in run.stderr


def test_cli_generate_sampling_flags(tiny):
    image = fixture_path("images", "llava_logo.png")
    run = cli("generate", "--model", tiny, "--image", image, "--prompt", "Hi", "--max-new-tokens", "4",
              "--do-sample", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--seed", "1")
    assert run.returncode == 0, run.stderr


def cli_in_process(capsys, *args):
    """llava_next.cli.main(args) in this process, as `cli` runs it in a new one, without a new
    interpreter's seconds of imports: (returncode, stdout, stderr). The RNG state is restored after."""
    import types

    import torch

    from llava_next.cli import main

    capsys.readouterr()  # drop what came before
    with torch.random.fork_rng():
        code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_cli_takes_the_checkpoints_generation_settings(tiny, tmp_path, capsys):
    """Sampling flags left out come from generation_config.json, as in model.generate(); a flag wins.
    In process: seven runs of the CLI (the other CLI tests run it as `python -m llava_next.cli`)."""
    import functools
    import json
    import shutil

    import torch

    from llava_next import LlavaNextForConditionalGeneration, LlavaNextProcessor

    cli = functools.partial(cli_in_process, capsys)

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    gen_file = folder / "generation_config.json"
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "repetition_penalty": 0.3}))
    processor = LlavaNextProcessor.from_pretrained(folder)
    model = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
                                           add_generation_prompt=True)
    inputs = processor(text=prompt)
    n = inputs["input_ids"].shape[1]
    answers = []
    for flags, kw in (([], {}), (["--repetition-penalty", "1"], dict(repetition_penalty=1.0))):
        run = cli("generate", "--model", folder, "--prompt", "Hi there", "--max-new-tokens", "8", "--dtype",
                  "float32", "--device", "cpu", *flags)
        assert run.returncode == 0, run.stderr
        want = processor.decode(model.generate(**inputs, max_new_tokens=8, **kw)[0, n:], skip_special_tokens=True)
        assert run.stdout.strip() == want.strip()
        answers.append(want)
    assert answers[0] != answers[1]  # the file's penalty acted

    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "do_sample": True, "temperature": 50.0}))
    common = ["generate", "--model", folder, "--prompt", "Hi there", "--max-new-tokens", "8", "--dtype", "float32",
              "--device", "cpu"]
    sampled = {cli(*common, "--seed", str(seed)).stdout for seed in (1, 2)}
    greedy = {cli(*common, "--seed", str(seed), "--no-do-sample").stdout.strip() for seed in (1, 2)}
    assert len(sampled) == 2 and greedy == {answers[0].strip()}  # --no-do-sample overrides the file

    # settings that would change what generate() returns do not reach the CLI's one streamed answer
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "return_dict_in_generate": True,
                                    "output_scores": True, "num_return_sequences": 3,
                                    "stop_strings": ["\u00a7\u00a7\u00a7"]}))
    run = cli(*common, "--no-do-sample")
    assert run.returncode == 0 and run.stdout.strip() == answers[0].strip(), run.stderr

    # beam search: not streamed, printed once complete; the file's repetition penalty applies to it too
    beams = processor.decode(model.generate(**inputs, max_new_tokens=8, num_beams=3)[0, n:], skip_special_tokens=True)
    run = cli(*common, "--no-do-sample", "--num-beams", "3")
    assert run.returncode == 0 and run.stdout.strip() == beams.strip(), run.stderr
    assert beams != answers[0]  # the flag reached generate()


@pytest.mark.parametrize("args, message", [
    (["generate", "--image", "no/such/image.png", "--prompt", "x"], "image file not found: no/such/image.png"),
    (["generate", "--prompt", "x", "--dtype", "float8"], "invalid choice: 'float8'"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "--image"], "expected one argument"),
    (["generate", "--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["generate", "--prompt", "x", "--num-beams", "0"], "--num-beams must be >= 1"),
    (["generate", "--prompt", "x", "--do-sample", "--top-k", "-3"], "--top-k must be >= 0"),
    (["generate", "--prompt", "x", "--device", "meta"], "the CLI runs on cpu or cuda"),
    (["generate", "--prompt", "<image>\nx"], "leave <image> out of --prompt"),
])
def test_cli_bad_arguments_one_line_exit_2(tiny, args, message):
    run = cli(*args, "--model", tiny)
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert "Traceback" not in run.stderr


def test_cli_unknown_model_folder(tmp_path):
    run = cli("generate", "--model", tmp_path / "missing", "--prompt", "x")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "no such folder" in run.stderr


def test_cli_model_given_as_a_file(tiny):
    run = cli("generate", "--model", tiny / "config.json", "--prompt", "x")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "is a file; expected a checkpoint folder" in run.stderr


def test_cli_folder_without_checkpoint(tmp_path):
    run = cli("generate", "--model", tmp_path, "--prompt", "x")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "Traceback" not in run.stderr


def test_cli_prompt_longer_than_context_is_refused(tiny):
    image = fixture_path("images", "llava_logo.png")
    run = cli("generate", "--model", tiny, "--image", image, "--prompt", "word " * 5000, "--max-new-tokens", "2")
    assert run.returncode == 2, run.stderr
    assert "context is 4096" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_cli_chat(tiny):
    image = fixture_path("images", "llava_logo.png")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    stdin = f"/image {image}\nWhat is this?\n/image nope.png\n<image> here?\nAnd now?\n/quit\n"
    run = subprocess.run([sys.executable, "-m", "llava_next.cli", "chat", "--model", str(tiny), "--max-new-tokens",
                          "3"], input=stdin, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("assistant>") == 2
    assert "image file not found: nope.png" in run.stderr
    assert "leave <image> out of your message" in run.stderr
