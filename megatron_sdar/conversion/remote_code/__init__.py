"""The transformers remote-code model written into every SDAR export (``--format sdar``).

These files are copied verbatim next to the weights, so they import only ``torch`` and
``transformers`` (4.5x and 5.x) and nothing of this package: a folder loads with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` wherever it is copied.
"""

from __future__ import annotations

import os

DENSE_FILES = ("configuration_sdar.py", "modeling_sdar.py")
MOE_FILES = (*DENSE_FILES, "configuration_sdar_moe.py", "modeling_sdar_moe.py")
DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def files_for(moe: bool) -> tuple[str, ...]:
    """The remote-code files an export ships (the MoE model builds on the dense one)."""
    return MOE_FILES if moe else DENSE_FILES


def auto_map(moe: bool) -> dict[str, str]:
    """config.json ``auto_map``: which class each transformers Auto class loads."""
    if moe:
        return {
            "AutoConfig": "configuration_sdar_moe.SDARMoeConfig",
            "AutoModel": "modeling_sdar_moe.SDARMoeModel",
            "AutoModelForCausalLM": "modeling_sdar_moe.SDARMoeForCausalLM",
        }
    return {
        "AutoConfig": "configuration_sdar.SDARConfig",
        "AutoModel": "modeling_sdar.SDARModel",
        "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
    }
