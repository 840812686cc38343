"""A checkpoint's own Jinja chat template, rendered as HF transformers renders it, with limits.

The environment matches transformers' `_compile_jinja_template`: ImmutableSandboxedEnvironment
with trim_blocks, lstrip_blocks and loopcontrols; `tojson` = plain json.dumps (ensure_ascii=False,
optional indent / separators / sort_keys); globals raise_exception, strftime_now, dict and a
namespace that refuses underscore names. Like the later tokenization_kimi.py, tool dicts have
their keys sorted recursively before rendering (sort_tool_keys=False for the 0711 tokenizer).

A template is code from the checkpoint directory, so rendering is bounded (TemplateLimits):
source size at load; output size while streaming the render; wall time, checked on every loop
iteration (each `for` iterable is wrapped at parse time), call, attribute / item access and
arithmetic; and result sizes of +, *, ** and of call arguments, so doubling a string in a loop
or recursion stops early. Python recursion errors become TemplateLimitError too. Not bounded: a
single expression that joins one big value with `~` many times over (at most source-size times).
Every failure is a jinja2 TemplateError.

Jinja output carries control tokens inline, and so would a user who typed their names. `render`
passes every request string through the template as an opaque placeholder (k2model/text/opaque.py)
so that only the template's own markup becomes control segments, the same (text, is_control)
segments that chat_format.render produces; `render_text` is the plain HF rendering.
"""

import json
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from k2model.text.chat_tokens import IM_END
from k2model.text.messages import Message, Tool, message_to_dict, validate_messages
from k2model.text.opaque import OpaqueText, Segment
from k2model.text.tool_ids import normalize_tool_ids

_ITER_GUARD = "__k2_guarded_iter"


class TemplateLimitError(TemplateError):
    """A chat template exceeded one of its TemplateLimits."""


@dataclass(frozen=True)
class TemplateLimits:
    max_source_chars: int = 200_000
    max_output_chars: int = 8_000_000  # also the cap on any one string / list value
    max_seconds: float = 2.0


@dataclass
class _Budget:
    limits: TemplateLimits
    deadline: float
    ticks: int = 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks % 64 == 0 and time.monotonic() > self.deadline:
            raise TemplateLimitError(
                f"chat template exceeded its time limit of {self.limits.max_seconds} s"
            )

    def check_size(self, value: object) -> None:
        if isinstance(value, str | list | tuple | dict):
            self.check_length(len(value))

    def check_length(self, length: int) -> None:
        if length > self.limits.max_output_chars:
            raise TemplateLimitError(
                f"chat template built a value of {length} items, over the limit of "
                f"{self.limits.max_output_chars}"
            )


# Per render (thread- and task-local), so one compiled template can serve concurrent requests.
_BUDGET: ContextVar[_Budget] = ContextVar("k2_template_budget")


def _budget() -> _Budget:
    try:
        return _BUDGET.get()
    except LookupError:
        raise TemplateLimitError("chat template rendered outside a budgeted render") from None


def _guarded_iter(iterable: Iterable[Any]) -> Iterator[Any]:
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself (as HF does)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(Namespace):
    def __setitem__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise SecurityError(f"chat templates cannot set namespace attribute {name!r}")
        _budget().check_size(value)
        super().__setitem__(name, value)


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            guard = nodes.Name(_ITER_GUARD, "load")
            loop.iter = nodes.Call(guard, [loop.iter], [], None, None)
            loop.iter.set_lineno(loop.lineno).set_environment(self)
        return tree

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        if operator == "**" and _huge_power(left, right):
            raise TemplateLimitError("chat template computed an oversized power")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int):
                    budget.check_length(len(seq) * n)
        result = super().call_binop(context, operator, left, right)
        budget.check_size(result)
        return result

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        for value in (*args, *kwargs.values()):
            budget.check_size(value)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().tick()
        return super().getitem(obj, argument)


def _huge_power(base: Any, exponent: Any) -> bool:
    if not (isinstance(base, int) and isinstance(exponent, int)) or exponent <= 0:
        return False
    return abs(base).bit_length() * exponent > 65_536


def _make_environment() -> _BudgetedSandbox:
    env = _BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_Namespace,
    )
    env.globals[_ITER_GUARD] = _guarded_iter
    return env


