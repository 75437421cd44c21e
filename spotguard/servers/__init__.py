"""Inference engine adapters: one module per engine, each an ``EngineAdapter``; ``build_engine`` picks one."""

from spotguard.servers.base import EngineAdapter
from spotguard.servers.registry import build_engine

__all__ = ["EngineAdapter", "build_engine"]
