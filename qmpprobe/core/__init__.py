"""Vocabulary and pure helpers every step shares: imports nothing else of qmpprobe."""
