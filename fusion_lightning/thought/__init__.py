"""Thought-level fusion: templates summarised from the log's best answers, a trained retriever, prompts."""
