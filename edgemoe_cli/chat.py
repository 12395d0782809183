"""Chat templates and the Thinking output parser.

The template is the one the GGUF carries (`tokenizer.chat_template`, copied from tokenizer_config.json), rendered
with jinja2 the way transformers' `apply_chat_template` does, so the prompt is byte-for-byte what the model was
trained on:

    PT:        <|begin_of_sentence|>{system}\\nUser: {q}\\nAssistant:
    Thinking:  <|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n

A Thinking prompt already ends inside `<think>`, so the reply holds only the closing tag:
`{reasoning}\\n</think>\\n<response>\\n{answer}\\n</response>` (or `<tool_call>{json}</tool_call>` in place of the
response). `parse_reply` splits a finished reply; `ReplySplitter` does the same on a token stream, for display.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator

from .errors import EdgeMoEError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<response>", "</response>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
TAGS = (THINK_OPEN, THINK_CLOSE, RESPONSE_OPEN, RESPONSE_CLOSE, TOOL_OPEN, TOOL_CLOSE)


def build_messages(prompt: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


# A chat template is code from the model file. The sandbox keeps it from reaching Python; these keep it from
# running or growing without end: ERNIE's templates render in milliseconds to a few KB.
TEMPLATE_SECONDS = 5.0
MAX_TEMPLATE_VALUE = 1 << 24  # characters (or items) one expression may build
MAX_PROMPT_CHARS = 1 << 24
TEMPLATE_MEMORY = 1 << 30  # bytes of address space rendering may add


def _bounded_environment(**options):
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, with `*` and `**` refusing results too large to build ('a' * 10**10, 9**9**9)."""

        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_VALUE:
                        raise SecurityError(f"the template builds a value of {len(seq) * n:,} items")
            if (
                operator == "**"
                and isinstance(left, int)
                and isinstance(right, int)
                and abs(right) > 64
                and abs(left) > 1
            ):
                raise SecurityError(f"the template computes {left} ** {right}")
            return super().call_binop(context, operator, left, right)

    return BoundedEnvironment(**options)


def render_prompt(template: str, messages: list[dict], special_tokens: dict[str, str] | None = None) -> str:
    """Render a Hugging Face chat template (jinja2) with the generation prompt appended.

    `special_tokens` (bos_token, eos_token, ...) are passed as template variables, as transformers does; the
    ERNIE templates write their own `<|begin_of_sentence|>` / `<|im_start|>` text, so BOS never comes from here.
    """
    import jinja2

    from .limits import TimeLimitExceeded, memory_limit, time_limit

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    hint = "re-convert the model from a checkpoint whose tokenizer_config.json has a working chat_template"
    # the same environment settings as transformers' chat-template renderer
    env = _bounded_environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        with time_limit(TEMPLATE_SECONDS), memory_limit(TEMPLATE_MEMORY):
            prompt = env.from_string(template).render(
                messages=messages, add_generation_prompt=True, **(special_tokens or {})
            )
    except jinja2.exceptions.TemplateError as e:
        raise EdgeMoEError(f"the model's chat template (tokenizer.chat_template) failed to render: {e}", hint) from e
    except TimeLimitExceeded:
        raise EdgeMoEError(
            f"the model's chat template (tokenizer.chat_template) ran longer than {TEMPLATE_SECONDS:g} s", hint
        ) from None
    except Exception as e:  # noqa: BLE001 - the template is code from the model file: whatever it raises
        # (ZeroDivisionError from {{1/0}}, MemoryError, RecursionError, TypeError...) is the file's fault
        raise EdgeMoEError(
            f"the model's chat template (tokenizer.chat_template) failed to render: {type(e).__name__}: {str(e)[:200]}",
            hint,
        ) from e
    if len(prompt) > MAX_PROMPT_CHARS:
        raise EdgeMoEError(
            f"the model's chat template (tokenizer.chat_template) rendered {len(prompt):,} characters for one prompt",
            hint,
        )
    return prompt


def is_thinking_template(template: str | None) -> bool:
    """A Thinking template pre-fills `<think>` in the generation prompt; PT templates never mention it."""
    return bool(template) and THINK_OPEN in template


@dataclass
class Reply:
    reasoning: str  # the Thinking part ("" for PT, or when the model gave no reasoning)
    answer: str  # the response text, or the tool call JSON when `tool_call` is set
    tool_call: str | None = None  # the JSON inside <tool_call>...</tool_call>, unparsed
    complete: bool = True  # False when the reply was cut off before the answer closed


