"""Torch backend: the only subpackage that imports torch."""
