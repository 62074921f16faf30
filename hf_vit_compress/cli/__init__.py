"""The command line (`hf-vit-compress`, `python -m hf_vit_compress`): `commands` (argument parsing and the
sub-commands), `recipes` (YAML recipes and dotted overrides), `recipe_help`, `runner` (a recipe run end to end) and
`demo` (the offline end-to-end demo)."""

from .commands import main

__all__ = ["main"]
