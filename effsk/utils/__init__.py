"""Utilities every layer may use: atomic file writes (:mod:`.fileio`), device and precision (:mod:`.runtime`).

Layer 0 (with :mod:`effsk.scaling`). Imports the standard library and torch only; nothing from effsk.
"""
