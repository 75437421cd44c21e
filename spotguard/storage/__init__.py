"""Snapshots of in-flight context to object storage (obstore), and resume on another node.

``snapshot`` is the drain step's work, ``reader`` the public API for tools and routers, ``resume``
replays a snapshot to another OpenAI-compatible server. docs/snapshots.md describes the format.
"""
