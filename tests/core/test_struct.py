"""Tests for pz_flax.core.struct."""

import dataclasses
import inspect
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import penzai.core.struct as pz_struct_oracle
import pytest
from flax import nnx

from pz_flax.core import struct


@struct.pytree_dataclass
class Pair(struct.Struct):
    left: jax.Array
    right: jax.Array
    tag: str = dataclasses.field(default="pair", metadata={"pytree_node": False})


@struct.pytree_dataclass
class Doubling(struct.Struct):
    stored: int

    def __init__(self, value):
        self.stored = value * 2


def test_is_frozen_dataclass_and_pytree_with_keys():
    pair = Pair(jnp.ones(2), jnp.zeros(3))
    assert dataclasses.is_dataclass(pair)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pair.left = 1
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(pair)[0]]
    assert paths == [".left", ".right"]
    assert jax.tree_util.tree_structure(pair).num_leaves == 2


def test_static_fields_are_aux_data_not_leaves():
    pair = Pair(1, 2, tag="hello")
    children, aux = pair.tree_flatten()
    assert children == [1, 2]
    assert aux == struct.StructStaticMetadata(("left", "right"), {"tag": "hello"})
    keyed, keyed_aux = pair.tree_flatten_with_keys()
    assert [k for k, _ in keyed] == [
        jax.tree_util.GetAttrKey("left"),
        jax.tree_util.GetAttrKey("right"),
    ]
    assert keyed_aux == aux
    rebuilt = Pair.tree_unflatten(aux, [3, 4])
    assert (rebuilt.left, rebuilt.right, rebuilt.tag) == (3, 4, "hello")


def test_jit_roundtrip_keeps_static_fields():
    pair = Pair(jnp.arange(3.0), jnp.ones(3), tag="t")
    out = jax.jit(lambda p: dataclasses.replace(p, left=p.left + p.right))(pair)
    np.testing.assert_array_equal(out.left, np.arange(3.0) + 1)
    assert out.tag == "t"


def test_static_metadata_with_unhashable_values_is_hashable_and_comparable():
    a = struct.StructStaticMetadata(("x",), {"cfg": {"a": [1]}})
    b = struct.StructStaticMetadata(["x"], {"cfg": {"a": [1]}})
    assert a == b and hash(a) == hash(b)
    assert a != struct.StructStaticMetadata(("x",), {"cfg": {"a": [2]}})


def test_attributes_dict_and_from_attributes_roundtrip():
    made = Doubling(3)
    assert made.stored == 6
    attributes = made.attributes_dict()
    assert attributes == {"stored": 6}
    again = Doubling.from_attributes(**attributes)
    assert again == made and again.stored == 6


def test_from_attributes_names_missing_and_unexpected_fields():
    with pytest.raises(ValueError, match=r"missing \['right'\], unexpected \['bogus'\]"):
        Pair.from_attributes(left=1, tag="x", bogus=2)


def test_custom_init_can_assign_fields_and_must_set_all():
    @struct.pytree_dataclass
    class Forgetful(struct.Struct):
        a: int
        b: int

        def __init__(self):
            self.a = 1

    with pytest.raises(AttributeError, match="did not set the field 'b'"):
        Forgetful()


def test_custom_init_without_proxy_cannot_assign():
    @struct.pytree_dataclass(use_mutable_proxy_in_init=False)
    class Plain(struct.Struct):
        a: int

        def __init__(self, a):
            self.a = a

    with pytest.raises(dataclasses.FrozenInstanceError):
        Plain(1)


def test_unregistered_subclass_is_abstract():
    class NotDecorated(Pair):
        pass

    with pytest.raises(TypeError, match="not decorated with @pytree_dataclass"):
        NotDecorated(1, 2)
    assert not struct.is_pytree_dataclass_type(NotDecorated)
    assert struct.is_pytree_dataclass_type(Pair)
    assert not struct.is_pytree_dataclass_type(Pair(1, 2))


def test_double_decoration_is_refused():
    with pytest.raises(ValueError, match="applied twice"):
        struct.pytree_dataclass(Pair)


def test_overwriting_custom_parent_init_requires_opt_in():
    with pytest.raises(struct.PyTreeDataclassSafetyError, match="overwrite_parent_init=True"):

        @struct.pytree_dataclass
        class Child(Doubling):
            stored: int

    @struct.pytree_dataclass(overwrite_parent_init=True)
    class Child2(Doubling):
        stored: int

    assert Child2(5).stored == 5

    @struct.pytree_dataclass(init=False)
    class Child3(Doubling):
        stored: int

    assert Child3(5).stored == 10


