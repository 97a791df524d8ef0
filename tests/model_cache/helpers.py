"""Small byte-exact fixtures for the model-cache tests (no torch needed)."""

from __future__ import annotations

import json
import struct


def safetensors_bytes(payload: bytes, name: str = "w") -> bytes:
    """A valid ``.safetensors`` file holding ``payload`` as one U8 tensor (so content and size stay under test control)."""
    header = json.dumps({name: {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(header)) + header + payload
