"""An op's static options: a NamedTuple of plain values (a spec), which a torch.library custom op
carries as one string (its schema has no NamedTuple type)."""

import ast
import functools


def encode(spec) -> str:
    """The spec as one string (a spec class's ``encode`` method)."""
    return "|".join(map(repr, spec))


def decoder(spec_type):
    """The inverse of ``encode`` for ``spec_type``, cached: a call decodes each distinct spec once."""
    @functools.lru_cache(maxsize=None)
    def decode(text: str):
        return spec_type(*map(ast.literal_eval, text.split("|")))
    return decode
