"""Chat templates: an instruct model's conversation format, rendered to the prompt text it was
fine-tuned on.

A chat template is a Jinja template shipped with the model (tokenizer_config.json's
"chat_template", chat_template.jinja, or a GGUF file's tokenizer.chat_template; see
minigpt.hf.pretrained.chat_settings). It is rendered as transformers renders it
(PreTrainedTokenizerBase.apply_chat_template): jinja2's ImmutableSandboxedEnvironment (the
template cannot reach Python objects' internals, call unsafe methods or change its inputs),
trim_blocks and lstrip_blocks, the loopcontrols extension, the tojson filter and the
raise_exception and strftime_now globals, with messages, add_generation_prompt, bos_token and
eos_token as variables.

    text = render_chat(template, [{"role": "user", "content": "Hi"}], eos_token="<|im_end|>")
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Dict, List, Optional

__all__ = ["ChatTemplateError", "render_chat", "chat_messages"]


class ChatTemplateError(ValueError):
    """A chat template cannot be rendered: jinja2 missing, a syntax error, or the template's own
    raise_exception (e.g. "Conversation roles must alternate"). One line."""


def chat_messages(prompt: str, system: Optional[str] = None) -> List[Dict[str, str]]:
    """[{"role": "system", "content": system}] (if given) + [{"role": "user", "content":
    prompt}]."""
    return ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}]


def render_chat(template: str, messages: List[Dict[str, str]], *, add_generation_prompt=True,
                bos_token: Optional[str] = None, eos_token: Optional[str] = None) -> str:
    """The prompt text of a conversation under template (see the module docstring).

    Args:
        template: the Jinja source.
        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
        add_generation_prompt: end with the header of the assistant's turn, so that the model
            writes the reply (default True).
        bos_token, eos_token: the texts of those tokens, which templates may write.

    Raises:
        ChatTemplateError: jinja2 is not installed, or the template does not render.
    """
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("chat templates need jinja2: pip install jinja2 (or pip "
                                "install \"minigpt-kernels[gguf]\")") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "", eos_token=eos_token or "")
    except jinja2.exceptions.TemplateError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ChatTemplateError(f"the chat template does not render: {first}") from None
