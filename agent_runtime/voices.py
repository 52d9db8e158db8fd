"""Voices a persona can speak with: the named presets every worker offers, and (below) how an audio
clip is checked and prepared for priming.

This module imports no torch: the gateway validates tenant voices with it without loading a model.
"""

from __future__ import annotations

# PersonaPlex's published voices (`voices.tgz` of nvidia/personaplex-7b-v1): natural and varied,
# female and male. The tiny model offers the same names, so a tenant file runs on either model.
PRESET_VOICES: tuple[str, ...] = (
    *(f"NATF{i}" for i in range(4)),
    *(f"NATM{i}" for i in range(4)),
    *(f"VARF{i}" for i in range(5)),
    *(f"VARM{i}" for i in range(5)),
)
