"""decoders/base_model.load_tokenizer: the tokenizer AutoTokenizer gives, without AutoTokenizer's imports
where the model names transformers' generic fast tokenizer (the embedded model does)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from transformers import AutoTokenizer

from decoders.base_model import load_tokenizer, materialize_embedded

CHATS = [
    [{"role": "user", "content": "Review the movie Arrival in two sentences."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! ¿Qué tal? 👋"}, {"role": "user", "content": "Tell me a joke."}],
]


def test_the_embedded_tokenizer_is_autotokenizers():
    path = str(materialize_embedded())
    ours, auto = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert type(ours) is type(auto)
    assert ours.get_vocab() == auto.get_vocab() and ours.eos_token_id == auto.eos_token_id
    for chat in CHATS:
        text = auto.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == text
        assert ours.encode(text) == auto.encode(text)
        assert ours.decode(auto.encode(text)) == auto.decode(auto.encode(text))


def test_loading_it_imports_neither_torch_nor_generation_code():
    code = ("import sys; from decoders.base_model import load_tokenizer, materialize_embedded; "
            "t = load_tokenizer(str(materialize_embedded())); "
            "t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True); "
            "print(sorted(m for m in ('torch', 'sklearn', 'transformers.generation') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_model_naming_its_own_tokenizer_class_gets_autotokenizers_choice(tmp_path):
    src = materialize_embedded()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "GPT2Tokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, auto = load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(ours) is type(auto) and type(auto).__name__ != "TokenizersBackend"
    assert ours.encode("Hello there") == auto.encode("Hello there")
