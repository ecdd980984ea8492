"""Our own Llama-family decoder (Llama, SmolLM, Mistral, Qwen2) in plain PyTorch.

transformers is the loader, tokenizer and correctness oracle; it is never the runtime.
"""
