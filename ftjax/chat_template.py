"""Hugging Face chat templates (the Jinja template of an instruct checkpoint's tokenizer), rendered
as `transformers`' `apply_chat_template(..., tokenize=False)` renders them, without transformers.

The template comes from the tokenizer directory's `chat_template.jinja` or the `chat_template`
entry of its `tokenizer_config.json` (a string, or a list of {"name", "template"}). It is
rendered in Jinja's immutable sandbox with trim_blocks and lstrip_blocks, the loop-control
extension, transformers' helpers (`raise_exception`, `strftime_now`, a `tojson` that does not
escape HTML) and the special tokens as variables (`bos_token`, `eos_token`, ...). Templates that
use transformers' `{% generation %}` tag (assistant-token masks for training) are not supported.
"""

import datetime
import json
import os
from typing import Any, Optional

from ftjax.errors import ChatTemplateError

TEMPLATE_FILE = "chat_template.jinja"
# Appended to the final message when it is continued, then cut (as transformers does).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def load_templates(directory: str, config: dict) -> dict[str, str]:
  """{name: template} of a tokenizer directory ("default" for the unnamed one); {} if none."""
  templates = {}
  entry = config.get("chat_template")
  if isinstance(entry, str):
    templates["default"] = entry
  elif isinstance(entry, list):
    templates.update({t["name"]: t["template"] for t in entry
                      if isinstance(t, dict) and "name" in t and "template" in t})
  path = os.path.join(directory, TEMPLATE_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      templates["default"] = f.read()
  return templates


def pick(templates: dict[str, str], name: Optional[str] = None) -> str:
  """The template called `name` (None: "default", or the only one)."""
  if not templates:
    raise ChatTemplateError("the tokenizer has no chat template (no chat_template.jinja and no "
                            "chat_template in tokenizer_config.json)")
  if name is None:
    if "default" in templates:
      return templates["default"]
    if len(templates) == 1:
      return next(iter(templates.values()))
    raise ChatTemplateError(f"the tokenizer has several chat templates {sorted(templates)} and "
                            "none is called 'default': name one")
  if name not in templates:
    raise ChatTemplateError(f"no chat template named {name!r} (the tokenizer has "
                            f"{sorted(templates)})")
  return templates[name]


def _environment() -> Any:
  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


def render(template: str, messages: list[dict], add_generation_prompt: bool = True,
           continue_final_message: bool = False, **variables: Any) -> str:
  """The conversation `messages` ([{"role", "content"}, ...]) as the template writes it.

  `add_generation_prompt`: end with the assistant's header (the model answers next).
  `continue_final_message`: end right after the final message's content instead (the model
  continues that message; used with add_generation_prompt=False). `variables`: the special
  tokens and anything else the template reads.
  """
  import jinja2
  messages = [dict(m) for m in messages]
  final = None
  if continue_final_message:
    if not messages or not isinstance(messages[-1].get("content"), str):
      raise ChatTemplateError("continue_final_message needs a final message with text content")
    if "content" not in template:
      raise ChatTemplateError("continue_final_message: the chat template does not name the "
                              "messages' content")
    final = messages[-1]["content"]
    messages[-1]["content"] = final + _CONTINUE_TAG
  try:
    text = _environment().from_string(template).render(
        messages=messages, tools=None, documents=None,
        add_generation_prompt=add_generation_prompt, **variables)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f"the chat template failed: {e}") from None
  if final is None:
    return text
  tag = _CONTINUE_TAG.strip()
  if final.strip() not in text or tag not in text:
    raise ChatTemplateError("continue_final_message: the chat template drops part of the final "
                            "message")
  at = text.rindex(tag)
  return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
