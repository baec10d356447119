"""Guided decoding: the lexicographic rule (``scorer``), its vLLM adapters (``v1``, ``v2``, sharing ``common`` and
``kernels``) and its settings (``config``)."""
