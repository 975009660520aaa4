"""Data: sources (easy-VQA, LLaVA JSON), tokenizers, encoding and batching, the datamodule."""
