"""A checkpoint's config.json checked before anything is allocated or downloaded.

A published config with ``n_heads`` 0, a string ``dim``, kv-heads that do not divide the heads
or ``n_layers`` of 10⁸ would otherwise fail deep inside a conversion or ``from_pretrained``
(ZeroDivisionError, TypeError) or exhaust the machine's memory; :func:`check_shape` names the
file and the field first.
"""

from __future__ import annotations

__all__ = ["ConversionError", "SHAPE_LIMITS", "TRANSFORMERS_FIELDS", "check_shape"]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted or loaded; the message names the file and why."""


#: The largest value a shape field may have: far above any published checkpoint (Qwen2-72B has
#: 80 layers of width 8192, a 152k vocabulary), far below what would exhaust a machine's memory
#: before the weights are even read (``n_layers`` of 10⁸).
SHAPE_LIMITS = {"hidden": 1 << 16, "layers": 1024, "heads": 1024, "kv_heads": 1024,
                "vocab": 1 << 22, "positions": 1 << 22, "intermediate": 1 << 18}

#: role -> field name in a transformers (Llama, Qwen2, MiniMind2) config.json.
TRANSFORMERS_FIELDS = {"hidden": "hidden_size", "layers": "num_hidden_layers",
                       "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
                       "vocab": "vocab_size", "positions": "max_position_embeddings",
                       "intermediate": "intermediate_size"}


def check_shape(config: dict, fields: dict[str, str] = TRANSFORMERS_FIELDS,
                source: str = "config.json") -> None:
    """Raise :class:`ConversionError` naming ``source`` and the field when a shape field of
    ``config`` (``fields``: role -> its name in this format) is not an integer from
    1 to its :data:`SHAPE_LIMITS`, when the attention heads do not divide the width, the
    key/value heads do not divide the heads, or a head's width is odd (RoPE rotates pairs, so
    the q/k rows of a head must split in two). Absent fields are left to the defaults; a
    missing key/value head count means one per head. Nothing is allocated before this."""
    values = {}
    for role, field in fields.items():
        value = config.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConversionError(f"{source}: {field} is {value!r} ({type(value).__name__}); "
                                  f"it must be a whole number")
        if not 1 <= value <= SHAPE_LIMITS[role]:
            raise ConversionError(f"{source}: {field} is {value}; it must be from 1 to "
                                  f"{SHAPE_LIMITS[role]}")
        values[role] = value
    for name in ("norm_eps", "rms_norm_eps", "rope_theta"):
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < float("inf")):
            raise ConversionError(f"{source}: {name} is {value!r}; it must be a positive number")
    hidden, heads = values.get("hidden"), values.get("heads")
    kv = values.get("kv_heads", heads)
    if hidden and heads:
        if hidden % heads:
            raise ConversionError(f"{source}: {fields['hidden']} {hidden} is not divisible by "
                                  f"{fields['heads']} {heads}")
        if (hidden // heads) % 2:
            raise ConversionError(
                f"{source}: a head is {hidden} / {heads} = {hidden // heads} wide, an odd "
                f"number; RoPE rotates pairs of dimensions, so {fields['hidden']} must be "
                f"divisible by 2 × {fields['heads']}")
    if heads and kv and heads % kv:
        raise ConversionError(f"{source}: {fields['heads']} {heads} is not divisible by "
                              f"{fields['kv_heads']} {kv} (each key/value head serves a whole "
                              f"group of query heads)")
