"""Typed config trees (frozen, validated dataclasses in sections) and the command line generated from them.

Layer: above the library (data, encoder, mining), below the Beam code; no Beam here."""