def parse_reply(raw: str, thinking: bool, truncated: bool = False) -> Reply:
    """Split a model's reply into reasoning and answer.

    thinking:  the prompt was a Thinking prompt (pre-filled `<think>`); False for PT, whose whole reply is the answer.
    truncated: generation stopped at the token limit rather than at end-of-sequence.

    Thinking cases: `reasoning</think><response>answer</response>` (the normal one); `</think>` then a
    `<tool_call>`; `</think>` then untagged text; `<response>` with no `</think>` before it; a `<response>` never
    closed; cut off before `</think>` (all reasoning, no answer); no tags at all and finished at end-of-sequence (the
    model answered directly, so the text is the answer).
    """
    if not thinking:
        return Reply(reasoning="", answer=raw.strip(), complete=not truncated)
    text = raw
    if text.lstrip().startswith(THINK_OPEN):  # a model that repeats the pre-filled tag
        text = text.lstrip()[len(THINK_OPEN) :]
    reasoning, sep, rest = text.partition(THINK_CLOSE)
    if not sep:  # no closing tag: the answer, if any, starts at the first answer tag
        starts = [at for at in (text.find(RESPONSE_OPEN), text.find(TOOL_OPEN)) if at >= 0]
        if not starts:
            if truncated:  # cut off mid-reasoning
                return Reply(reasoning=text.strip(), answer="", complete=False)
            return Reply(reasoning="", answer=text.strip())
        reasoning, rest = text[: min(starts)], text[min(starts) :]
    reasoning = reasoning.strip()

    tool = re.search(re.escape(TOOL_OPEN) + r"(.*?)(" + re.escape(TOOL_CLOSE) + r"|$)", rest, re.S)
    response_at = rest.find(RESPONSE_OPEN)
    if tool and (response_at < 0 or tool.start() < response_at):
        call = tool.group(1).strip()
        return Reply(reasoning=reasoning, answer=call, tool_call=call, complete=bool(tool.group(2)))
    if response_at >= 0:
        body = rest[response_at + len(RESPONSE_OPEN) :]
        answer, closed, _ = body.partition(RESPONSE_CLOSE)
        return Reply(reasoning=reasoning, answer=answer.strip(), complete=bool(closed) or not truncated)
    return Reply(reasoning=reasoning, answer=rest.strip(), complete=not truncated)


class ReplySplitter:
    """Incremental `parse_reply` for streaming: feed text pieces, get ("reasoning" | "answer", text) segments.

    Tags are consumed, not shown. Text that might be the start of a tag is held back until the next piece settles
    it (llama.cpp emits each tag as one token, but a byte-level split must not print half a tag).
    """

    def __init__(self, thinking: bool):
        self.kind = "reasoning" if thinking else "answer"
        self.thinking = thinking
        self._pending = ""  # text that may be the start of a tag
        # whitespace around tags belongs to the format, not to the reasoning or answer: drop it at a section's
        # start, hold it back at the end until more text shows it was inside the section
        self._section_start = True
        self._held_space = ""

    def _text(self, text: str) -> Iterator[tuple[str, str]]:
        if self._section_start:
            text = text.lstrip()
        body = text.rstrip()
        if body:
            self._section_start = False
            yield self.kind, self._held_space + body
            self._held_space = ""
        self._held_space += text[len(body) :]

    def _new_section(self, kind: str) -> None:
        self.kind, self._section_start, self._held_space = kind, True, ""

    def feed(self, piece: str) -> Iterator[tuple[str, str]]:
        if not self.thinking:
            yield from self._text(piece)
            return
        text = self._pending + piece
        self._pending = ""
        while text:
            at = text.find("<")
            if at < 0:
                yield from self._text(text)
                return
            if at:
                yield from self._text(text[:at])
                text = text[at:]
            tag = next((t for t in TAGS if text.startswith(t)), None)
            if tag:
                if tag in (THINK_CLOSE, RESPONSE_OPEN, TOOL_OPEN):
                    self._new_section("answer")
                elif tag in (RESPONSE_CLOSE, TOOL_CLOSE):
                    self._held_space = ""
                text = text[len(tag) :]
                continue
            if any(t.startswith(text) for t in TAGS):  # maybe a tag, not complete yet
                self._pending = text
                return
            yield from self._text("<")
            text = text[1:]

    def flush(self) -> Iterator[tuple[str, str]]:
        pending, self._pending = self._pending, ""
        yield from self._text(pending)
