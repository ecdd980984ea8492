"""Segmented / gathered LoRA matmuls (filled in by the multi-adapter work).

Deliberately defines no ``__version__``: transformers probes for a Hugging Face package also
called ``kernels`` and must not mistake this one for it (see tests/test_naming_hazard.py).
"""
