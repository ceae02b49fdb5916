"""The three prompt formats LLaVA-NeXT was trained with, written out in Python (no template engine).

They are the original LLaVA conversation templates (`llava/conversation.py`):
- "mistral" (llava-v1.6-mistral-7b): `[INST] <image>\\nQ [/INST]`, answers ` A </s>`, a system
  message wrapped in `<<SYS>>` inside the first `[INST]`.
- "vicuna" (llava-v1.6-vicuna-7b/13b): `<system> USER: <image>\\nQ ASSISTANT:`, answers ` A</s>`.
- "chatml" (llava-v1.6-34b): `<|im_start|>role\\n...<|im_end|>`, default system "Answer the questions.".
A conversation is transformers' list of {"role", "content"}, content a string or a list of
{"type": "image"} (or "image_url") / {"type": "text", "text": ...}; a turn's images come first,
each as `<image>\\n`.
"""

from __future__ import annotations

import os

from .hub import read_json

FORMATS = ("mistral", "vicuna", "chatml")
IMAGE_TOKEN = "<image>"
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CHATML_SYSTEM = "Answer the questions."
HOW_TO_CHOOSE = ("choose one with LlavaNextProcessor.from_pretrained(..., chat_format=...) or "
                 f"apply_chat_template(..., chat_format=...), one of {FORMATS}")


END_OF_TURN = {"mistral": " </s>", "vicuna": "</s>", "chatml": "<|im_end|>"}  # after an assistant message


def render(conversation: list[dict], chat_format: str, add_generation_prompt: bool | None = None,
           continue_final_message: bool = False) -> str:
    """The prompt string for a conversation in one of FORMATS. add_generation_prompt (default: unless
    continue_final_message) ends it with the assistant's header. continue_final_message: the last
    message is the assistant's and stays open (no end of turn), for the model to go on with it."""
    if add_generation_prompt is None:
        add_generation_prompt = not continue_final_message
    if chat_format not in FORMATS:
        raise ValueError(f"unknown chat_format {chat_format!r}; expected one of {FORMATS}")
    system, turns = _split_system(conversation)
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other: the first "
                             "continues the last message, the second starts a new one")
        if turns[-1][0] != "assistant":
            raise ValueError("continue_final_message needs the conversation to end with an assistant message")
    if chat_format == "mistral":
        out = _mistral(system or "", turns)
    elif chat_format == "vicuna":
        out = _vicuna(VICUNA_SYSTEM if system is None else system, turns, add_generation_prompt)
    else:
        out = _chatml(CHATML_SYSTEM if system is None else system, turns, add_generation_prompt)
    return out[: -len(END_OF_TURN[chat_format])] if continue_final_message else out


def _mistral(system: str, turns: list[tuple[str, str]]) -> str:
    # The trained prompt always ends in "[/INST]": the generation prompt is implicit.
    out = ""
    for i, (role, text) in enumerate(turns):
        if role == "user":
            if i == 0 and system:
                text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
            out += f"[INST] {text} [/INST]"
        else:
            out += f" {text} </s>"
    return out


def _vicuna(system: str, turns: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    out = system + " "
    for role, text in turns:
        out += f"USER: {text} " if role == "user" else f"ASSISTANT: {text}</s>"
    return out + "ASSISTANT:" if add_generation_prompt else out


def _chatml(system: str, turns: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    out = f"<|im_start|>system\n{system}<|im_end|>"
    for role, text in turns:
        out += f"<|im_start|>{role}\n{text}<|im_end|>"
    return out + "<|im_start|>assistant\n" if add_generation_prompt else out


def _split_system(conversation: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    """(system text or None, [(role, text)]) with roles checked to alternate from the user."""
    if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, dict) for m in conversation):
        raise TypeError("a conversation is a list of {'role': ..., 'content': ...} dicts")
    system, turns = None, []
    for i, message in enumerate(conversation):
        role = message.get("role")
        text = message_text(message)
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message must come first")
            system = text
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i}: expected role {expected!r}, got {role!r} (after an optional system "
                             "message, roles alternate user, assistant, user, ...)")
        turns.append((role, text))
    if not turns:
        raise ValueError("the conversation has no user message")
    return system, turns


def message_text(message: dict) -> str:
    """A message's images as `<image>\\n` each, then its text parts joined as they are (no separator)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    images, texts = 0, []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in ("image", "image_url"):
            images += 1
        elif kind == "text":
            texts.append(item.get("text", ""))
        else:
            raise ValueError(f"unsupported content item {item!r}; expected {{'type': 'image'}} or "
                             "{'type': 'text', 'text': ...}")
    return f"{IMAGE_TOKEN}\n" * images + "".join(texts)


def message_images(conversation: list[dict]) -> list:
    """Images given inside the content items ('image', 'url', 'path' or OpenAI's 'image_url'
    keys), in order; None for an item that names none."""
    found = []
    for message in conversation:
        for item in message.get("content", []) if not isinstance(message.get("content"), str) else []:
            if isinstance(item, dict) and item.get("type") in ("image", "image_url"):
                source = next((item[k] for k in ("image", "path", "url", "image_url") if item.get(k) is not None), None)
                found.append(source.get("url") if isinstance(source, dict) else source)  # {"url": ...}
    return found


def detect_format(folder: str | None, has_im_start: bool) -> str | None:
    """The format a checkpoint folder was trained with, or None when nothing says.

    config.json's text model wins (mistral -> mistral; llama -> chatml when the tokenizer knows
    `<|im_start|>`, else vicuna); a folder without config.json is read from its hub chat template.
    """
    if folder is None:
        return None
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        text_config = read_json(config_path).get("text_config") or {}
        model_type = text_config.get("model_type", "llama")  # LlavaNextConfig's default text model
        if model_type == "mistral":
            return "mistral"
        if model_type == "llama":
            return "chatml" if has_im_start else "vicuna"
    template = _hub_template(folder)
    if "<|im_start|>" in template:
        return "chatml"
    if "[INST]" in template:
        return "mistral"
    if "USER:" in template:
        return "vicuna"
    return None


def _hub_template(folder: str) -> str:
    """Text of the chat template(s) saved beside the tokenizer, or "" when there is none."""
    texts = []
    for name, key in (("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template"),
                      ("processor_config.json", "chat_template")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            value = read_json(path).get(key)
            # A template may be a string or a list of {"name", "template"}.
            texts += [t.get("template", "") if isinstance(t, dict) else str(t)
                      for t in (value if isinstance(value, list) else [value or ""])]
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n".join(texts)
