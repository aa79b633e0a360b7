"""Chat templates render exactly as transformers' apply_chat_template renders them (same Jinja
environment, same variables), come from the bundle (tokenizer_config.json, named templates, or
chat_template.jinja, which export now carries), and stay in jinja2's sandbox."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dymoe.bundle.errors import BundleError, InputError
from dymoe.demo import demo_model_dir, ensure_demo_bundle
from dymoe.runtime.bundle import Bundle
from dymoe.runtime.chat_template import ChatTemplate, bundle_chat_template
from dymoe.runtime.tokenizer import TextTokenizer
from dymoe.toolchain.export import ExportOptions, export
from dymoe.toolchain.synthetic import write_synthetic_checkpoint

CHATML = ("{%- for message in messages %}"
          "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
ALTERNATING = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{% continue %}"
               "{% endif %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 1) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
               "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
FEATURES = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
            "{% set ns.n = ns.n + 1 %}{{ ns.n }}:{{ m | tojson }}\n"
            "{% generation %}{{ m.content | upper }}{% endgeneration %}\n"
            "{% endfor %}{% if add_generation_prompt %}> {{ dict(a=1) | tojson }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Qu'est-ce que <b>&</b> ?"},
            {"role": "assistant", "content": "Un dict."}, {"role": "user", "content": "Et un set ?"}]
SPECIAL = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(demo_model_dir() / "tokenizer.json"), **SPECIAL)


@pytest.mark.parametrize("template", [CHATML, ALTERNATING, FEATURES], ids=["chatml", "alternating", "features"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_matches_transformers(hf_tokenizer, template, generation_prompt):
    theirs = hf_tokenizer.apply_chat_template(MESSAGES, chat_template=template, tokenize=False,
                                              add_generation_prompt=generation_prompt)
    ours = ChatTemplate(template, "test", SPECIAL).render(MESSAGES, add_generation_prompt=generation_prompt)
    assert ours == theirs and "&" in ours


def test_raise_exception_is_a_clean_input_error(hf_tokenizer):
    import jinja2

    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        hf_tokenizer.apply_chat_template(bad, chat_template=ALTERNATING, tokenize=False)
    with pytest.raises(InputError, match="must alternate"):
        ChatTemplate(ALTERNATING, "test", SPECIAL).render(bad)


def test_the_demo_bundle_template_gives_transformers_token_ids():
    from transformers import AutoTokenizer

    bundle = Bundle(ensure_demo_bundle())
    template = bundle_chat_template(bundle)
    assert template is not None and template.origin == "tokenizer/tokenizer_config.json"
    messages = MESSAGES[:2]
    ours = TextTokenizer(bundle.tokenizer_path()).encode(template.render(messages), add_special_tokens=False)
    theirs = AutoTokenizer.from_pretrained(demo_model_dir()).apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ours == theirs and template.render(messages).endswith("Answer:")


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the classic sandbox escape
    "{% set ns = namespace() %}{% set ns._private = 1 %}{{ ns._private }}",
    "{{ messages.append(1) }}",  # immutable sandbox: the request's data is not changed
    "{{ dict.__class__ }}",
], ids=["subclasses", "namespace-underscore", "mutation", "dict-class"])
def test_the_sandbox_refuses_escapes(source):
    messages = [{"role": "user", "content": "x"}]
    try:
        out = ChatTemplate(source, "test").render(messages)
    except InputError:
        return
    assert "class" not in out and messages == [{"role": "user", "content": "x"}]  # unsafe names render as nothing


def test_a_template_that_does_not_compile_names_its_origin():
    with pytest.raises(BundleError, match="tokenizer_config.json does not compile"):
        ChatTemplate("{% for %}", "tokenizer/tokenizer_config.json")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat") / "src"
    write_synthetic_checkpoint(folder, hidden=32, intermediate=32, experts=2, layers=1, heads=2, kv_heads=1, vocab=64,
                               max_position_embeddings=32)
    return folder


def _bundle_with(source: Path, tmp_path: Path, files: dict[str, str]) -> Bundle:
    src = tmp_path / "src"
    shutil.copytree(source, src)
    for name, text in files.items():
        (src / name).write_text(text)
    export(str(src), tmp_path / "b", ExportOptions(precisions=("fp32",)))
    return Bundle(tmp_path / "b")


def test_where_the_template_comes_from(source, tmp_path):
    config = {"eos_token": {"content": "</s>", "__type": "AddedToken"},
              "chat_template": [{"name": "tool_use", "template": "T"},
                                {"name": "default", "template": "D{{ eos_token }}"}]}
    b = _bundle_with(source, tmp_path / "named", {"tokenizer_config.json": json.dumps(config)})
    assert bundle_chat_template(b).render([]) == "D</s>"  # named templates: "default"; tokens stored as objects
    b = _bundle_with(source, tmp_path / "jinja", {"tokenizer_config.json": json.dumps(config),
                                                  "chat_template.jinja": "J{{ messages | length }}"})
    assert "tokenizer/chat_template.jinja" in b.manifest.tokenizer  # export carries it, checksummed
    assert bundle_chat_template(b).render([{"role": "user", "content": "x"}]) == "J1"  # the .jinja file wins
    override = tmp_path / "mine.jinja"
    override.write_text("M")
    assert bundle_chat_template(b, override).render([]) == "M"
    b = _bundle_with(source, tmp_path / "none", {})
    assert bundle_chat_template(b) is None
