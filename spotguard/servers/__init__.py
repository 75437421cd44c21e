"""Inference engine adapters: one module per engine, each an ``EngineAdapter``."""
