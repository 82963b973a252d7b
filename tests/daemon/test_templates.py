"""The Go-template dialect, Ollama's Execute semantics, the Jinja fallback and tool-call parsing."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from corral.daemon.prompt.gotemplate import go_json
from corral.daemon.prompt.templates import GoTemplate, JinjaTemplate, TemplateError, for_model
from corral.daemon.prompt.toolcalls import ToolCallParser
from tests.daemon.test_templates_library import CONVERSATIONS, LIBRARY, TOOLS_CHATML


@pytest.mark.parametrize(("name", "case"), [(n, c) for n in LIBRARY for c in LIBRARY[n][1]])
def test_library_templates(name: str, case: str) -> None:
    text, expected = LIBRARY[name]
    messages, tools = CONVERSATIONS[case]
    assert GoTemplate(text).render(messages, tools) == expected[case]


def test_library_tool_support() -> None:
    for name, (text, _) in LIBRARY.items():
        t = GoTemplate(text)
        assert t.supports_tools == (name == "tools-chatml")
        assert t.uses_messages == (name not in ("llama2", "alpaca"))
    assert GoTemplate(TOOLS_CHATML).tool_call_tag() == "<tool_call>"


def ex(text: str, data: dict | None = None) -> str:
    # templates without .Response get {{ .Response }} appended (Ollama's Parse): give it ""
    return GoTemplate(text).execute({"Response": "", **(data or {})})


@pytest.mark.parametrize(
    ("text", "data", "out"),
    [
        ('a {{- " "}} b', {}, "a  b"),
        ("a {{- ' '}}", {}, "a32"),
        ("a  {{- 1 -}}  b", {}, "a1b"),
        ("{{- /* comment */ -}} x", {}, "x"),
        ("{{/* c */}}y", {}, "y"),
        ("{{ .A }}", {"A": "v"}, "v"),
        ("{{ .Missing }}", {}, "<no value>"),
        ("{{ if .A }}t{{ else }}f{{ end }}", {"A": ""}, "f"),
        ("{{ if .A }}t{{ else if .B }}b{{ else }}f{{ end }}", {"A": 0, "B": [1]}, "b"),
        ("{{ with .A }}{{ . }}{{ else }}none{{ end }}", {"A": "x"}, "x"),
        ("{{ with .A }}{{ . }}{{ else }}none{{ end }}", {"A": []}, "none"),
        ("{{ range .L }}[{{ . }}]{{ end }}", {"L": [1, 2]}, "[1][2]"),
        ("{{ range $i, $v := .L }}{{ $i }}={{ $v }};{{ end }}", {"L": ["a", "b"]}, "0=a;1=b;"),
        (
            "{{ range $k, $v := .M }}{{ $k }}:{{ $v }} {{ end }}",
            {"M": {"b": 1, "a": 2}},
            "a:2 b:1 ",
        ),
        ("{{ range .L }}x{{ else }}empty{{ end }}", {"L": []}, "empty"),
        (
            "{{ range .L }}{{ if eq . 2 }}{{ break }}{{ end }}{{ . }}{{ end }}",
            {"L": [1, 2, 3]},
            "1",
        ),
        (
            "{{ range .L }}{{ if eq . 2 }}{{ continue }}{{ end }}{{ . }}{{ end }}",
            {"L": [1, 2, 3]},
            "13",
        ),
        ("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}", {}, "2"),
        ("{{ $x := 1 }}{{ if true }}{{ $x := 3 }}{{ end }}{{ $x }}", {}, "1"),
        ("{{ range .L }}{{ $.T }}{{ end }}", {"L": [1], "T": "top"}, "top"),
        ('{{ and 1 0 2 }} {{ or 0 "" 3 }} {{ not 0 }}', {}, "0 3 true"),
        ("{{ and .A .A.B }}", {"A": None}, "<no value>"),  # short-circuit: .A.B never evaluated
        ('{{ eq .R "user" "system" }}', {"R": "system"}, "true"),
        (
            "{{ ne 1 2 }} {{ lt 1 2 }} {{ le 2 2 }} {{ gt 1 2 }} {{ ge 2 1 }}",
            {},
            "true true true false true",
        ),
        ("{{ len .S }} {{ len .L }}", {"S": "héllo", "L": [1, 2]}, "6 2"),
        ('{{ index .L 1 }} {{ index .M "k" }}', {"L": ["a", "b"], "M": {"k": "v"}}, "b v"),
        ("{{ slice .L 1 }} {{ slice .S 1 3 }}", {"L": [1, 2, 3], "S": "abcd"}, "[2 3] bc"),
        ("{{ len (slice .L 1) }}", {"L": [1, 2, 3]}, "2"),
        ('{{ print 1 2 "a" "b" 3 }}', {}, "1 2ab3"),
        ('{{ printf "%s=%d %q %v" "k" 3 "x" true }}', {}, 'k=3 "x" true'),
        ('{{ .S | printf "<%s>" }}', {"S": "p"}, "<p>"),
        (
            "{{ json .V }}",
            {"V": {"b": [1, 2.5, None], "a": "<&>"}},
            '{"a":"\\u003c\\u0026\\u003e","b":[1,2.5,null]}',
        ),
        ("{{ 1.0 }} {{ 1.5 }} {{ 1e6 }} {{ 0x10 }} {{ 'a' }}", {}, "1 1.5 1e+06 16 97"),
        ('{{ "a\\tb" }}{{ `raw\\n` }}', {}, "a\tbraw\\n"),
        (
            "{{ .L }} {{ .M }} {{ true }} {{ nil | print }}",
            {"L": [1, "a"], "M": {"k": 1}},
            "[1 a] map[k:1] true <nil>",
        ),
        ("{{ (index .L 0).Name }}", {"L": [{"Name": "n"}]}, "n"),
        ("{{ range 3 }}{{ . }}{{ end }}", {}, "012"),
    ],
)
def test_go_semantics(text: str, data: dict, out: str) -> None:
    assert ex(text, data) == out


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("line one\n{{ .A ", "template: :2: unclosed action"),
        ("{{ if .A }}x", "template: :1: unexpected EOF"),
        ("a\n\n{{ end }}", "template: :3: unexpected {{end}}"),
        ("{{ foo .A }}", 'template: :1: function "foo" not defined'),
        ("{{ $x }}", 'template: :1: undefined variable "$x"'),
        ("{{ break }}", "template: :1: {{break}} outside {{range}}"),
        ('{{ define "x" }}{{ end }}', "template: :1: {{define}} is not supported"),
        ("{{ .A }", "template: :1: unexpected"),
    ],
)
def test_parse_errors_name_the_line(text: str, error: str) -> None:
    with pytest.raises(TemplateError) as e:
        GoTemplate(text)
    assert str(e.value).startswith(error)


@pytest.mark.parametrize(
    ("text", "data", "error"),
    [
        (
            "{{ index .L 5 }}",
            {"L": [1]},
            "template: :1: error calling index: index out of range: 5",
        ),
        ('{{ eq 1 "a" }}', {}, "template: :1: error calling eq: incompatible types for comparison"),
        ("{{\n.A.B }}", {"A": "s"}, "template: :2: executing"),
        ("{{ .A 1 }}", {"A": "s"}, "template: :1: can't give argument to non-function"),
        ("{{ call .F }}", {}, "template: :1: error calling call: call of nil"),
        ("{{ call .A 1 }}", {"A": "s"}, "template: :1: error calling call: non-function"),
    ],
)
def test_execution_errors(text: str, data: dict, error: str) -> None:
    with pytest.raises(TemplateError) as e:
        ex(text, data)
    assert str(e.value).startswith(error)


def test_go_json() -> None:
    assert (
        go_json([1.0, 1e21, 1e-7, 0.1, "é\u2028\n", True, None])
        == '[1,1e+21,1e-7,0.1,"é\\u2028\\n",true,null]'
    )


# ---- Ollama's Execute: legacy, FIM, response appended --------------------------------------------

LEGACY_QA = "{{ with .System }}{{ . }}\n{{ end }}Q: {{ .Prompt }}\nA: "
LEGACY_QA_RESPONSE = LEGACY_QA + "{{ .Response }}"
ZEPHYR_LEGACY = """{{ if .System }}<|system|>
{{ .System }}</s>
{{ end }}{{ if .Prompt }}<|user|>
{{ .Prompt }}</s>
{{ end }}<|assistant|>
{{ .Response }}</s>
"""


@pytest.mark.parametrize("text", [LEGACY_QA, LEGACY_QA_RESPONSE])
def test_legacy_per_turn(text: str) -> None:
    # without .Response the template gets {{ .Response }} appended: both render the same
    msgs = [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
    ]
    assert GoTemplate(text).render(msgs) == "Be exact.\nQ: 2+2?\nA: 4Q: 3+3?\nA: "


def test_legacy_continues_a_partial_assistant_turn() -> None:
    msgs = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Spell it."},
        {"role": "assistant", "content": "fo"},
    ]
    # the last turn stops right after .Response: its "\n" is cut
    assert GoTemplate("Q: {{ .Prompt }}\nA: {{ .Response }}\n").render(msgs) == (
        "Q: 2+2?\nA: 4\nQ: Spell it.\nA: fo"
    )


def test_legacy_cuts_after_response() -> None:
    msgs = [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
    ]
    assert GoTemplate(ZEPHYR_LEGACY).render(msgs) == (
        "<|system|>\nBe exact.</s>\n<|user|>\n2+2?</s>\n<|assistant|>\n4</s>\n"
        "<|user|>\n3+3?</s>\n<|assistant|>\n"
    )


def test_fill_in_the_middle_and_defaults() -> None:
    t = GoTemplate("<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>")
    assert t.supports_insert
    assert (
        t.render([{"role": "user", "content": "def f("}], prompt="def f(", suffix="return 1")
        == "<|fim_prefix|>def f(<|fim_suffix|>return 1<|fim_middle|>"
    )
    default = for_model(None)
    assert (
        default.render(
            [{"role": "system", "content": "dropped"}, {"role": "user", "content": "hi"}]
        )
        == "hi"
    )


def test_collate_merges_consecutive_roles() -> None:
    t = GoTemplate("{{ .System }}|{{ range .Messages }}{{ .Role }}:{{ .Content }};{{ end }}")
    assert (
        t.render(
            [
                {"role": "system", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "user", "content": "x"},
                {"role": "user", "content": "y"},
                {"role": "tool", "content": "t1"},
                {"role": "tool", "content": "t2"},
            ]
        )
        == "a\n\nb|system:a\n\nb;user:x\n\ny;tool:t1;tool:t2;"
    )


# ---- tools ---------------------------------------------------------------------------------------

# Llama 3 headers with JSON tool calls: nothing but JSON inside the .ToolCalls branch, so the
# tool-call prefix is "{"; tools and arguments are printed with {{ . }} (their String() is JSON)
LLAMA3_JSON_TOOLS = """{{- range .Messages }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ if $.Tools }}You may call a function. Answer with JSON {"name": name, "parameters": {...}} only.
Functions:
{{ range $.Tools }}{{ . }}
{{ end }}
{{ end }}{{ .Content }}<|eot_id|>
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ if .ToolCalls }}{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "parameters": {{ .Function.Arguments }}}{{ end }}
{{- else }}{{ .Content }}{{ end }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""  # noqa: E501 - the template verbatim


def test_json_tools_print_as_json_and_tag_is_brace() -> None:
    t = GoTemplate(LLAMA3_JSON_TOOLS)
    assert t.supports_tools and t.tool_call_tag() == "{"
    out = t.render(
        [{"role": "user", "content": "Q?"}],
        [
            {
                "type": "function",
                "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
            }
        ],
    )
    assert out == (
        "<|start_header_id|>user<|end_header_id|>\n\nYou may call a function. Answer "
        'with JSON {"name": name, "parameters": {...}} only.\nFunctions:\n'
        '{"type":"function","function":{"name":"f","parameters":{"type":"object",'
        '"properties":{}}}}\n\nQ?<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    call = {"function": {"name": "f", "arguments": {"b": [1], "a": 2}}}
    out = t.render(
        [
            {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
        ]
    )
    assert out == (
        "<|start_header_id|>user<|end_header_id|>\n\nQ?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "f", "parameters": {"a":2,"b":[1]}}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def feed(parser: ToolCallParser, chunks: list[str]) -> tuple[list[dict], str]:
    calls, content = [], ""
    for c in chunks:
        got, text = parser.add(c)
        calls += got
        content += text
    return calls, content + parser.flush()


TOOLS = [{"function": {"name": "get_weather"}}, {"function": {"name": "get"}}]


@pytest.mark.parametrize(
    ("tag", "chunks", "names", "content"),
    [
        (
            "<tool_call>",
            [
                "Sure. <tool",
                '_call>\n{"name": "get_weather", "arguments": ',
                '{"city": "Paris"}}\n</tool_call>',
            ],
            ["get_weather"],
            "Sure. ",
        ),
        (
            "<tool_call>",
            [
                '<tool_call>{"name": "get", "arguments": {}}</tool_call>'
                '<tool_call>{"name": "get_weather", "arguments": {"a": 1}}'
            ],
            ["get", "get_weather"],
            "",
        ),
        ("{", ['  {"name": "get_weather", "parameters": {"city": "P"}}'], ["get_weather"], "  "),
        ("{", ['The answer is {"name": "get"}'], [], 'The answer is {"name": "get"}'),
        ("{", ['{"a": 1}'], [], '{"a": 1}'),
        (
            "[TOOL_CALLS]",
            ['[TOOL_CALLS] [{"name": "get_weather", "arguments": {"x": "}"}}]'],
            ["get_weather"],
            "",
        ),
    ],
)
def test_tool_call_parser(tag: str, chunks: list[str], names: list[str], content: str) -> None:
    calls, text = feed(ToolCallParser(tag, TOOLS), chunks)
    assert [c["function"]["name"] for c in calls] == names
    assert [c["function"]["index"] for c in calls] == list(range(len(names)))
    assert text == content


def test_tool_call_arguments() -> None:
    calls, _ = feed(
        ToolCallParser("<tool_call>", TOOLS),
        ['<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"P\\"}"}'],
    )
    assert calls[0]["function"]["arguments"] == {"city": "P"}


# ---- Jinja ---------------------------------------------------------------------------------------

TURNS_JINJA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m.role == 'assistant' else m.role %}"
    "<start_of_turn>{{ role }}\n{{ m.content | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_jinja_chat_template() -> None:
    t = for_model(None, TURNS_JINJA, bos_token="<bos>")
    assert isinstance(t, JinjaTemplate)
    assert t.render(
        [
            {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye\n"},
        ]
    ) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )


def test_jinja_tools_and_errors() -> None:
    t = JinjaTemplate(
        "{% for t in tools %}{{ t | tojson }}{% endfor %}"
        "{{ raise_exception('no system') if messages[0].role == 'system' else '' }}"
    )
    assert t.supports_tools
    assert t.render([{"role": "user", "content": "x"}], [{"name": "<f>"}]) == '{"name": "<f>"}'
    with pytest.raises(TemplateError, match="no system"):
        t.render([{"role": "system", "content": "x"}])
    with pytest.raises(TemplateError, match="line 2"):
        JinjaTemplate("ok\n{% if %}")
    with pytest.raises(TemplateError):
        JinjaTemplate("{{ ''.__class__.__mro__ }}").render([])


class RescanningParser(ToolCallParser):
    """The parser scanning its whole buffer again for every chunk (as it did before issue 18):
    the reference the resumed scans must agree with."""

    _resume = False


# pieces of model output around tool calls: tags (also cut), names (also a prefix of another),
# JSON with nesting, strings holding brackets, quotes and backslashes, and text that is not JSON
_PIECES = [
    "<tool_call>",
    "<tool",
    "_call>",
    "</tool_call>",
    "[TOOL_CALLS]",
    "Sure. ",
    "\n",
    " ",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    '{"name": "get", "parameters": {"q": "{[}]"}}',
    '{"get_weather": {"a": [1, {"b": 2}]}}',
    '{"name": "get", "arguments": "{\\"x\\": \\"y\\"}"}',
    '[{"name": "get_weather", "arguments": {"x": "}"}}]',
    "get",
    "get_wea",
    "ther",
    '{"a": 1}',
    "{not json}",
    "{",
    "}",
    "[",
    "]",
    '"',
    "\\",
    '\\"',
    '"x\\\\"',
]


@given(
    tag=st.sampled_from(["<tool_call>", "{", "[TOOL_CALLS]", "["]),
    pieces=st.lists(st.sampled_from(_PIECES), max_size=14),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    by_char=st.booleans(),
)
@example(  # a chunk ending in a backslash inside a string: the next quote is escaped
    tag="[",
    pieces=['[{"name": "get", "arguments": {"q": "a\\"]"}}, {"name": "get"}]'],
    cuts=[],
    by_char=True,
)
@settings(max_examples=400, deadline=None)
def test_resumed_scans_parse_as_rescanning_the_buffer(
    tag: str, pieces: list[str], cuts: list[int], by_char: bool
) -> None:
    text = "".join(pieces)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    chunks = (
        list(text) if by_char else [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    )
    assert feed(ToolCallParser(tag, TOOLS), chunks) == feed(RescanningParser(tag, TOOLS), chunks)


def test_a_long_call_streamed_token_by_token_is_scanned_once() -> None:
    """A call of n characters arriving a few characters at a time: the scans look at each
    character a bounded number of times (O(n)), where rescanning looked at the whole buffer for
    every chunk (O(n²)). Same call either way."""
    city = "x" * 2_000
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "' + city + '"}}</tool_call>'
    chunks = [text[i : i + 3] for i in range(0, len(text), 3)]
    resumed, rescanning = (
        ToolCallParser("<tool_call>", TOOLS),
        RescanningParser("<tool_call>", TOOLS),
    )
    got = feed(resumed, chunks)
    assert got == feed(rescanning, chunks)
    assert got[0][0]["function"]["arguments"] == {"city": city}
    assert resumed.scanned <= 3 * len(text)
    assert rescanning.scanned > 100 * len(text)