def test_implicitly_inherited_fields_are_refused_unless_declared():
    with pytest.raises(
        struct.PyTreeDataclassSafetyError, match=r"fields \['left', 'right', 'tag', 'extra'\]"
    ):

        @struct.pytree_dataclass
        class Extended(Pair):
            extra: int = 0

    @struct.pytree_dataclass(has_implicitly_inherited_fields=True)
    class Extended2(Pair):
        extra: int = 0

    assert Extended2(1, 2).extra == 0

    with pytest.raises(struct.PyTreeDataclassSafetyError, match="inherits no fields"):

        @struct.pytree_dataclass(has_implicitly_inherited_fields=True)
        class Nothing(struct.Struct):
            a: int


def test_missing_flatten_methods_without_struct():
    with pytest.raises(AttributeError, match=r"subclass pz_flax\.Struct"):

        @struct.pytree_dataclass
        class NotAStruct:
            a: int


def test_pytree_node_field_predicate():
    fields = {f.name: f for f in dataclasses.fields(Pair)}
    assert struct.is_pytree_node_field(fields["left"])
    assert not struct.is_pytree_node_field(fields["tag"])


def test_custom_key_for_field_is_used_in_paths():
    @struct.pytree_dataclass
    class Keyed(struct.Struct):
        a: int

        def key_for_field(self, field_name):
            return jax.tree_util.DictKey(field_name.upper())

    ((path, _),), _ = jax.tree_util.tree_flatten_with_path(Keyed(1))
    assert path == (jax.tree_util.DictKey("A"),)


def test_treescope_color_is_per_callable_type():
    @struct.pytree_dataclass
    class Callable(struct.Struct):
        def __call__(self, x):
            return x

    assert Pair(1, 2).treescope_color() == "transparent"
    color = Callable().treescope_color()
    assert isinstance(color, str) and color != "transparent"


def test_struct_is_nnx_data_so_modules_see_its_params():
    @struct.pytree_dataclass
    class Holder(struct.Struct):
        weight: nnx.Param

    class Outer(nnx.Module):
        def __init__(self):
            self.inner = Holder(nnx.Param(jnp.ones(2)))

    state = nnx.state(Outer(), nnx.Param)
    assert [path for path, _ in state.flat_state()] == [("inner", "weight")]
    assert nnx.is_data(Outer().inner)


def test_pickle_roundtrip():
    pair = Pair(np.ones(2), np.zeros(2), tag="p")
    again = pickle.loads(pickle.dumps(pair))
    np.testing.assert_array_equal(again.left, pair.left)
    assert again.tag == "p"


def test_matches_penzai_flattening():
    @pz_struct_oracle.pytree_dataclass
    class OraclePair(pz_struct_oracle.Struct):
        left: jax.Array
        right: jax.Array
        tag: str = dataclasses.field(default="pair", metadata={"pytree_node": False})

    ours = jax.tree_util.tree_flatten_with_path(Pair(1, 2, "z"))[0]
    theirs = jax.tree_util.tree_flatten_with_path(OraclePair(1, 2, "z"))[0]
    assert ours == theirs


@struct.pytree_dataclass
class CheckedPair(struct.Struct):
    """A struct whose ``__post_init__`` rejects placeholders: it must keep Python unflatten."""

    left: jax.Array
    right: jax.Array
    tag: str = dataclasses.field(default="pair", metadata={"pytree_node": False})

    def __post_init__(self):
        if not hasattr(self.left, "shape"):
            raise TypeError("left must be an array")


def test_flatten_metadata_is_kept_so_rebuilt_structs_match_their_treedef_by_identity():
    pair = CheckedPair(jnp.ones(2), jnp.zeros(2), tag="t")
    _, first = pair.tree_flatten()
    _, again = pair.tree_flatten_with_keys()
    assert first is again
    rebuilt = jax.tree_util.tree_map(lambda leaf: leaf + 1, pair)
    assert rebuilt.tree_flatten()[1] is first
    assert jax.tree_util.tree_structure(rebuilt) == jax.tree_util.tree_structure(pair)
    # The kept metadata is bookkeeping, not a field: it never shows up as one.
    assert rebuilt.attributes_dict().keys() == {"left", "right", "tag"}
    assert CheckedPair.from_attributes(**rebuilt.attributes_dict()) == rebuilt
    assert dataclasses.replace(rebuilt, tag="u").tree_flatten()[1].static_fields == {"tag": "u"}


