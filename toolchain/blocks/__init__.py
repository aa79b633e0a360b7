"""Shared graph pieces: the maths architectures compose their layers from (attention, MLA,
rotary embeddings, routing rules)."""