def load_checkpoint_template(directory: str | Path) -> str | None:
    """The template a checkpoint ships: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of {name, template} of which "default" is used)."""
    directory = Path(directory)
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = directory / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def sorts_tool_keys(directory: str | Path) -> bool:
    """Whether HF's tokenizer of this checkpoint sorts tool keys before rendering. That is the
    tokenizer class's doing (tokenization_kimi.py's `deep_sort_dict`, added after the July 2025
    K2-Instruct release), not the template's: the file is read as text, never run. A checkpoint
    without the file gets the current Kimi tokenizers' behaviour (sorted)."""
    code = Path(directory) / "tokenization_kimi.py"
    if not code.is_file():
        return True
    return "deep_sort_dict" in code.read_text(encoding="utf-8", errors="replace")


def _wrap_message(message: dict[str, Any], wrap: Callable[[Any], Any]) -> dict[str, Any]:
    """Every request string of a message wrapped; the role and part / call types, which
    templates compare against their own literals, left as they are."""
    out: dict[str, Any] = {}
    for key, value in message.items():
        if key == "role":
            out[key] = value
        elif key == "content" and isinstance(value, list):
            out[key] = [{k: v if k == "type" else wrap(v) for k, v in p.items()} for p in value]
        elif key == "tool_calls":
            out[key] = [{**c, "id": wrap(c["id"]), "function": wrap(c["function"])} for c in value]
        else:
            out[key] = wrap(value)
    return out


def _deep_sort(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_sort(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_deep_sort(v) for v in value]
    return value


class JinjaChatTemplate:
    def __init__(
        self,
        source: str,
        *,
        control_tokens: Collection[str],
        sort_tool_keys: bool = True,
        special_tokens: Mapping[str, str] | None = None,
        limits: TemplateLimits = TemplateLimits(),
    ):
        """special_tokens: bos_token etc. -> names, in the template's context as HF puts them."""
        if len(source) > limits.max_source_chars:
            raise TemplateLimitError(
                f"chat template is {len(source)} chars, over the limit of {limits.max_source_chars}"
            )
        self._template = _make_environment().from_string(source)
        self._controls = frozenset(control_tokens)
        self._sort_tool_keys = sort_tool_keys
        self._special_tokens = dict(special_tokens or {})
        self._limits = limits

    def render(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[Segment]:
        """Segments in which only the template's own markup is control: every request string
        comes back as ordinary text, whatever it spells."""
        opaque = OpaqueText()
        text = self._render(messages, tools, add_generation_prompt, opaque.wrap_tree)
        return opaque.segments(text, self._controls)

    def render_text(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """The text HF's apply_chat_template(tokenize=False) gives."""
        return self._render(messages, tools, add_generation_prompt, lambda value: value)

    def _render(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool] | None,
        add_generation_prompt: bool,
        wrap: Callable[[Any], Any],
    ) -> str:
        validate_messages(messages)
        messages = normalize_tool_ids(messages)
        partial = bool(messages) and messages[-1].partial
        tool_dicts = [t.to_dict() for t in tools or ()]
        if self._sort_tool_keys:
            tool_dicts = _deep_sort(tool_dicts)
        context = {
            **self._special_tokens,
            "messages": [_wrap_message(message_to_dict(m), wrap) for m in messages],
            "tools": [{**t, "function": wrap(t["function"])} for t in tool_dicts] or None,
            "add_generation_prompt": add_generation_prompt and not partial,
        }
        text = self._generate(context)
        if partial:
            # As HF's continue_final_message: the last turn is cut open after its content.
            if not text.endswith(IM_END):
                raise TemplateError("chat template did not end the partial message with <|im_end|>")
            text = text[: -len(IM_END)]
        return text

    def _generate(self, context: dict[str, Any]) -> str:
        budget = _Budget(self._limits, time.monotonic() + self._limits.max_seconds)
        token = _BUDGET.set(budget)
        pieces: list[str] = []
        size = 0
        try:
            for piece in self._template.generate(**context):
                size += len(piece)
                if size > self._limits.max_output_chars:
                    raise TemplateLimitError(
                        f"chat template output exceeded {self._limits.max_output_chars} chars"
                    )
                budget.tick()
                pieces.append(piece)
        except TemplateError:
            raise
        except RecursionError:
            raise TemplateLimitError("chat template recursed too deeply") from None
        except Exception as e:
            # The template is foreign code: any failure inside it (a TypeError on data the
            # template did not expect, ...) is reported as a template error, not a crash.
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
        finally:
            _BUDGET.reset(token)
        return "".join(pieces)