def test_plain_structs_flatten_without_calling_python(monkeypatch):
    # JAX's C++ dataclass nodes read the fields themselves: the Python protocol methods are
    # never called, which is what keeps jax.jit dispatch of a model cheap.
    assert struct.uses_native_flattening(Pair)

    def refuse(*args, **kwargs):
        raise AssertionError("Python flatten protocol called")

    for name in ("tree_flatten", "tree_flatten_with_keys", "tree_unflatten"):
        monkeypatch.setattr(Pair, name, refuse)
    pair = Pair(jnp.ones(2), jnp.zeros(2), tag="t")
    leaves, treedef = jax.tree_util.tree_flatten(pair)
    rebuilt = treedef.unflatten([leaf + 1 for leaf in leaves])
    assert type(rebuilt) is Pair and rebuilt.tag == "t"
    np.testing.assert_array_equal(rebuilt.left, [2.0, 2.0])
    assert [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(pair)] == [
        ".left",
        ".right",
    ]
    doubled = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: 2 * x, p))(pair)
    assert type(doubled) is Pair and doubled.tag == "t"


@struct.pytree_dataclass
class KeyedPair(struct.Struct):
    left: jax.Array
    right: jax.Array
    tag: str = dataclasses.field(default="pair", metadata={"pytree_node": False})

    def key_for_field(self, field_name):
        return jax.tree_util.DictKey(field_name)


@struct.pytree_dataclass
class PairWithDerivedField(struct.Struct):
    left: jax.Array
    right: jax.Array
    tag: str = dataclasses.field(default="pair", metadata={"pytree_node": False})
    derived: int = dataclasses.field(default=0, init=False, metadata={"pytree_node": False})


@pytest.mark.parametrize(
    "cls, native",
    [
        (Pair, True),
        (CheckedPair, False),
        (KeyedPair, False),
        (PairWithDerivedField, False),
    ],
)
def test_both_registrations_rebuild_without_init_semantics(cls, native):
    """Native where calling the class is plain field assignment; Python elsewhere, same result."""
    assert struct.uses_native_flattening(cls) is native
    instance = cls(jnp.ones(2), jnp.zeros(2), tag="t")
    leaves, treedef = jax.tree_util.tree_flatten(instance)
    assert len(leaves) == 2
    # Placeholders in place of arrays (what tree_map to shapes or selections produces): never
    # validated by __post_init__, never run through a custom __init__.
    placeholders = treedef.unflatten([object(), object()])
    assert type(placeholders) is cls and placeholders.tag == "t"
    assert jax.tree_util.tree_structure(placeholders) == treedef
    rebuilt = jax.jit(lambda x: x)(instance)
    assert type(rebuilt) is cls and rebuilt.tag == "t"
    np.testing.assert_array_equal(rebuilt.left, instance.left)


def test_custom_init_struct_keeps_python_unflatten():
    assert not struct.uses_native_flattening(Doubling)
    rebuilt = jax.tree_util.tree_map(lambda leaf: leaf, Doubling(3))
    assert rebuilt.stored == 6  # not doubled again: __init__ did not run


def test_uses_native_flattening_needs_a_decorated_class():
    with pytest.raises(TypeError, match="not a class decorated with @pytree_dataclass"):
        struct.uses_native_flattening(struct.Struct)


def test_struct_itself_and_undecorated_subclasses_with_their_own_init_are_abstract():
    with pytest.raises(TypeError, match="not decorated with @pytree_dataclass"):
        struct.Struct()

    class OwnInit(struct.Struct):
        def __init__(self, value):
            self.value = value

    with pytest.raises(TypeError, match="OwnInit: it subclasses Struct but is not decorated"):
        OwnInit(1)


def test_hand_written_init_of_an_undecorated_base_is_inherited_and_guarded():
    class Base(struct.Struct):
        def __init__(self, value):
            # Inherited by a frozen class, outside the mutable init proxy of its own class.
            object.__setattr__(self, "stored", value + 1)

    @struct.pytree_dataclass(init=False)
    class Inheriting(Base):
        stored: int

    assert Inheriting(1).stored == 2
    assert not struct.uses_native_flattening(Inheriting)
    with pytest.raises(struct.PyTreeDataclassSafetyError, match="hand-written __init__"):

        @struct.pytree_dataclass
        class Replacing(Base):
            stored: int


