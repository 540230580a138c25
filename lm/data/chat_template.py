"""The tokenizer's chat template (Hugging Face's convention), for chat `messages` records
of instruction data (lm/data/instruction.py).

Where it is found: beside the tokenizer.json the run uses (data.tokenizer), as
`chat_template.jinja` (newer transformers) or the `chat_template` entry of
`tokenizer_config.json` (a Jinja string, or a list of {name, template} of which "default"
is taken); the .jinja file wins where both exist, as in transformers. `lm import hf`
copies both files beside the tokenizer it copies into the run dir, and `--init-from` takes
that tokenizer path, so an HF directory and a run imported from it find the same template.
Only tokenizer.json tokenizers are looked at: the special tokens a template writes as text
(<|im_start|>, {{ bos_token }}) become their ids only where the tokenizer parses added
tokens in text, which a SentencePiece .model does not.

Rendering is transformers' `apply_chat_template(messages, tokenize=False)`: a sandboxed
Jinja environment (trim_blocks, lstrip_blocks, loop controls), the variables `messages`,
`add_generation_prompt`, `tools`/`documents` (None) and the special-token strings of
tokenizer_config.json (bos_token, eos_token, ...; a string or an AddedToken dict with
"content"), the `raise_exception` function, transformers' `tojson` filter (no HTML
escaping), `namespace` and `{% generation %}` blocks (rendered, not tracked). Not
provided: `strftime_now` (a date in the training text would make the data depend on the
day it is read; templates that test `strftime_now is defined` use their fixed default).

Assistant turns: for each assistant message i, `messages[:i]` rendered with the
generation prompt and `messages[:i+1]` without it; the text between their ends is what
the template emits for that turn (its content and end-of-turn token, e.g. <|im_end|>),
i.e. what the model writes when prompted by the first. Both must be prefixes of the whole
conversation's rendering, or the turn cannot be located: such a template (one that
rewrites earlier turns, e.g. drops past reasoning) is refused in one line.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from lm.data.errors import DataError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES: the template variables
# apply_chat_template passes (those that are set).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the file it was read from
    template: str
    special_tokens: tuple[tuple[str, str], ...]  # (name, string), e.g. ("bos_token", "<s>")

    def render(self, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
        """The conversation as text (transformers' apply_chat_template, tokenize=False);
        a template that raises is one DataError line naming `where` (the record)."""
        compiled = _compile(self.template, self.source)
        try:
            return compiled.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt,
                                   **dict(self.special_tokens))
        except Exception as e:  # noqa: BLE001 (whatever the template raises: the user's)
            raise DataError(f"{where}: the chat template of {self.source} failed on it "
                            f"({type(e).__name__}: {e})") from None

    def end_of_turn(self, messages: list[dict], where: str) -> str:
        """What the template writes after an assistant reply to `messages` (ChatML's
        "<|im_end|>\n", Llama-3's "<|eot_id|>"): the rendering with a marker reply, after
        the marker. A model prompted with the generation prompt ends its reply so."""
        marker = "\x00reply\x00"  # (no whitespace: templates may trim the content)
        text = self.render([*messages, {"role": "assistant", "content": marker}], False, where)
        return text[text.rfind(marker) + len(marker):] if marker in text else ""

    def segments(self, messages: list[dict], where: str) -> list[tuple[str, bool]]:
        """The rendered conversation as consecutive (text, is_assistant_turn) pieces."""
        whole = self.render(messages, False, where)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], True, where)
            upto = self.render(messages[:i + 1], False, where)
            if not upto.startswith(before):
                bad = (f"messages[:{i}] with the generation prompt", f"messages[:{i + 1}]")
            elif not whole.startswith(upto):
                bad = (f"messages[:{i + 1}]", f"all {len(messages)} messages")
            elif spans and len(before) < spans[-1][1]:
                bad = (f"messages[:{i}]", f"messages[:{i}] with the generation prompt")
            else:
                bad = None
            if bad:
                raise DataError(
                    f"{where}: the chat template of {self.source} is not prefix-stable "
                    f"(rendering {bad[0]} is not the start of rendering {bad[1]}: it "
                    f"rewrites earlier turns), so assistant turn {i} cannot be located "
                    "for the loss mask")
            if len(upto) > len(before):
                spans.append((len(before), len(upto)))
        out, at = [], 0
        for start, end in spans:
            if start > at:
                out.append((whole[at:start], False))
            out.append((whole[start:end], True))
            at = end
        if at < len(whole):
            out.append((whole[at:], False))
        return out


def chat_prompt(tokenizer, template: ChatTemplate, messages: list[dict], where: str
                ) -> tuple[list[int], tuple[int, ...]]:
    """(The prompt ids of `messages` rendered with the generation prompt, the ids that end
    the reply): the text's tokens as transformers' apply_chat_template(tokenize=True)
    gives them (the template writes any BOS itself: nothing is framed around it), and the
    tokenizer's stop ids plus the template's end-of-turn token, when the text it writes
    after a reply starts with a special token (a template whose turns end in plain text,
    e.g. a newline, leaves the stop ids alone: a reply may hold that text)."""
    ids = [int(i) for i in tokenizer.encode(template.render(messages, True, where))]
    stops = tuple(tokenizer.stop_ids)
    after = tokenizer.encode(template.end_of_turn(messages, where))
    if len(after) and tokenizer.token_bytes[int(after[0])] == 0 and int(after[0]) not in stops:
        stops += (int(after[0]),)
    return ids, stops


def find_chat_template(tokenizer) -> ChatTemplate | None:
    """The chat template beside the tokenizer's tokenizer.json, or None (module doc)."""
    spec = getattr(tokenizer, "spec", "")
    if not spec.endswith(".json"):
        return None
    folder = Path(spec).parent
    config_file = folder / TOKENIZER_CONFIG_FILE
    config: dict = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"data.tokenizer: {config_file} is not readable JSON ({e})") from None
        if not isinstance(config, dict):
            raise DataError(f"data.tokenizer: {config_file} is not a JSON object")
    jinja_file = folder / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        try:
            template, source = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"data.tokenizer: cannot read {jinja_file} ({e})") from None
    else:
        template, source = _config_template(config.get("chat_template"), config_file), str(
            config_file)
    if template is None:
        return None
    specials = []
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):  # an AddedToken: {"content": "<s>", "lstrip": ...}
            value = value.get("content")
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"data.tokenizer: {config_file}: {name} must be a string or "
                            f"an object with 'content', got {value!r}")
        specials.append((name, value))
    out = ChatTemplate(source, template, tuple(specials))
    _compile(out.template, out.source)  # a template that does not parse: fail now
    return out


def _config_template(value, config_file: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise DataError(f"data.tokenizer: {config_file}: chat_template lists "
                        f"{sorted(map(str, named))} but no 'default' template")
    raise DataError(f"data.tokenizer: {config_file}: chat_template must be a string or a "
                    f"list of {{name, template}}, got {type(value).__name__}")


@functools.lru_cache(maxsize=8)
def _compile(template: str, source: str):
    """The template compiled in transformers' environment (module doc)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # transformers marks assistant output with {% generation %}...{% endgeneration %}
        # to track it; here the block only renders (turns are found by prefixes).
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: Jinja's own escapes HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"data.tokenizer: the chat template of {source} does not parse "
                        f"(line {e.lineno}: {e.message})") from None


__all__ = ["ChatTemplate", "chat_prompt", "find_chat_template", "CHAT_TEMPLATE_FILE",
           "TOKENIZER_CONFIG_FILE"]
