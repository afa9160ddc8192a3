"""Chat templates of Hugging Face tokenizers (ftjax.chat_template) rendered without
transformers: literal expected strings here; tests/test_hf_live.py compares with transformers'
own apply_chat_template (slow, needs requirements-hf.txt)."""

import json
import os
import shutil

import pytest

from ftjax import chat_template, hf

from .test_hf import UNTIED

# Meta's Llama 3 instruct template, as in its tokenizer_config.json.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] "
          "| trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content "
          "%}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
          "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Mistral-style: no system role, strict alternation (raise_exception).
ALTERNATING = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
               "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
               "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' "
               "%}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
               "'assistant' %}{{ message['content'] + eos_token }}{% else %}{{ raise_exception("
               "'Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# transformers' tojson (no HTML escaping), loop controls, whitespace control.
JSONISH = ("{% for m in messages %}\n  {% if loop.index0 > 1 %}{% break %}{% endif %}\n"
           "{{ m | tojson }}\n{% endfor %}")
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France? "},
        {"role": "assistant", "content": "Paris"}]


def test_llama3_template():
  text = chat_template.render(LLAMA3, CHAT[:2], **SPECIAL)
  assert text == ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n")
  continued = chat_template.render(LLAMA3, CHAT, add_generation_prompt=False,
                                   continue_final_message=True, **SPECIAL)
  assert continued.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nParis")


def test_raise_exception_tojson_and_loop_controls():
  assert (chat_template.render(ALTERNATING, CHAT[1:], add_generation_prompt=False, **SPECIAL)
          == "<s>[INST] Capital of France?  [/INST]Paris</s>")
  with pytest.raises(chat_template.ChatTemplateError, match="roles must alternate"):
    chat_template.render(ALTERNATING, CHAT, **SPECIAL)
  messages = [{"role": "user", "content": "é <b>"}, *CHAT]
  assert chat_template.render(JSONISH, messages) == (
      '{"role": "user", "content": "é <b>"}\n{"role": "system", "content": "Be brief."}\n')


def test_run_tokenizer_reads_templates_and_import_copies_them(tmp_path):
  hf_dir = tmp_path / "hf"
  shutil.copytree(UNTIED, hf_dir)
  config = json.load(open(hf_dir / "tokenizer_config.json"))
  config["chat_template"] = [{"name": "default", "template": LLAMA3},
                             {"name": "plain", "template": JSONISH}]
  json.dump(config, open(hf_dir / "tokenizer_config.json", "w"))
  hf.copy_tokenizer(str(hf_dir), str(tmp_path / "run" / hf.TOKENIZER_DIR))
  tok = hf.RunTokenizer(str(tmp_path / "run"))
  assert sorted(tok.chat_templates) == ["default", "plain"]
  assert tok.apply_chat_template(CHAT[1:2]).startswith("<s><|start_header_id|>user")
  assert tok.apply_chat_template(CHAT[1:2], name="plain").startswith('{"role": "user"')
  with pytest.raises(chat_template.ChatTemplateError, match="no chat template named 'chatml'"):
    tok.apply_chat_template(CHAT, name="chatml")
  # transformers 5 writes the template to chat_template.jinja: it is copied and takes precedence.
  (hf_dir / chat_template.TEMPLATE_FILE).write_text(ALTERNATING)
  hf.copy_tokenizer(str(hf_dir), str(tmp_path / "run2" / hf.TOKENIZER_DIR))
  assert os.path.exists(tmp_path / "run2" / hf.TOKENIZER_DIR / chat_template.TEMPLATE_FILE)
  assert hf.RunTokenizer(str(tmp_path / "run2")).apply_chat_template(CHAT[1:2]) == (
      "<s>[INST] Capital of France?  [/INST]")


def test_no_template_is_one_clear_error(tmp_path):
  hf.copy_tokenizer(str(UNTIED), str(tmp_path / hf.TOKENIZER_DIR))
  with pytest.raises(chat_template.ChatTemplateError, match="has no chat template"):
    hf.RunTokenizer(str(tmp_path)).apply_chat_template(CHAT)
