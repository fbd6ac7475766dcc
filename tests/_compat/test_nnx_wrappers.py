"""Canaries for what pz_flax assumes about NNX graph definitions when describing wrappers.

``pz_flax._compat.nnx.graphdef_module_type`` reads the root module's class from the first
entry of ``GraphDef.nodes``. These tests fail, naming that assumption, when a flax release
lays graph definitions out differently, and check that the public-route fallback gives the
same answer.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from pz_flax._compat import nnx as compat_nnx
from pz_flax._compat import nnx_modules

ASSUMPTION = (
    "pz_flax._compat.nnx.graphdef_module_type assumes GraphDef.nodes[0].type is the class of"
    " the graph definition's root module"
)


class _Block(nnx.Module):
    def __init__(self):
        self.linear = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        self.scale = nnx.Param(jnp.ones(3))


def test_first_node_of_a_graph_definition_names_the_root_class():
    for module in (_Block(), nnx.BatchNorm(3, rngs=nnx.Rngs(0)), nnx.Sequential()):
        graphdef = nnx.graphdef(module)
        nodes = getattr(graphdef, "nodes", None)
        assert nodes, f"{ASSUMPTION}: this GraphDef has no nodes sequence."
        assert getattr(nodes[0], "type", None) is type(module), (
            f"{ASSUMPTION}: for a {type(module).__name__} it is"
            f" {getattr(nodes[0], 'type', None)!r}."
        )


def test_graphdef_module_type_agrees_with_the_public_route():
    graphdef = nnx.graphdef(_Block())
    assert compat_nnx.graphdef_module_type(graphdef) is _Block
    assert type(nnx_modules.module_of_graphdef(graphdef)) is _Block


def test_graphdef_module_type_falls_back_to_merging_when_the_layout_is_unknown(monkeypatch):
    real = nnx.graphdef(_Block())
    without_nodes = object()
    merged = []
    public_route = nnx_modules.module_of_graphdef

    def module_of_graphdef(graphdef):
        merged.append(graphdef)
        return public_route(real)

    monkeypatch.setattr(nnx_modules, "module_of_graphdef", module_of_graphdef)
    assert compat_nnx.graphdef_module_type(without_nodes) is _Block
    assert merged == [without_nodes]
