"""The names of a cache's columns beside its one column per hook: the bottom floor, shared by every stage.

A hook's activations go in a column named exactly the hook name; these names are reserved for the rest.
"""

TOKEN_IDS = "token_ids"
"""The token id of every stored position, aligned position for position with the activations."""

POSITIONS = "positions"
"""Targeted caches: the token positions of the prompt that were cached (-1 marks padding)."""

SOURCE_INDEX = "source_index"
"""Targeted caches: the index of the input row a cache row came from."""

RESERVED = (TOKEN_IDS, POSITIONS, SOURCE_INDEX)
