"""The three trained prompt formats, exactly as REFERENCE.md writes them, and format detection."""

import json
import shutil

import pytest

from conftest import fixture_path
from llava_next.chat_format import VICUNA_SYSTEM, detect_format, message_images, render

Q = "What is shown in this image?"
ONE_TURN = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}]
TWO_TURNS = ONE_TURN + [{"role": "assistant", "content": [{"type": "text", "text": "A chart."}]},
                        {"role": "user", "content": [{"type": "text", "text": "Explain."}]}]
WITH_SYSTEM = [{"role": "system", "content": [{"type": "text", "text": "S"}]}] + ONE_TURN


def test_mistral():
    assert render(ONE_TURN, "mistral") == "[INST] <image>\nWhat is shown in this image? [/INST]"
    assert render(TWO_TURNS, "mistral") == \
        "[INST] <image>\nWhat is shown in this image? [/INST] A chart. </s>[INST] Explain. [/INST]"
    assert render(WITH_SYSTEM, "mistral") == \
        "[INST] <<SYS>>\nS\n<</SYS>>\n\n<image>\nWhat is shown in this image? [/INST]"


def test_vicuna():
    system = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the human's questions.")
    assert VICUNA_SYSTEM == system
    assert render(ONE_TURN, "vicuna") == f"{system} USER: <image>\nWhat is shown in this image? ASSISTANT:"
    assert render(TWO_TURNS, "vicuna") == \
        f"{system} USER: <image>\nWhat is shown in this image? ASSISTANT: A chart.</s>USER: Explain. ASSISTANT:"
    assert render(WITH_SYSTEM, "vicuna") == "S USER: <image>\nWhat is shown in this image? ASSISTANT:"


def test_chatml():
    start = "<|im_start|>system\nAnswer the questions.<|im_end|>"
    assert render(ONE_TURN, "chatml") == \
        f"{start}<|im_start|>user\n<image>\nWhat is shown in this image?<|im_end|><|im_start|>assistant\n"
    assert render(TWO_TURNS, "chatml") == (
        f"{start}<|im_start|>user\n<image>\nWhat is shown in this image?<|im_end|><|im_start|>assistant\n"
        "A chart.<|im_end|><|im_start|>user\nExplain.<|im_end|><|im_start|>assistant\n")
    assert render(WITH_SYSTEM, "chatml").startswith("<|im_start|>system\nS<|im_end|><|im_start|>user\n")


def test_generation_prompt_off_and_string_content():
    conversation = [{"role": "user", "content": "<image>\nHi"}]
    assert render(conversation, "chatml", add_generation_prompt=False).endswith("Hi<|im_end|>")
    assert not render(conversation, "vicuna", add_generation_prompt=False).endswith("ASSISTANT:")
    assert render(conversation, "mistral") == "[INST] <image>\nHi [/INST]"


def test_images_come_first_each_on_its_own_line():
    conversation = [{"role": "user", "content": [{"type": "text", "text": "Compare."}, {"type": "image"},
                                                 {"type": "image", "path": "b.png"}]}]
    assert render(conversation, "mistral") == "[INST] <image>\n<image>\nCompare. [/INST]"
    assert message_images(conversation) == [None, "b.png"]


def test_bad_conversations():
    with pytest.raises(ValueError, match="expected role 'user'"):
        render([{"role": "assistant", "content": "hi"}], "mistral")
    with pytest.raises(ValueError, match="expected role 'assistant'"):
        render(ONE_TURN + ONE_TURN, "vicuna")
    with pytest.raises(ValueError, match="system message must come first"):
        render(ONE_TURN + [{"role": "system", "content": "S"}], "chatml")
    with pytest.raises(ValueError, match="unknown chat_format"):
        render(ONE_TURN, "llama3")
    with pytest.raises(ValueError, match="unsupported content item"):
        render([{"role": "user", "content": [{"type": "video"}]}], "mistral")


# ---- detection -----------------------------------------------------------------------------------

@pytest.mark.parametrize("config, has_im_start, expected", [
    ("llava-v1.6-mistral-7b-hf.config.json", False, "mistral"),
    ("llava-v1.6-vicuna-7b-hf.config.json", False, "vicuna"),
    ("llava-v1.6-vicuna-13b-hf.config.json", False, "vicuna"),
    ("llava-v1.6-34b-hf.config.json", True, "chatml"),
])
def test_detect_from_config(tmp_path, config, has_im_start, expected):
    shutil.copy(fixture_path("configs", config), tmp_path / "config.json")
    # config.json wins over a template that says otherwise
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ '<|im_start|>' }}"}))
    assert detect_format(str(tmp_path), has_im_start) == expected


@pytest.mark.parametrize("file, template, expected", [
    ("tokenizer_config.json", "{% for m in messages %}[INST] {{ m }} [/INST]{% endfor %}", "mistral"),
    ("chat_template.json", "{{ 'USER: ' + text + ' ASSISTANT:' }}", "vicuna"),
    ("chat_template.json", "{{ '<|im_start|>' + role }}", "chatml"),
    ("chat_template.jinja", "{{ '<|im_start|>' + role }}", "chatml"),
])
def test_detect_from_hub_template(tmp_path, file, template, expected):
    if file.endswith(".jinja"):
        (tmp_path / file).write_text(template)
    else:
        (tmp_path / file).write_text(json.dumps({"chat_template": template}))
    assert detect_format(str(tmp_path), False) == expected


def test_undetectable(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert detect_format(str(tmp_path), False) is None
    assert detect_format(None, False) is None


def test_render_defaults_for_continuing_and_empty_content():
    """continue_final_message alone leaves the reply open (no generation prompt asked for); a
    message whose content is None renders as empty text."""
    reply = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert render(reply, "chatml", continue_final_message=True).endswith("<|im_start|>assistant\nHello")
    assert render([{"role": "user", "content": None}], "mistral") == "[INST]  [/INST]"
