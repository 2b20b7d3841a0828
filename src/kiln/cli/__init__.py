"""Kiln's command lines: they import the library; the library and the stages never import them."""
