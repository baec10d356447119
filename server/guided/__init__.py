"""Guided decoding: the lexicographic rule (``scorer``), its vLLM V1 adapter (``v1``) and its settings (``config``)."""