def test_init_false_struct_without_any_init_behaves_like_a_dataclass():
    @struct.pytree_dataclass(init=False)
    class NoInit(struct.Struct):
        a: int = 0

    assert NoInit().a == 0


# The same field layouts, once as plain frozen dataclasses and once as natively flattened
# structs (whose __init__ pz_flax writes itself): each pair must accept and refuse the same calls.
def _every_kind_of_field(base: type, decorate):
    @decorate
    class EveryKind(base):
        plain: int
        defaulted: str = dataclasses.field(default="d", metadata={"pytree_node": False})
        made: list = dataclasses.field(default_factory=list)
        _: dataclasses.KW_ONLY
        keyword: float = 1.5
        keyword_required: int = dataclasses.field(default=7)

    return EveryKind


DataclassEveryKind = _every_kind_of_field(object, dataclasses.dataclass(frozen=True))
StructEveryKind = _every_kind_of_field(struct.Struct, struct.pytree_dataclass)


def _fields_of(instance) -> dict:
    return {field.name: getattr(instance, field.name) for field in dataclasses.fields(instance)}


def test_native_struct_init_has_the_dataclass_signature():
    assert struct.uses_native_flattening(StructEveryKind)
    expected = inspect.signature(DataclassEveryKind.__init__).parameters
    actual = inspect.signature(StructEveryKind.__init__).parameters
    assert [(p.name, p.kind) for p in actual.values()] == [
        (p.name, p.kind) for p in expected.values()
    ]
    for name in ("defaulted", "keyword", "keyword_required"):
        assert actual[name].default is expected[name].default
    # A default_factory field shows dataclasses' own placeholder default.
    assert repr(actual["made"].default) == repr(expected["made"].default)
    assert StructEveryKind.__init__.__qualname__.endswith("EveryKind.__init__")


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((1,), {}),
        ((1, "x", [3]), {"keyword": 2.0, "keyword_required": 9}),
        ((), {"plain": 1, "made": [4], "keyword_required": 0}),
    ],
)
def test_native_struct_init_stores_what_the_dataclass_init_stores(args, kwargs):
    expected = DataclassEveryKind(*args, **kwargs)
    built = StructEveryKind(*args, **kwargs)
    assert _fields_of(built) == _fields_of(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.plain = 2


def test_native_struct_init_calls_default_factories_once_per_instance():
    first, second = StructEveryKind(1), StructEveryKind(1)
    assert first.made == [] and first.made is not second.made
    given = [1]
    assert StructEveryKind(1, made=given).made is given


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((), {}),  # a required field missing
        ((1, "x", [], 2.0), {}),  # a keyword-only field given positionally
        ((1,), {"unknown": 0}),
        ((1,), {"plain": 2}),  # given twice
    ],
)
def test_native_struct_init_refuses_what_the_dataclass_init_refuses(args, kwargs):
    with pytest.raises(TypeError):
        DataclassEveryKind(*args, **kwargs)
    with pytest.raises(TypeError):
        StructEveryKind(*args, **kwargs)


def test_a_field_named_like_the_init_helpers_keeps_the_dataclass_init():
    @struct.pytree_dataclass
    class Shadowing(struct.Struct):
        _instance_dict: int
        _defaults: int = 0

    assert struct.uses_native_flattening(Shadowing)
    built = Shadowing(1, 2)
    assert (built._instance_dict, built._defaults) == (1, 2)
    rebuilt = jax.tree_util.tree_map(lambda leaf: leaf + 1, built)
    assert (rebuilt._instance_dict, rebuilt._defaults) == (2, 3)


def test_subclass_of_a_native_struct_may_regenerate_its_init():
    @struct.pytree_dataclass
    class Extended(Pair):
        left: jax.Array
        right: jax.Array
        tag: str = dataclasses.field(default="pair", metadata={"pytree_node": False})
        extra: int = 0

    built = Extended(1, 2, extra=3)
    assert (built.left, built.right, built.tag, built.extra) == (1, 2, "pair", 3)
    assert struct.uses_native_flattening(Extended)


def test_post_init_validation_still_runs_on_construction():
    with pytest.raises(TypeError, match="left must be an array"):
        CheckedPair(object(), jnp.zeros(2))
