"""Hugging Face hub look-ups that every stage may need, without downloading anything large."""

from __future__ import annotations

import huggingface_hub
from huggingface_hub import constants

__all__ = ["hub_has", "model_available"]


def hub_has(repo_id: str, repo_type: str) -> bool:
    """True when ``repo_id`` is in the local hub cache or the hub answers for it."""
    probe = "config.json" if repo_type == "model" else "README.md"
    cached = huggingface_hub.try_to_load_from_cache(repo_id, probe, repo_type=repo_type)
    if isinstance(cached, str):
        return True
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        huggingface_hub.HfApi().repo_info(repo_id, repo_type=repo_type, timeout=10)
        return True
    except Exception:  # offline, DNS, 404, auth: all mean "not reachable from here"
        return False


def model_available(name_or_path: str) -> bool:
    """True when ``name_or_path`` is a local folder, or a hub id that is cached or reachable."""
    import os

    if os.path.isdir(name_or_path):
        return True
    return not os.path.isabs(name_or_path) and hub_has(name_or_path, "model")
