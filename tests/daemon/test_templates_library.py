"""Chat templates in Ollama's Go-template dialect, with the prompts they must render, as data for
test_templates.py.

This is corral's own test data (clean room): each template was written here from the chat format
as its model vendor documents it (ChatML, Llama 2 and 3, Gemma, Mistral, Alpaca, Vicuna, Zephyr,
Phi-3, Hermes/Qwen-style tool calls), and every expected prompt was derived by hand from the
template's meaning, not by running a renderer. Nothing here is copied from another project.

Between them the templates use: ``range`` over ``.Messages`` with no, one and two variables,
last-message detection (``$last := eq (len (slice $.Messages $i)) 1``), ``if``/``else if``/
``else``, ``with``, variables declared and reassigned inside ``range``, ``continue``, trim markers
on either side, comments, ``printf``, ``json``, ``.Tools``/``.ToolCalls``, and the legacy
``.System``/``.Prompt``/``.Response`` form (Llama 2, Alpaca: one execution per turn, the last one
cut after ``.Response``).
"""

from __future__ import annotations

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
USER1 = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT1 = {"role": "assistant", "content": "Paris."}
USER2 = {"role": "user", "content": "And of Italy?"}

# our own tools: one with typed, described, enumerated and defaulted parameters (``default`` is not
# a field of Ollama's api.ToolProperty, so it never reaches the template), one without parameters
CONVERT = {
    "type": "function",
    "function": {
        "name": "convert_currency",
        "description": "Convert an amount between currencies",
        "parameters": {
            "type": "object",
            "required": ["amount", "to"],
            "properties": {
                "to": {"type": "string", "enum": ["EUR", "USD"]},
                "amount": {"type": "number", "description": "How much"},
                "from": {"type": "string", "default": "USD"},
            },
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time",
        "parameters": {"type": "object", "properties": {}},
    },
}
# json . of each as Go marshals api.Tool: declared field order, empty optional fields dropped,
# property maps sorted by key
CONVERT_JSON = (
    '{"type":"function","function":{"name":"convert_currency",'
    '"description":"Convert an amount between currencies","parameters":'
    '{"type":"object","required":["amount","to"],"properties":'
    '{"amount":{"type":"number","description":"How much"},'
    '"from":{"type":"string"},"to":{"type":"string","enum":["EUR","USD"]}}}}}'
)
CLOCK_JSON = (
    '{"type":"function","function":{"name":"get_time","description":"Current time",'
    '"parameters":{"type":"object","properties":{}}}}'
)

# name -> (messages, tools)
CONVERSATIONS: dict[str, tuple[list[dict], list[dict] | None]] = {
    "user": ([USER1], None),
    "user-assistant-user": ([USER1, ASSISTANT1, USER2], None),
    "system-user-assistant-user": ([SYSTEM, USER1, ASSISTANT1, USER2], None),
    # the last message is the assistant's: templates that care continue it (no end-of-turn)
    "user-assistant": ([USER1, ASSISTANT1], None),
    "tools-call-result": (
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "How much is 10 USD in EUR?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "function": {
                            "name": "convert_currency",
                            "arguments": {"to": "EUR", "amount": 10},
                        }
                    }
                ],
            },
            {"role": "tool", "content": "9.2"},
        ],
        [CONVERT, CLOCK],
    ),
    "tools-two-calls": (
        [
            {"role": "user", "content": "Time, and 5 EUR in USD?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "get_time", "arguments": {}}},
                    {
                        "function": {
                            "name": "convert_currency",
                            "arguments": {"amount": 5, "from": "EUR", "to": "USD"},
                        }
                    },
                ],
            },
            {"role": "tool", "content": "12:00"},
            {"role": "tool", "content": "5.4"},
        ],
        [CLOCK, CONVERT],
    ),
}

# ChatML: every message (system too) is a turn; an open assistant turn at the end.
CHATML = """{{- range $m := .Messages -}}
<|im_start|>{{ $m.Role }}
{{ $m.Content }}<|im_end|>
{{ end -}}
<|im_start|>assistant
"""

