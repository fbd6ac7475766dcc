"""A reproducible source of fresh PRNG keys that lives inside a model.

Layers such as dropout need a new random key on every call. Threading keys through every
call signature is tedious, so a ``RandomStream`` carries a fixed base key plus a counter kept in
a ``StateVariable``: each ``next_key()`` folds the counter into the base key and increments the
counter. Because the counter is a variable, the usual variable machinery (``variable_jit``,
``unbind_state_vars``, NNX's ``nnx.state``) carries its progress across transformations.
"""

from __future__ import annotations

import jax

from pz_flax.core import struct
from pz_flax.core import variables


@struct.pytree_dataclass
class RandomStream(struct.Struct):
    """A stream of PRNG keys derived from a base key and a stateful counter.

    Attributes:
        base_key: The key every generated key derives from; fixed for the stream's lifetime, it
            determines the whole sequence.
        offset: A state variable counting the keys handed out so far.
    """

    base_key: jax.Array
    offset: variables.StateVariable[int | jax.Array]

    @classmethod
    def from_base_key(
        cls,
        base_key: jax.Array,
        offset_label: variables.VariableLabel = "random_stream_offset",
    ) -> RandomStream:
        """Starts a stream at offset 0.

        Args:
            base_key: The base PRNG key.
            offset_label: Label of the offset state variable; must be unique within the model
                (give distinct labels to several streams in one model).

        Returns:
            The new stream.
        """
        return cls(base_key=base_key, offset=variables.StateVariable(0, label=offset_label))

    def next_key(self) -> jax.Array:
        """Returns the key for the current offset and advances the offset by one.

        Returns:
            ``jax.random.fold_in(base_key, offset)`` for the offset before the call.
        """
        current = self.offset.value
        self.offset.value = current + 1
        return jax.random.fold_in(self.base_key, current)
