"""Prompts: the Go text/template interpreter, template rendering (Go and GGUF Jinja), tool calls
in model output, thinking, chat history truncation."""
