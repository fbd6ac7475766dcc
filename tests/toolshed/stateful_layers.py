"""Small stateful layers shared by the toolshed wrapper tests."""

from typing import Any

from pz_flax import pz


@pz.pytree_dataclass
class CountCalls(pz.nn.Layer):
    """Identity layer that counts its calls in a state variable."""

    calls: pz.StateVariable[int]

    def __call__(self, value: Any, **_unused_side_inputs: Any) -> Any:
        self.calls.value = self.calls.value + 1
        return value