# Llama 3: .System first, system messages skipped, <|eot_id|> after each turn except a trailing
# assistant one (which the model continues); an open assistant header after anything else.
LLAMA3 = """{{- /* Llama 3 header tokens; <|begin_of_text|> is the tokenizer's BOS */ -}}
{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $m.Role "system" }}{{ continue }}{{ end }}<|start_header_id|>{{ $m.Role }}<|end_header_id|>

{{ $m.Content }}
{{- if or (ne $m.Role "assistant") (not $last) }}<|eot_id|>{{ end }}
{{- if and $last (ne $m.Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""  # noqa: E501 - the template verbatim

# Gemma: roles user/model, no system role: the system text opens the first user turn.
GEMMA = """{{- $pending := .System }}
{{- range .Messages }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ with $pending }}{{ . }}

{{ end }}{{ .Content }}<end_of_turn>
{{ $pending = "" }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""

# Mistral: [INST] ... [/INST] answer</s>; the system text goes into the last user turn.
MISTRAL = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}[INST] {{ if and $last $.System }}{{ $.System }}

{{ end }}{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}{{ if not $last }}</s>{{ end }}
{{- end }}
{{- end }}"""

# Llama 2, legacy form: <s>[INST] <<SYS>>\n...\n<</SYS>>\n\nprompt [/INST] answer </s>
LLAMA2 = """<s>[INST] {{ if .System }}<<SYS>>
{{ .System }}
<</SYS>>

{{ end }}{{ .Prompt }} [/INST]{{ if .Response }} {{ .Response }} </s>{{ end }}"""

# Alpaca, legacy form with `with`.
ALPACA = """{{ with .System }}{{ . }}

{{ end }}### Instruction:
{{ .Prompt }}

### Response:
{{ .Response }}

"""

# Vicuna v1.1: system line, USER:/ASSISTANT: turns, </s> after answers.
VICUNA = """{{- if .System }}{{ .System }}

{{ end }}
{{- range $m := .Messages }}
{{- if eq $m.Role "user" }}USER: {{ $m.Content }}
{{ else if eq $m.Role "assistant" }}ASSISTANT: {{ $m.Content }}</s>
{{ end }}
{{- end }}ASSISTANT:"""

# Zephyr: <|role|>\ncontent</s>\n
ZEPHYR = """{{- range .Messages }}{{ printf "<|%s|>" .Role }}
{{ .Content }}</s>
{{ end }}<|assistant|>
"""

# Phi-3: <|role|>\ncontent<|end|>\n; the system text from .System, system messages skipped;
# written with right-hand trim markers.
PHI3 = """{{- with .System }}<|system|>
{{ . }}<|end|>
{{ end }}
{{- range $i, $m := .Messages -}}
{{ if ne $m.Role "system" -}}
<|{{ $m.Role }}|>
{{ $m.Content }}<|end|>
{{ end }}
{{- end -}}
<|assistant|>
"""

# ChatML with Hermes/Qwen-style tools: signatures as JSON lines in <tools></tools> in the system
# turn, each call a JSON object in its own <tool_call></tool_call>, results in a `tool` turn with
# <tool_response></tool_response>. The model's tool-call prefix is "<tool_call>".
TOOLS_CHATML = """{{- if or .System .Tools }}<|im_start|>system
{{ with .System }}{{ . }}{{ if $.Tools }}

{{ end }}{{ end }}
{{- with .Tools }}# Tools

You can call functions. Their signatures are in <tools></tools> tags:
<tools>
{{- range . }}
{{ json . }}
{{- end }}
</tools>

