"""Chat templates, found and rendered as transformers' ``apply_chat_template(tokenize=False)``
does: the Jinja source from ``chat_template.jinja`` or ``tokenizer_config.json`` (a string, or
named templates of which "default" is used), rendered in jinja2's immutable sandbox with the
same environment (trim_blocks, lstrip_blocks, loop controls, the ``generation`` tag, ``tojson``,
``raise_exception``, ``strftime_now``, restricted ``dict`` and ``namespace``) and the tokenizer's
special tokens as variables.

A template comes from the bundle, that is from whoever wrote it: the sandbox allows no I/O, no
attribute access to Python internals and no underscore names on namespaces. jinja2 is imported
only here, when a template is compiled (the ``serve`` extra installs it).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from dymoe.bundle.errors import BundleError, DymoeError, InputError
from dymoe.bundle.naming import tokenizer_path

from .bundle import Bundle

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
MIN_JINJA = (3, 1, 6)  # older releases have known sandbox escapes (transformers refuses them too)


class ChatTemplate:
    def __init__(self, source: str, origin: str, variables: dict | None = None) -> None:
        self.source = source
        self.origin = origin  # where the template came from, for messages
        self.variables = dict(variables or {})  # special tokens, passed to every render
        self._template = _compile(source, origin)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (each a dict with "role" and "content")."""
        import jinja2

        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.variables)
        except jinja2.TemplateError as e:  # raise_exception(...), sandbox refusals, undefined names
            raise InputError(f"the chat template refused these messages: {e}",
                             "check the roles and their order against the model's template") from None
        except Exception as e:  # a template's own bug on this input (e.g. adding a string to a list)
            raise InputError(f"the chat template failed on these messages: {e.__class__.__name__}: {e}",
                             "check the messages, or use a corrected template") from None


def bundle_chat_template(bundle: Bundle, override: Path | None = None) -> ChatTemplate | None:
    """The bundle's chat template (``override``, a Jinja file, replaces it); None when it has none."""
    variables = _special_tokens(bundle)
    if override is not None:
        from dymoe.bundle.fsutil import read_user_text

        return ChatTemplate(read_user_text(override, "--chat-template"), str(override), variables)
    jinja_rel = tokenizer_path("chat_template.jinja")
    if jinja_rel in bundle.manifest.tokenizer:  # transformers >= 4.47 saves it beside the config
        return ChatTemplate(_text(bundle, jinja_rel), jinja_rel, variables)
    config_rel = tokenizer_path("tokenizer_config.json")
    source = _json(bundle, config_rel).get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is None:
        return None
    if not isinstance(source, str):
        raise BundleError(f"{config_rel}: chat_template is not a string", "fix the file, or pass --chat-template")
    return ChatTemplate(source, config_rel, variables)


def _special_tokens(bundle: Bundle) -> dict[str, str]:
    """bos_token, eos_token, ... as strings (a token may be stored as {"content": ...})."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins, as in transformers
        data = _json(bundle, tokenizer_path(name))
        for key in SPECIAL_TOKENS:
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
    return out


def _text(bundle: Bundle, rel: str) -> str:
    try:
        return bundle.read(rel).decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{rel} is not UTF-8 text", "re-export the bundle") from None


def _json(bundle: Bundle, rel: str) -> dict:
    if rel not in bundle.manifest.tokenizer:
        return {}
    try:
        data = json.loads(_text(bundle, rel))
    except json.JSONDecodeError as e:
        raise BundleError(f"{rel} is not valid JSON ({e})", "re-export the bundle") from None
    return data if isinstance(data, dict) else {}


def _compile(source: str, origin: str):
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DymoeError("chat templates need jinja2, which is not installed",
                         "pip install 'dymoe[serve]' (or pip install jinja2)") from None
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < MIN_JINJA:
        raise DymoeError(f"jinja2 {jinja2.__version__} has known sandbox escapes",
                         "pip install -U 'jinja2>=3.1.6'")

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in
        transformers; rendering it is the identity."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_identity"), [], [], body).set_lineno(lineno)

        def _identity(self, caller):
            return caller()

    class Dict:  # dict() without the class object itself, whose attributes lead to Python internals
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class Namespace(jinja2.utils.Namespace):  # namespace() refusing dunder-like attribute names
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"underscore attribute {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which chat templates do not want
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=Dict(), namespace=Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise BundleError(f"the chat template in {origin} does not compile: {e.message} (line {e.lineno})",
                          "pass --chat-template FILE with a working template") from None
