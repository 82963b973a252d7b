"""The story prompts the runner benchmarks stream (long answers: 128 tokens end before EOS)."""

PROMPTS = [
    "Write a long story about a dragon who learns to paint.",
    "Explain in detail how a steam engine works.",
    "Describe a journey across a desert, day by day.",
    "Write a long letter from a lighthouse keeper to his sister.",
    "Tell the history of a small mountain village over 300 years.",
    "Describe every room of an old castle.",
    "Write a detailed recipe book entry for bread, with stories.",
    "Explain the life cycle of stars to a curious child, at length.",
]


def chat(prompt: str) -> str:
    """Gemma's turn markers around one user message."""
    return f"<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"
