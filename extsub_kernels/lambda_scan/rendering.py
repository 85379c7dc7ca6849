"""How the scan turns a prompt (and a completion) into token ids, one rule for every set with prompts:

- plain (`chat=None`): the prompt with the tokenizer's special tokens (e.g. BOS); the completion tokenised on its
  own, without special tokens, and appended (a separating space belongs at its start).
- chat (`ChatTemplate`): the prompt a user turn (after an optional system message), rendered by
  `apply_chat_template(..., add_generation_prompt=True)` up to the assistant's header, tokenised without added
  special tokens; the completion appended with no leading space; the end of turn not scored (as lm-eval does)."""

from dataclasses import dataclass
from typing import Any

from extsub_kernels.errors import InputError

CHAT_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class ChatTemplate:
    """Render prompts through the tokenizer's chat template, after `system` as a system message if given."""

    system: str | None = None

    def messages(self, prompt: str) -> list[dict[str, str]]:
        """The conversation a prompt becomes: [system,] user."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*head, {"role": "user", "content": prompt}]


def chat_template(tokenizer: Any, mode: str = "auto", system: str | None = None) -> ChatTemplate | None:
    """The rendering to use: "auto" → a ChatTemplate when the tokenizer has a chat template; "on" requires one.

    Raises:
        InputError: an unknown mode, "on" with a tokenizer that has no chat template, or a system
            message with rendering off.
    """
    if mode not in CHAT_MODES:
        raise InputError(f"chat_template must be one of {', '.join(CHAT_MODES)}; got {mode!r}")
    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has_template:
        raise InputError(
            "chat_template='on': the base model's tokenizer has no chat template", options=("chat_template",)
        )
    if mode == "off" or not has_template:
        if system is not None:
            raise InputError(
                "system= is a chat template's system message; it needs the chat template on", options=("system",)
            )
        return None
    return ChatTemplate(system)


def encode_prompt(tokenizer: Any, prompt: str, chat: ChatTemplate | None = None) -> tuple[int, ...]:
    """A prompt's token ids: plain (with special tokens) or rendered up to the assistant's header (module docstring)."""
    if chat is None:
        return tuple(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template(chat.messages(prompt), add_generation_prompt=True, tokenize=False)
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_completion(tokenizer: Any, completion: str) -> tuple[int, ...]:
    """A completion's token ids: tokenised on its own, without special tokens, to be appended to its prompt's."""
    return tuple(tokenizer(completion, add_special_tokens=False)["input_ids"])


def option_text(option: str, chat: ChatTemplate | None) -> str:
    """A multiple-choice option as the completion of its question: after one space in plain text (lm-evaluation-
    harness's target delimiter, as TruthfulQA's "Q: …\\nA:" + " " + option), as written after a chat header."""
    return option if chat is not None else " " + option
