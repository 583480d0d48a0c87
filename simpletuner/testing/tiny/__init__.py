"""Tiny offline pipelines per model family, one recipe per file (``build_tiny_pipeline(seed)``).

Each recipe builds the family's real diffusers/transformers classes with tiny configs and offline
tokenizers (:mod:`simpletuner.testing.tokenizers`) and returns ``(pipeline, vae_source)``;
:func:`simpletuner.testing.tiny_models.make_tiny_model` saves it as an ordinary pipeline folder.
"""