To call a function, reply with a JSON object inside <tool_call></tool_call> tags:
<tool_call>
{"name": "function name", "arguments": {"argument name": "value"}}
</tool_call>
{{- end }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{- if .ToolCalls }}
{{- range .ToolCalls }}
<tool_call>
{"name": {{ json .Function.Name }}, "arguments": {{ json .Function.Arguments }}}
</tool_call>
{{- end }}
{{- else }}
{{ .Content }}
{{- end }}
{{- if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>tool
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

_TOOLS_SYSTEM = (
    "# Tools\n\nYou can call functions. Their signatures are in <tools></tools> tags:\n<tools>\n"
    "{tools}\n</tools>\n\n"
    "To call a function, reply with a JSON object inside <tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": "function name", "arguments": {{"argument name": "value"}}}}\n'
    "</tool_call>"
)

# name -> (template, {conversation name: the prompt it renders})
LIBRARY: dict[str, tuple[str, dict[str, str]]] = {
    "chatml": (
        CHATML,
        {
            "user": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\n",
            "user-assistant-user": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\nParis.<|im_end|>\n"
            "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
            "<|im_start|>assistant\n",
            "system-user-assistant-user": "<|im_start|>system\n"
            "You are a terse assistant.<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\nParis.<|im_end|>\n"
            "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
            "<|im_start|>assistant\n",
        },
    ),
    "llama3": (
        LLAMA3,
        {
            "user": "<|start_header_id|>user<|end_header_id|>\n\n"
            "What is the capital of France?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "user-assistant-user": "<|start_header_id|>user<|end_header_id|>\n\n"
            "What is the capital of France?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nAnd of Italy?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "system-user-assistant-user": "<|start_header_id|>system<|end_header_id|>\n\n"
            "You are a terse assistant.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n"
            "What is the capital of France?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
            "Paris.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n"
            "And of Italy?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "user-assistant": "<|start_header_id|>user<|end_header_id|>\n\n"
            "What is the capital of France?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nParis.",
        },
    ),
    "gemma": (
        GEMMA,
        {
            "user": "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
            "<start_of_turn>model\n",
            "user-assistant-user": "<start_of_turn>user\n"
            "What is the capital of France?<end_of_turn>\n"
            "<start_of_turn>model\nParis.<end_of_turn>\n"
            "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
            "<start_of_turn>model\n",
            "system-user-assistant-user": "<start_of_turn>user\nYou are a terse assistant.\n\n"
            "What is the capital of France?<end_of_turn>\n"
            "<start_of_turn>model\nParis.<end_of_turn>\n"
            "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
            "<start_of_turn>model\n",
        },
    ),
    "mistral": (
        MISTRAL,
        {
            "user": "[INST] What is the capital of France? [/INST]",
            "user-assistant-user": "[INST] What is the capital of France? [/INST] Paris.</s>"
            "[INST] And of Italy? [/INST]",
            "system-user-assistant-user": "[INST] What is the capital of France? [/INST] Paris.</s>"
            "[INST] You are a terse assistant.\n\nAnd of Italy? [/INST]",
            "user-assistant": "[INST] What is the capital of France? [/INST] Paris.",
        },
    ),
    "llama2": (
        LLAMA2,
        {
            "user": "<s>[INST] What is the capital of France? [/INST]",
            "user-assistant-user": "<s>[INST] What is the capital of France? [/INST] Paris. </s>"
            "<s>[INST] And of Italy? [/INST]",
            "system-user-assistant-user": "<s>[INST] <<SYS>>\n"
            "You are a terse assistant.\n<</SYS>>\n\n"
            "What is the capital of France? [/INST] Paris. </s>"
            "<s>[INST] And of Italy? [/INST]",
            "user-assistant": "<s>[INST] What is the capital of France? [/INST] Paris.",
        },
    ),
    "alpaca": (
        ALPACA,
        {
            "user": "### Instruction:\nWhat is the capital of France?\n\n### Response:\n",
            "user-assistant-user": "### Instruction:\nWhat is the capital of France?\n\n"
            "### Response:\nParis.\n\n"
            "### Instruction:\nAnd of Italy?\n\n### Response:\n",
            "system-user-assistant-user": "You are a terse assistant.\n\n"
            "### Instruction:\nWhat is the capital of France?\n\n"
            "### Response:\nParis.\n\n"
            "### Instruction:\nAnd of Italy?\n\n### Response:\n",
            "user-assistant": "### Instruction:\nWhat is the capital of France?\n\n"
            "### Response:\nParis.",
        },
    ),
    "vicuna": (
        VICUNA,
        {
            "user": "USER: What is the capital of France?\nASSISTANT:",
            "user-assistant-user": "USER: What is the capital of France?\nASSISTANT: Paris.</s>\n"
            "USER: And of Italy?\nASSISTANT:",
            "system-user-assistant-user": "You are a terse assistant.\n\n"
            "USER: What is the capital of France?\n"
            "ASSISTANT: Paris.</s>\nUSER: And of Italy?\nASSISTANT:",
        },
    ),
    "zephyr": (
        ZEPHYR,
        {
            "user": "<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n",
            "user-assistant-user": "<|user|>\nWhat is the capital of France?</s>\n"
            "<|assistant|>\nParis.</s>\n<|user|>\nAnd of Italy?</s>\n"
            "<|assistant|>\n",
            "system-user-assistant-user": "<|system|>\nYou are a terse assistant.</s>\n"
            "<|user|>\nWhat is the capital of France?</s>\n"
            "<|assistant|>\nParis.</s>\n<|user|>\nAnd of Italy?</s>\n"
            "<|assistant|>\n",
        },
    ),
    "phi3": (
        PHI3,
        {
            "user": "<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n",
            "user-assistant-user": "<|user|>\nWhat is the capital of France?<|end|>\n"
            "<|assistant|>\nParis.<|end|>\n<|user|>\nAnd of Italy?<|end|>\n"
            "<|assistant|>\n",
            "system-user-assistant-user": "<|system|>\nYou are a terse assistant.<|end|>\n"
            "<|user|>\nWhat is the capital of France?<|end|>\n"
            "<|assistant|>\nParis.<|end|>\n"
            "<|user|>\nAnd of Italy?<|end|>\n"
            "<|assistant|>\n",
        },
    ),
    "tools-chatml": (
        TOOLS_CHATML,
        {
            "user": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\n",
            "user-assistant-user": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\nParis.<|im_end|>\n"
            "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
            "<|im_start|>assistant\n",
            "system-user-assistant-user": "<|im_start|>system\n"
            "You are a terse assistant.<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\nParis.<|im_end|>\n"
            "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
            "<|im_start|>assistant\n",
            "user-assistant": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\nParis.",
            "tools-call-result": "<|im_start|>system\nAnswer briefly.\n\n"
            + _TOOLS_SYSTEM.format(tools=CONVERT_JSON + "\n" + CLOCK_JSON)
            + "<|im_end|>\n"
            "<|im_start|>user\nHow much is 10 USD in EUR?<|im_end|>\n"
            "<|im_start|>assistant\n<tool_call>\n"
            '{"name": "convert_currency", "arguments": {"amount":10,"to":"EUR"}}\n'
            "</tool_call><|im_end|>\n"
            "<|im_start|>tool\n<tool_response>\n9.2\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n",
            "tools-two-calls": "<|im_start|>system\n"
            + _TOOLS_SYSTEM.format(tools=CLOCK_JSON + "\n" + CONVERT_JSON)
            + "<|im_end|>\n"
            "<|im_start|>user\nTime, and 5 EUR in USD?<|im_end|>\n"
            "<|im_start|>assistant\n"
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
            '<tool_call>\n{"name": "convert_currency", "arguments": '
            '{"amount":5,"from":"EUR","to":"USD"}}\n</tool_call><|im_end|>\n'
            "<|im_start|>tool\n<tool_response>\n12:00\n</tool_response><|im_end|>\n"
            "<|im_start|>tool\n<tool_response>\n5.4\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n",
        },
    ),
}
