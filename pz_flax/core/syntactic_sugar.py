"""Small conveniences for writing index expressions.

Python only builds ``slice`` objects inside square brackets, so writing a slice as a *value*
(for instance as the value of a dictionary used to index named axes) needs the verbose
``slice(1, 3, None)``. ``pz.slice[1:3]`` gets the bracket syntax back.
"""

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class SliceLike:
    """An object whose subscript is the index expression itself.

    ``SliceLike()[1:3]`` is ``slice(1, 3, None)``, ``SliceLike()[::2, 0]`` is
    ``(slice(None, None, 2), 0)``, and so on: indexing does no work and returns exactly what
    Python built from the brackets. A single instance is exported as ``pz.slice`` so that
    named-axis indexing reads naturally, e.g. ``array[{"seq": pz.slice[1:3]}]``.
    """

    def __getitem__(self, indexer: Any) -> Any:
        """Returns the index expression written between the brackets, unchanged.

        Args:
            indexer: Whatever Python passed for the subscript: a ``slice``, an integer, a tuple
                of those, ``Ellipsis``, ``None``, ...

        Returns:
            ``indexer`` itself.
        """
        return indexer


# Shadows the builtin on purpose: the public name mirrors penzai's ``pz.slice``.
slice = SliceLike()
