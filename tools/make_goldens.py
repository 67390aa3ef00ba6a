#!/usr/bin/env python3
"""Tokenizer and prompt goldens from llama.cpp, an implementation independent of ours.

Needs `llama-cpp-python` (tools/requirements-llamacpp.txt; it builds llama.cpp, which needs
cmake). Regenerate with:

    python tools/make_goldens.py models/SmolLM2-135M-Instruct.Q4_1.gguf tests/golden
    python tools/reference.py models/SmolLM2-135M-Instruct.Q4_1.gguf \
        tests/golden/prompts.json --out tests/golden/greedy.json
"""
import json
import os
import sys

from llama_cpp import Llama

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat(user):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


# Text-only goldens: the tricky parts of the smollm pre-tokenizer and byte-level BPE.
TOKENIZER_TEXTS = [
    "Hello, world!",
    "Once upon a time, there was a little",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "  leading spaces and\ttabs\nand newlines\n\n",
    "naïve café, Zürich, 東京, emoji 🦀🚀",
    "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)",
    "I'm sure you've seen it; they'll say it's fine, we're done.",
    "<|im_start|>user\nHi<|im_end|>\n",
    "x=1234567890",
    "",
]

# Generation goldens: (name, text, is_chat, max_tokens).
PROMPTS = [
    ("story", "Once upon a time, there was a little", False, 32),
    ("capital", "The capital of France is", False, 24),
    ("code", "def fibonacci(n):\n", False, 32),
    ("science", "Photosynthesis is the process by which", False, 32),
    ("chat_capital", "What is the capital of Germany?", True, 32),
    ("chat_list", "List three primary colors.", True, 40),
]


def main():
    model, outdir = sys.argv[1], sys.argv[2]
    llm = Llama(model_path=model, vocab_only=True, verbose=False)

    def tok(text):
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    tokenizer = [{"text": t, "ids": tok(t)} for t in TOKENIZER_TEXTS]
    prompts = []
    for name, text, is_chat, max_tokens in PROMPTS:
        full = chat(text) if is_chat else text
        prompts.append({"name": name, "text": text, "chat": is_chat,
                        "prompt_ids": tok(full), "max_tokens": max_tokens})
    gen = "tools/make_goldens.py (llama.cpp tokenizer via llama-cpp-python)"
    with open(os.path.join(outdir, "tokenizer.json"), "w") as f:
        json.dump({"generator": gen, "cases": tokenizer}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(outdir, "prompts.json"), "w") as f:
        json.dump({"generator": gen, "prompts": prompts}, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
