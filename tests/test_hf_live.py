"""Live comparison with `transformers` (slow; needs `pip install -r requirements-hf.txt`):
fresh random Llamas (another seed than the committed fixtures), imported and exported, with
transformers computing the reference logits on both sides."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import hf

from .conftest import REPO
from .test_hf import config_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  sys.path.insert(0, os.path.join(REPO, "tests", "fixtures"))
  import make_llama_fixture
  root = str(tmp_path_factory.mktemp("live"))
  make_llama_fixture.main(root=root, seed=7)
  return root


def hf_logits(directory, tokens):
  import torch
  from transformers import LlamaForCausalLM
  model = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32,
                                           attn_implementation="eager").eval()
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens, np.int64))).logits.numpy()


def ftjax_logits(cfg, params, tokens, z_mode):
  from ftjax.model import make_model
  out, _ = make_model(cfg.model).apply({"params": params}, jnp.asarray(tokens), z_mode=z_mode,
                                       latent_key=jax.random.key(0))
  return np.asarray(out)


@pytest.mark.parametrize("name", ["llama_untied", "llama_tied_rope3"])
def test_live_import_export_equal_transformers(models, name, tmp_path):
  hf_dir = os.path.join(models, name)
  tokens = np.load(os.path.join(hf_dir, "expected.npz"))["tokens"]
  reference = hf_logits(hf_dir, tokens)
  for latent in (False, True):
    cfg = config_for(hf_dir, **{"model.latent.enabled": latent})
    run, out = str(tmp_path / f"run{latent}"), str(tmp_path / f"out{latent}")
    state = hf.import_run(hf_dir, run, cfg, log=lambda *_: None)
    for mode in (("uniform", "encoder") if latent else ("zero",)):
      np.testing.assert_allclose(ftjax_logits(cfg, state.params, tokens, mode), reference,
                                 atol=1e-4, rtol=1e-4, err_msg=f"{latent} {mode}")
    # Export → transformers loads it (a Free Transformer's latent tensors are unexpected keys
    # it ignores) → the same logits.
    hf.export(state.params, cfg.model, out, run_dir=run)
    np.testing.assert_allclose(hf_logits(out, tokens), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("template", ["LLAMA3", "ALTERNATING", "JSONISH"])
def test_chat_templates_render_as_transformers(template, tmp_path):
  """ftjax.chat_template against transformers' apply_chat_template(tokenize=False), with and
  without the generation prompt and continuing the final message."""
  pytest.importorskip("transformers")
  import shutil
  from transformers import AutoTokenizer
  from . import test_chat_template as t
  from .test_hf import UNTIED
  shutil.copytree(UNTIED, tmp_path / "hf")
  (tmp_path / "hf" / "chat_template.jinja").write_text(getattr(t, template))
  theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  hf.copy_tokenizer(str(tmp_path / "hf"), str(tmp_path / "run" / hf.TOKENIZER_DIR))
  ours = hf.RunTokenizer(str(tmp_path / "run"))
  chats = [t.CHAT[1:2], t.CHAT[1:], t.CHAT, [{"role": "user", "content": "é <b> & 'x'"}]]
  for chat in chats:
    for generation_prompt, continued in ((True, False), (False, False), (False, True)):
      try:
        expected = theirs.apply_chat_template(chat, tokenize=False,
                                              add_generation_prompt=generation_prompt,
                                              continue_final_message=continued)
      except Exception as e:  # noqa: BLE001 (the template refuses this chat: so must ours)
        with pytest.raises(Exception):
          ours.apply_chat_template(chat, generation_prompt, continued)
        print(template, "both refuse:", str(e)[:80])
        continue
      assert ours.apply_chat_template(chat, generation_prompt, continued) == expected
