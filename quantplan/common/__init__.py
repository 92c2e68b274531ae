"""Leaf helpers every room may use (sizes, atomic writes, moving batches); they import no room."""
