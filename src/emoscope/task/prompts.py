"""Prompt templates: zero-shot and k-shot, chat format for instruct models, plain text for base models.

A prompt ends right where the answer starts, so the log-probability of each label string can be read
as a continuation. Plain text: "...Text: <text>\\nEmotion:" + " anger". Chat: the generation prompt
of the model's chat template + "anger"; demonstrations are earlier user/assistant turns.
"""

from __future__ import annotations

import warnings

from pydantic import BaseModel, ConfigDict, field_validator

from ..data import Example
from ..errors import EmoscopeError


class Template(BaseModel):
    """How a text becomes a prompt. `{options}` lists the labels; `{text}` is the text."""
    model_config = ConfigDict(use_attribute_docstrings=True)

    instruction: str = "Classify the emotion expressed in the text. Answer with one word from: {options}."
    """Task instruction; {options} becomes the comma-separated label list."""
    example: str = "Text: {text}\nEmotion:"
    """One query; must contain {text}."""
    system: str | None = None
    """System prompt (chat models only); None for none."""
    chat: bool | None = None
    """Use the tokenizer's chat template; None = as the model registry says."""
    label_order: list[str] | None = None
    """Order of labels in {options}; None = task order."""

    @field_validator("example")
    @classmethod
    def _has_text(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("template 'example' must contain the {text} placeholder")
        return v


def _fill(s: str, **kw) -> str:
    # str.replace, not str.format: dataset texts contain braces.
    for k, v in kw.items():
        s = s.replace("{" + k + "}", v)
    return s


class PromptBuilder:
    """Builds prompts and label continuations for one model, template, label set and demonstrations."""

    def __init__(self, tokenizer, template: Template, classes: list[str], demos: list[Example], chat: bool,
                 max_context: int):
        self.tok, self.t, self.classes, self.demos = tokenizer, template, classes, demos
        self.chat = template.chat if template.chat is not None else chat
        if self.chat and not getattr(tokenizer, "chat_template", None):
            raise EmoscopeError("chat format asked for, but the tokenizer has no chat template")
        order = template.label_order or classes
        if sorted(order) != sorted(classes):
            raise EmoscopeError(f"label_order {order} is not a permutation of the task labels {classes}")
        self.options = ", ".join(order)
        self.max_context = max_context
        self.n_truncated = 0
        self._budget = None

    def label_strings(self) -> list[str]:
        """The continuation scored for each class (a space before it in plain text)."""
        return [c if self.chat else " " + c for c in self.classes]

    def _render(self, text: str) -> str:
        instr = _fill(self.t.instruction, options=self.options)
        if not self.chat:
            parts = [instr]
            parts += [_fill(self.t.example, text=d.text) + " " + d.label for d in self.demos]
            parts.append(_fill(self.t.example, text=text))
            return "\n\n".join(parts)
        msgs = [{"role": "system", "content": self.t.system}] if self.t.system else []
        first = True
        for d in self.demos:
            q = _fill(self.t.example, text=d.text)
            msgs += [{"role": "user", "content": f"{instr}\n\n{q}" if first else q},
                     {"role": "assistant", "content": d.label}]
            first = False
        q = _fill(self.t.example, text=text)
        msgs.append({"role": "user", "content": f"{instr}\n\n{q}" if first else q})
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def encode(self, prompt: str) -> list[int]:
        bos = getattr(self.tok, "bos_token", None)
        special = not (bos and prompt.startswith(bos))
        return self.tok(prompt, add_special_tokens=special).input_ids

    def label_ids(self) -> list[list[int]]:
        return [self.tok(s, add_special_tokens=False).input_ids for s in self.label_strings()]

    def prompt_with_span(self, text: str) -> tuple[str, tuple[int, int]]:
        """The prompt and the character span [start, end) of the (possibly truncated) text inside it."""
        marker = "\x00EMOSCOPE_TEXT\x00"
        text = self.fit(text)
        shell = self._render(marker)
        start = shell.index(marker)
        return shell.replace(marker, text), (start, start + len(text))

    def prompt(self, text: str) -> str:
        """The full prompt for one text; a text too long for the context is cut from its left."""
        return self._render(self.fit(text))

    def fit(self, text: str) -> str:
        """The text, cut from its left if the prompt would not fit the model's context."""
        if self._budget is None:
            longest_label = max(len(ids) for ids in self.label_ids())
            self._budget = self.max_context - len(self.encode(self._render(""))) - longest_label
            if self._budget < 8:
                raise EmoscopeError("the prompt template and demonstrations leave no room for text in a "
                                    f"{self.max_context}-token context")
        ids = self.tok(text, add_special_tokens=False).input_ids
        if len(ids) > self._budget:
            self.n_truncated += 1
            if self.n_truncated == 1:
                warnings.warn(f"texts longer than the model's context are truncated from the left (to {self._budget} "
                              "tokens)")
            text = self.tok.decode(ids[-self._budget:])
        return text
