"""The JSON conversion of state values: `_native.encode_json`, `_native.decode_json` and
`register_serializer`.

What is stored must read back with `json.loads` (Flujo's own backend reads these files), and
everything Flujo's `json.dumps` ever stored must read back with `decode_json`.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import functools
import json
import math
import sys
import types
import typing
import uuid

import flujo_sqlite
import pydantic
import pytest
from flujo_sqlite import _native
from flujo_sqlite.errors import InvalidStateError, SerializationError
from hypothesis import given, settings
from hypothesis import strategies as st

encode_json = _native.encode_json
decode_json = _native.decode_json


def stored(value: object) -> object:
    """What Flujo's json.loads reads back from what we store."""
    return json.loads(encode_json(value))


def qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def nested_lists(levels: int) -> list:
    root: list = []
    inner = root
    for _ in range(levels - 1):
        child: list = []
        inner.append(child)
        inner = child
    return root


# --- types used by the tests (module level, so their names in messages are predictable) ---


class Color(enum.Enum):
    RED = "red"
    PAIR = (1, 2)
    WHEN = datetime.date(2024, 5, 6)


class Number(enum.IntEnum):
    ONE = 1
    BIG = 2**70


class Word(enum.StrEnum):
    HELLO = "hello"


class Plain:
    pass


class Model(pydantic.BaseModel):
    name: str
    when: datetime.datetime
    tags: list[str] = []
    color: Color = Color.RED


class Outer(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
    inner: Model
    extra: typing.Any = None


class BrokenModel(pydantic.BaseModel):
    def model_dump(self, **kwargs: object) -> dict:
        raise RuntimeError("model_dump exploded")


@dataclasses.dataclass
class Point:
    x: int
    y: float
    label: str = "p"
    unit: typing.ClassVar[str] = "m"


@dataclasses.dataclass
class Node:
    name: str
    children: list[Node] = dataclasses.field(default_factory=list)
    parent: Node | None = None


@dataclasses.dataclass
class BrokenField:
    value: int = 0

    def __getattribute__(self, name: str) -> object:
        if name == "value":
            raise KeyError("no value today")
        return object.__getattribute__(self, name)


class BadIsoDate(datetime.date):
    def isoformat(self) -> str:  # type: ignore[override]
        raise ValueError("isoformat exploded")


class Point3(typing.NamedTuple):
    x: int
    y: int
    z: int


class Money:
    def __init__(self, amount: int, currency: str) -> None:
        self.amount = amount
        self.currency = currency


class Euro(Money):
    pass


class Unhashable:
    def __hash__(self) -> int:
        raise TypeError("unhashable on purpose")


class SpecialDate(datetime.date):
    pass


class TaggedDict(dict):
    pass


class SelfReturning:
    pass


class NotCallableTarget:
    pass


flujo_sqlite.register_serializer(Money, lambda m: {"amount": m.amount, "currency": m.currency})
flujo_sqlite.register_serializer(Unhashable, lambda u: hash(u))
flujo_sqlite.register_serializer(
    SpecialDate, lambda d: {"special": d.year, "at": datetime.time(1, 2)}
)
flujo_sqlite.register_serializer(TaggedDict, lambda d: {"tagged": dict(d)})
flujo_sqlite.register_serializer(SelfReturning, lambda s: [s])


# --- plain JSON values ---


def test_compact_output_matches_json_dumps_for_plain_values() -> None:
    value = {"a": [1, -2, None, True, False, "x"], "b": {"c": {}}, "d": [], "é": "ü ✓ 😀"}
    assert encode_json(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_keys_keep_insertion_order() -> None:
    value = {"z": 1, "a": 2, "m": 3}
    assert list(stored(value)) == ["z", "a", "m"]
    assert list(decode_json(encode_json(value))) == ["z", "a", "m"]


def test_reused_keys_never_mix_up_many_distinct_keys() -> None:
    # Short object keys are reused across documents from a fixed-size cache; far more distinct
    # keys than its slots, colliding, escaped, long and non-ASCII ones, must all decode exactly.
    keys = [f"k{i}" for i in range(5000)] + ["caf\u00e9", 'a"b', "tab\there", "x" * 200, ""]
    for ensure_ascii in (True, False, True):
        document = {key: index for index, key in enumerate(keys)}
        decoded = decode_json(json.dumps(document, ensure_ascii=ensure_ascii))
        assert decoded == document
        assert list(decoded) == keys
    assert decode_json(json.dumps([{"k1": 1}, {"k1": 2}])) == [{"k1": 1}, {"k1": 2}]
    # A raw control character is refused in a key as in any string, cached or not.
    for text in ('{"k\x01": 1}', '{"k1": 1, "k\x01": 2}'):
        with pytest.raises(InvalidStateError, match="invalid control character"):
            decode_json(text)


def test_bool_is_not_an_int() -> None:
    assert encode_json([True, False, 1, 0]) == "[true,false,1,0]"


@pytest.mark.parametrize(
    "number",
    [0, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**200, -(2**200), 10**50 + 7],
)
def test_ints_of_any_size_are_exact(number: int) -> None:
    assert encode_json(number) == str(number)
    assert decode_json(encode_json(number)) == number
    assert type(decode_json(encode_json(number))) is int


def test_ints_beyond_python_str_digit_limit() -> None:
    huge = 7 * 10**5000 + 123456789
    text = encode_json(-huge)
    assert text.startswith("-7000") and text.endswith("123456789") and len(text) == 5002
    assert decode_json(text) == -huge
    assert decode_json(text.lstrip("-")) == huge


def test_int_subclasses_are_ints() -> None:
    assert encode_json([Number.ONE, Number.BIG]) == f"[1,{2**70}]"


@pytest.mark.parametrize(
    "number",
    [
        0.1,
        1.5,
        2.0,
        -0.0,
        1e-7,
        1e16,
        1e308,
        5e-324,
        1.7976931348623157e308,
        123456789012345678.0,
        2.2250738585072014e-308,
        1 / 3,
        -1e-300,
        9007199254740993.0,
    ],
)
def test_floats_round_trip_exactly(number: float) -> None:
    text = encode_json(number)
    assert json.loads(text) == number
    assert type(json.loads(text)) is float
    assert math.copysign(1.0, json.loads(text)) == math.copysign(1.0, number)
    back = decode_json(text)
    assert type(back) is float and back == number
    assert math.copysign(1.0, back) == math.copysign(1.0, number)


def test_integral_floats_stay_floats() -> None:
    assert encode_json(2.0) == "2.0"
    assert encode_json([1e16, -0.0]) == "[1e16,-0.0]"


def test_non_finite_floats_follow_flujos_convention() -> None:
    assert stored([math.nan, math.inf, -math.inf]) == ["nan", "inf", "-inf"]


def test_none() -> None:
    assert encode_json(None) == "null"


# --- strings ---


def test_string_escapes_match_json_dumps() -> None:
    every_control = "".join(chr(code) for code in range(0x20))
    text = f'quote " backslash \\ slash / del \x7f {every_control}'
    assert encode_json(text) == json.dumps(text, ensure_ascii=False)
    assert json.loads(encode_json(text)) == text


def test_non_ascii_is_stored_as_raw_utf8() -> None:
    assert encode_json("é😀") == '"é😀"'


def test_nul_round_trips() -> None:
    assert encode_json("a\x00b") == '"a\\u0000b"'
    assert decode_json(encode_json({"k\x00": "a\x00b"})) == {"k\x00": "a\x00b"}


def test_lone_surrogate_is_refused_with_its_path() -> None:
    with pytest.raises(SerializationError) as caught:
        encode_json({"log": ["ok", "bad \udc80"]}, "pipeline_context")
    message = str(caught.value)
    assert "pipeline_context['log'][1]" in message
    assert "lone surrogate" in message and "not storable" in message


def test_str_subclass_is_a_str() -> None:
    assert encode_json([Word.HELLO]) == '["hello"]'


# --- dict keys ---


def test_non_str_keys_are_stored_as_flujo_stores_them() -> None:
    """Both Flujo releases store ``str()`` of the key as they would store it as a value, so
    ``None`` is "None" (``json.dumps`` would write "null") and NaN is "nan"."""
    moment = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    key = uuid.UUID("12345678-1234-5678-1234-567812345678")
    value = {
        True: 1,
        False: 2,
        None: 3,
        7: 4,
        -(2**80): 5,
        1.5: 6,
        1e16: 7,
        1e-5: 8,
        math.nan: 9,
        math.inf: 10,
        -math.inf: 11,
        moment: 12,
        moment.date(): 13,
        moment.time(): 14,
        key: 15,
        decimal.Decimal("2.50"): 16,
    }
    assert json.loads(encode_json(value)) == {
        "True": 1,
        "False": 2,
        "None": 3,
        "7": 4,
        str(-(2**80)): 5,
        "1.5": 6,
        "1e+16": 7,
        "1e-05": 8,
        "nan": 9,
        "inf": 10,
        "-inf": 11,
        "2024-01-02T03:04:05+00:00": 12,
        "2024-01-02": 13,
        "03:04:05": 14,
        "12345678-1234-5678-1234-567812345678": 15,
        "2.50": 16,
    }


@pytest.mark.parametrize(
    "colliding",
    [{None: 1, "None": 2}, {"1": "a", 1: "b"}, {True: 1, "True": 2}, {"red": 1, Color.RED: 2}],
)
def test_keys_stored_as_the_same_text_are_refused(colliding: dict[object, object]) -> None:
    """Both would be stored under one JSON key; Flujo keeps one value and drops the other,
    and SQLite's JSON functions would see the first where Python sees the last."""
    with pytest.raises(SerializationError, match="another key of the same dict is also stored"):
        encode_json({"outer": colliding}, "ctx")


def test_enum_keys_use_their_value() -> None:
    assert stored({Color.RED: 1, Number.ONE: 2, Word.HELLO: 3}) == {"red": 1, "1": 2, "hello": 3}


def test_other_keys_are_refused_with_their_path() -> None:
    with pytest.raises(SerializationError) as caught:
        encode_json({"outer": {(1, 2): "x"}}, "pipeline_context")
    message = str(caught.value)
    assert "pipeline_context['outer'][(1, 2)]" in message
    assert "tuple" in message


def test_enum_key_with_unsupported_value_is_refused() -> None:
    with pytest.raises(SerializationError, match=r"state\[<Color.PAIR: \(1, 2\)>\]"):
        encode_json({Color.PAIR: 1}, "state")


# --- richer Python types ---


def test_datetimes_use_isoformat() -> None:
    aware = datetime.datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.UTC)
    naive = datetime.datetime(2024, 1, 2, 3, 4, 5)
    assert stored([aware, naive, datetime.date(2024, 1, 2), datetime.time(3, 4, 5, 6)]) == [
        "2024-01-02T03:04:05.678901+00:00",
        "2024-01-02T03:04:05",
        "2024-01-02",
        "03:04:05.000006",
    ]


def test_enums_store_their_value_recursively() -> None:
    assert stored([Color.RED, Color.PAIR, Color.WHEN]) == ["red", [1, 2], "2024-05-06"]


def test_uuid_and_decimal_are_strings() -> None:
    identifier = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert stored([identifier, decimal.Decimal("1.10")]) == [str(identifier), "1.10"]


def test_bytes_like_values_are_base64() -> None:
    raw = b"\x00\xffabc"
    assert stored([raw, bytearray(raw), memoryview(raw)]) == ["AP9hYmM="] * 3
    assert stored(b"") == ""


def test_sets_are_sorted_arrays() -> None:
    assert stored({3, 1, 2}) == [1, 2, 3]
    assert stored(frozenset({"b", "a", "c"})) == ["a", "b", "c"]
    words = [f"w{number:03d}" for number in range(200)]
    assert stored(set(words)) == words
    # Mixed items are ordered by their JSON text: '"a"' < '1' < 'null'.
    assert stored({1, "a", None}) == ["a", 1, None]


def test_tuples_and_namedtuples_are_arrays() -> None:
    assert stored({"t": (1, (2, 3)), "p": Point3(1, 2, 3)}) == {"t": [1, [2, 3]], "p": [1, 2, 3]}


def test_dict_subclasses_are_objects() -> None:
    ordered = collections.OrderedDict([("b", 1), ("a", 2)])
    counts = collections.defaultdict(int, {"x": 3})
    assert encode_json([ordered, counts]) == '[{"b":1,"a":2},{"x":3}]'


def test_complex() -> None:
    assert stored(complex(1.5, -2)) == {"real": 1.5, "imag": -2.0}


def test_pydantic_models_use_model_dump() -> None:
    when = datetime.datetime(2024, 1, 2, 3, 4, 5)
    outer = Outer(inner=Model(name="m", when=when, tags=["a"]), extra={"k": Color.PAIR})
    assert stored({"model": outer}) == {
        "model": {
            "inner": {"name": "m", "when": "2024-01-02T03:04:05", "tags": ["a"], "color": "red"},
            "extra": {"k": [1, 2]},
        }
    }


def test_dataclasses_become_dicts_of_their_fields() -> None:
    assert stored(Point(1, 2.5)) == {"x": 1, "y": 2.5, "label": "p"}
    tree = Node("root", [Node("leaf")])
    assert stored(tree) == {
        "name": "root",
        "children": [{"name": "leaf", "children": [], "parent": None}],
        "parent": None,
    }


def test_dataclass_fields_are_read_without_copying() -> None:
    # asdict() would deep-copy the field and fail on the module object before we see it.
    @dataclasses.dataclass
    class Holder:
        payload: object

    with pytest.raises(SerializationError, match=r"state\['payload'\] \(a module\)"):
        encode_json(Holder(sys), "state")


# --- registered serializers ---


def test_registered_serializer_exact_type() -> None:
    assert stored({"price": Money(3, "EUR")}) == {"price": {"amount": 3, "currency": "EUR"}}


def test_registered_serializer_applies_to_subclasses() -> None:
    assert stored(Euro(5, "EUR")) == {"amount": 5, "currency": "EUR"}


def test_registered_serializer_result_is_encoded_again() -> None:
    assert stored(SpecialDate(2024, 1, 2)) == {"special": 2024, "at": "01:02:00"}


def test_registered_serializer_takes_precedence_over_built_in_rules() -> None:
    assert stored(TaggedDict(a=1)) == {"tagged": {"a": 1}}
    # ...but exact dicts keep the fast built-in rule.
    assert stored({"a": 1}) == {"a": 1}


def test_registering_again_replaces_the_function() -> None:
    class Temperature:
        pass

    flujo_sqlite.register_serializer(Temperature, lambda t: "first")
    assert stored(Temperature()) == "first"
    flujo_sqlite.register_serializer(Temperature, lambda t: "second")
    assert stored(Temperature()) == "second"


def test_registered_subclass_serializer_wins_by_exact_type() -> None:
    class Base:
        pass

    class Child(Base):
        pass

    flujo_sqlite.register_serializer(Base, lambda b: "base")
    flujo_sqlite.register_serializer(Child, lambda c: "child")
    assert stored([Base(), Child()]) == ["base", "child"]


def test_isinstance_lookup_follows_registration_order() -> None:
    class Left:
        pass

    class Right:
        pass

    class Both(Left, Right):
        pass

    flujo_sqlite.register_serializer(Right, lambda r: "right")
    flujo_sqlite.register_serializer(Left, lambda r: "left")
    assert stored(Both()) == "right"


def test_a_serializer_returning_its_own_type_is_named() -> None:
    class Wrapped:
        pass

    flujo_sqlite.register_serializer(Wrapped, lambda w: Wrapped())
    with pytest.raises(
        SerializationError,
        match=r"ctx\['w'\]: the serializer registered for .*Wrapped returned another",
    ):
        encode_json({"w": Wrapped()}, "ctx")


def test_register_serializer_needs_a_class() -> None:
    with pytest.raises(TypeError, match=r"first argument must be a class.* got a str \('Path'\)"):
        flujo_sqlite.register_serializer("Path", str)  # type: ignore[arg-type]


@pytest.mark.parametrize("native", [str, int, float, bool, dict, list, type(None)])
def test_register_serializer_refuses_what_json_stores_as_it_is(native: type) -> None:
    """It used to accept them and never call the function for their own instances."""
    with pytest.raises(TypeError, match="stored as JSON as it is"):
        flujo_sqlite.register_serializer(native, repr)


def test_register_serializer_needs_a_callable() -> None:
    with pytest.raises(TypeError, match="must be callable"):
        flujo_sqlite.register_serializer(NotCallableTarget, 42)
    with pytest.raises(SerializationError):
        encode_json(NotCallableTarget())


def test_serializer_returning_its_input_is_a_cycle() -> None:
    with pytest.raises(SerializationError, match=r"state contains a reference cycle at state\[0\]"):
        encode_json(SelfReturning(), "state")


# --- refusals: the message names the path and the type ---


def test_unsupported_object_message() -> None:
    with pytest.raises(SerializationError) as caught:
        encode_json({"model": Plain()}, "pipeline_context")
    name = qualified(Plain)
    assert str(caught.value) == (
        f"cannot store pipeline_context['model'] (a {name}): register a serializer with "
        f"flujo_sqlite.register_serializer({name}, fn) or convert it to "
        "dict/list/str/int/float/bool/None"
    )
    assert isinstance(caught.value, TypeError)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (sys, "module"),
        (object(), "object"),
        (Ellipsis, "ellipsis"),
        (iter([]), "list_iterator"),
    ],
)
def test_unsupported_values_are_refused(value: object, type_name: str) -> None:
    with pytest.raises(
        SerializationError, match=rf"^cannot store state\['a'\]\[2\] \(a {type_name}\)"
    ):
        encode_json({"a": [1, 2, value]}, "state")


class CallableObject:
    def __call__(self) -> None:
        pass


def test_callables_are_stored_by_name_as_flujo_stores_them() -> None:
    """Flujo's runner saves a step's output whatever it is; Flujo's backend stores a callable
    as its name, and refusing one crashed the run (Flujo 0.4.35) or lost its step record."""
    values = [
        len,
        str.upper,
        lambda: 0,
        Plain,
        Model,
        Point,
        functools.partial(len),
        CallableObject(),
    ]
    assert json.loads(encode_json(values)) == [
        "len",
        "upper",
        "<lambda>",
        "Plain",
        "Model",
        "Point",
        repr(values[6]),
        repr(values[7]),
    ]


def test_sequences_are_stored_as_lists() -> None:
    assert json.loads(encode_json({"d": collections.deque([1, 2]), "r": range(3)})) == {
        "d": [1, 2],
        "r": [0, 1, 2],
    }
    looped: collections.deque[object] = collections.deque([1])
    looped.append(looped)
    with pytest.raises(SerializationError, match="reference cycle"):
        encode_json(looped)


def test_serializers_registered_with_flujo_apply() -> None:
    serialization = pytest.importorskip("flujo.utils.serialization")

    class Money:
        def __init__(self, cents: int) -> None:
            self.cents = cents

    serialization.register_custom_serializer(Money, lambda m: {"cents": m.cents, "cur": "USD"})
    try:
        assert json.loads(encode_json({"price": Money(999)})) == {
            "price": {"cents": 999, "cur": "USD"}
        }
        # Ours win where both have one.
        flujo_sqlite.register_serializer(Money, lambda m: m.cents)
        assert json.loads(encode_json([Money(5)])) == [5]

        # As in Flujo, one that raises or hands the value back leaves it to the usual rules.
        @dataclasses.dataclass(slots=True)
        class Point:
            x: int
            y: int

        def aware_only(moment: datetime.datetime) -> str:
            if moment.tzinfo is None:
                raise ValueError("naive datetime")
            return "aware"

        serialization.register_custom_serializer(Point, lambda p: p)
        serialization.register_custom_serializer(datetime.datetime, aware_only)
        naive = datetime.datetime(2024, 1, 2, 3, 4)
        assert json.loads(encode_json({"p": Point(1, 2), "seen": naive})) == {
            "p": {"x": 1, "y": 2},
            "seen": "2024-01-02T03:04:00",
        }

        # A key of a registered type is the text of what its serializer makes of it.
        class Tag(str):
            pass

        serialization.register_custom_serializer(Money, lambda m: f"money-{m.cents}")
        serialization.register_custom_serializer(Tag, lambda t: f"tag:{t}")
        assert json.loads(encode_json({Tag("red"): 1, 7: 2})) == {"tag:red": 1, "7": 2}
        stored = json.loads(encode_json({"k": {Money(3): "x"}}))
        assert stored == {"k": {"money-3": "x"}}
        with pytest.raises(SerializationError, match='also stored as "tag:red"'):
            encode_json({"tag:red": 1, Tag("red"): 2})
    finally:
        serialization.reset_custom_serializer_registry()


def test_other_mappings_are_stored_as_dicts_and_user_strings_as_text() -> None:
    stored = {
        "u": collections.UserDict({"a": 1}),
        "m": types.MappingProxyType({"b": [2]}),
        "s": collections.UserString("text"),
    }
    assert json.loads(encode_json(stored)) == {"u": {"a": 1}, "m": {"b": [2]}, "s": "text"}


def test_open_file_is_refused() -> None:
    with open(__file__) as handle, pytest.raises(SerializationError, match="TextIOWrapper"):
        encode_json([handle])


def test_default_path_name_is_value() -> None:
    with pytest.raises(SerializationError, match=r"cannot store value\[0\]"):
        encode_json([Plain()])


def test_path_through_models_and_dataclasses() -> None:
    outer = Outer(inner=Model(name="m", when=datetime.datetime(2024, 1, 1)), extra=[Plain()])
    with pytest.raises(SerializationError, match=r"cannot store ctx\['o'\]\['extra'\]\[0\] "):
        encode_json({"o": outer}, "ctx")
    with pytest.raises(
        SerializationError, match=r"cannot store ctx\[0\]\['children'\]\[0\]\['parent'\] "
    ):
        encode_json([Node("a", [Node("b", parent=Plain())])], "ctx")  # type: ignore[arg-type]


def test_exceptions_from_user_code_are_wrapped_with_cause() -> None:
    cases = [
        (BrokenModel(), "model_dump exploded", RuntimeError, r"ctx\['k'\]"),
        (BadIsoDate(2024, 1, 1), "isoformat exploded", ValueError, r"ctx\['k'\]"),
        (Unhashable(), "unhashable on purpose", TypeError, r"ctx\['k'\]"),
        (BrokenField(), "no value today", KeyError, r"ctx\['k'\]"),
    ]
    for value, text, cause_type, path in cases:
        with pytest.raises(SerializationError, match=rf"cannot store {path} .*{text}") as caught:
            encode_json({"k": value}, "ctx")
        assert isinstance(caught.value.__cause__, cause_type)


def test_failing_serializer_is_wrapped_with_cause() -> None:
    class Fragile:
        pass

    def explode(_: object) -> object:
        raise ZeroDivisionError("serializer exploded")

    flujo_sqlite.register_serializer(Fragile, explode)
    with pytest.raises(SerializationError, match=r"ctx\[1\] .*serializer exploded") as caught:
        encode_json([0, Fragile()], "ctx")
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_inside_a_serializer_or_model_dump_goes_through_unchanged(
    interrupt: type[BaseException],
) -> None:
    class Interrupted:
        pass

    class InterruptedModel(pydantic.BaseModel):
        def model_dump(self, *args: object, **kwargs: object) -> dict[str, object]:
            raise interrupt()

    def serializer(_: object) -> object:
        raise interrupt()

    flujo_sqlite.register_serializer(Interrupted, serializer)
    for value in (Interrupted(), InterruptedModel()):
        with pytest.raises(interrupt) as caught:
            encode_json({"k": value}, "ctx")
        assert type(caught.value) is interrupt  # not wrapped in a SerializationError


@pytest.mark.parametrize("change", ["add", "remove", "swap", "swap_and_resize", "in_del"])
def test_a_serializer_that_changes_the_dict_being_stored_is_refused(change: str) -> None:
    # Iterating a dict that changes panics inside pyo3, and a PanicException is a BaseException
    # that would get past the caller's `except Exception`. A swap keeps the size; with more
    # keys, adding one makes the dict compact itself, and a naive walk then skips an untouched
    # key without noticing. A change made by `__del__`, when the walk lets go of a value the
    # serializer replaced, happens after the serializer has returned.
    class Meddler:
        def __del__(self) -> None:
            if change == "in_del":
                context["added"] = 3

    context: dict[str, object] = {"a": 1, "meddler": Meddler(), "z": 2}
    if change == "swap_and_resize":
        context = {"a": 1, "meddler": Meddler(), "k2": 2, "k3": 3, "k4": 4}

    def meddle(_: object) -> object:
        if change in ("remove", "swap_and_resize"):
            del context["a"]
        if change in ("add", "swap", "swap_and_resize"):
            context["added"] = 3
        if change == "swap":
            del context["a"]
        if change == "in_del":
            context["meddler"] = "replaced"
        return "replacement"

    flujo_sqlite.register_serializer(Meddler, meddle)
    with pytest.raises(
        SerializationError, match=r"^cannot store ctx: the dict changed while it was being stored"
    ):
        encode_json(context, "ctx")


def test_a_serializer_may_change_other_dicts() -> None:
    class Counter:
        pass

    calls: dict[str, int] = {}

    def count(_: object) -> object:
        calls["n"] = calls.get("n", 0) + 1
        return calls["n"]

    flujo_sqlite.register_serializer(Counter, count)
    assert stored({"first": Counter(), "second": Counter()}) == {"first": 1, "second": 2}


# --- cycles and depth ---


def test_list_cycle() -> None:
    items: list = [1]
    items.append({"back": items})
    with pytest.raises(
        SerializationError, match=r"^state contains a reference cycle at state\[1\]\['back'\]$"
    ):
        encode_json(items, "state")


def test_dict_cycle() -> None:
    state: dict = {}
    state["self"] = state
    with pytest.raises(SerializationError, match=r"reference cycle at state\['self'\]"):
        encode_json(state, "state")


def test_dataclass_cycle() -> None:
    root = Node("root")
    root.children.append(Node("child", parent=root))
    with pytest.raises(SerializationError, match=r"cycle at s\['children'\]\[0\]\['parent'\]$"):
        encode_json(root, "s")


def test_shared_references_are_not_cycles() -> None:
    shared = [1, 2]
    assert stored({"a": shared, "b": shared, "c": [shared, shared]}) == {
        "a": [1, 2],
        "b": [1, 2],
        "c": [[1, 2], [1, 2]],
    }


def test_nesting_limit_is_1000_levels() -> None:
    assert encode_json(nested_lists(1000)) == "[" * 1000 + "]" * 1000
    with pytest.raises(SerializationError, match="nested more than 1000 levels deep"):
        encode_json(nested_lists(1001))


def test_very_deep_nesting_is_refused_cleanly() -> None:
    deep: dict = {}
    inner = deep
    for _ in range(100_000):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(SerializationError, match="nested more than 1000 levels deep"):
        encode_json(deep)
    with pytest.raises(SerializationError, match="nested more than 1000 levels deep"):
        encode_json(nested_lists(100_000))


# --- decoding ---


def test_decode_builds_plain_python_values() -> None:
    value = decode_json('{"a": [1, 2.5, "s", true, false, null], "b": {}}')
    assert value == {"a": [1, 2.5, "s", True, False, None], "b": {}}
    assert type(value["a"][0]) is int and type(value["a"][1]) is float
    assert value["a"][3] is True and value["a"][5] is None


@pytest.mark.parametrize(
    "dump",
    [
        lambda v: json.dumps(v),
        lambda v: json.dumps(v, ensure_ascii=False),
        lambda v: json.dumps(v, indent=2),
        lambda v: json.dumps(v, separators=(",", ":")),
        lambda v: json.dumps(v, indent="\t", sort_keys=True),
        lambda v: "\r\n " + json.dumps(v, indent=1) + " \n",
    ],
)
def test_decode_reads_everything_json_dumps_writes(dump: typing.Callable[[object], str]) -> None:
    value = {
        "text": 'é 😀 \x00 \x1f " \\ / \u2028 \ufeff',
        "ints": [0, -1, 2**200, -(2**200), 2**63],
        "floats": [0.1, -0.0, 1e308, 5e-324, 1e16, 2.0],
        "nested": [[], {}, [{"a": None}], {"": [True, False]}],
    }
    assert decode_json(dump(value)) == value


def test_decode_ensure_ascii_surrogate_pairs_from_old_flujo() -> None:
    assert decode_json('"\\ud83d\\ude00"') == "😀"
    assert decode_json('{"\\u00e9\\ud83d\\ude00": "\\u2603"}') == {"é😀": "☃"}


@pytest.mark.parametrize(
    "text",
    [
        '"\\udc80"',
        '"\\ud83d"',
        '"a\\ud83db"',
        '"\\ud83d\\u0041"',
        '"\\ude00\\ud83d"',
        '"\\ud800\\ud800\\udc00"',
    ],
)
def test_decode_lone_surrogates_like_json_loads(text: str) -> None:
    assert decode_json(text) == json.loads(text)


def test_decode_non_finite_tokens() -> None:
    value = decode_json(json.dumps([math.nan, math.inf, -math.inf]))
    assert math.isnan(value[0]) and value[1] == math.inf and value[2] == -math.inf


@pytest.mark.parametrize(
    "text",
    [
        "1e400",
        "-1e400",
        "1e-400",
        "-0",
        "-0.0",
        "0e0",
        "1E+2",
        "1.5e-3",
        "123.456e7",
        "0.30000000000000004",
        "9007199254740993",
        "-9223372036854775809",
        "2.2250738585072011e-308",
        "4.9406564584124654e-324",
    ],
)
def test_decode_numbers_like_json_loads(text: str) -> None:
    expected = json.loads(text)
    value = decode_json(text)
    assert type(value) is type(expected) and value == expected
    assert math.copysign(1, value) == math.copysign(1, expected)


def test_decode_duplicate_keys_keep_the_last() -> None:
    assert decode_json('{"a": 1, "b": 2, "a": 3}') == json.loads('{"a": 1, "b": 2, "a": 3}')


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("", "line 1 column 1 (char 0)"),
        ("   ", "line 1 column 4 (char 3)"),
        ("[1,]", "line 1 column 4 (char 3)"),
        ('{"a" 1}', "line 1 column 6 (char 5)"),
        ("{'a': 1}", "line 1 column 2 (char 1)"),
        ('{"a": 1,}', "line 1 column 9 (char 8)"),
        ("[1 2]", "line 1 column 4 (char 3)"),
        ("01", "line 1 column 2 (char 1)"),
        ("1.", "line 1 column 3 (char 2)"),
        (".5", "line 1 column 1 (char 0)"),
        ("+1", "line 1 column 1 (char 0)"),
        ("1e", "line 1 column 3 (char 2)"),
        ("-", "line 1 column 2 (char 1)"),
        ("tru", "line 1 column 1 (char 0)"),
        ("nul", "line 1 column 1 (char 0)"),
        ("-Inf", "line 1 column 2 (char 1)"),
        ('"abc', "line 1 column 5 (char 4)"),
        ('"a\\x"', "line 1 column 4 (char 3)"),
        ('"\\u12G4"', "line 1 column 4 (char 3)"),
        ('"\\u12"', "line 1 column 4 (char 3)"),
        ('"a\nb"', "line 1 column 3 (char 2)"),
        ('"a\x00b"', "line 1 column 3 (char 2)"),
        ('["é",\n  x]', "line 2 column 3 (char 8)"),
        ("{} {}", "line 1 column 4 (char 3)"),
        ("[", "line 1 column 2 (char 1)"),
        ('{"a": 1', "line 1 column 8 (char 7)"),
    ],
)
def test_decode_rejects_malformed_json_with_position(text: str, where: str) -> None:
    with pytest.raises(InvalidStateError, match="^invalid JSON: ") as caught:
        decode_json(text)
    assert str(caught.value).endswith(where)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ValueError):
        json.loads(text)


def test_decode_nesting_limit_is_1000_levels() -> None:
    # Compared as text: == on 1000-level lists would hit Python's own recursion limit.
    assert encode_json(decode_json("[" * 1000 + "]" * 1000)) == "[" * 1000 + "]" * 1000
    with pytest.raises(InvalidStateError, match="nested more than 1000 levels deep"):
        decode_json("[" * 1001 + "]" * 1001)


def test_decode_very_deep_nesting_is_refused_cleanly() -> None:
    with pytest.raises(InvalidStateError, match="nested more than 1000 levels deep"):
        decode_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InvalidStateError, match="nested more than 1000 levels deep"):
        decode_json('{"a":' * 100_000 + "1" + "}" * 100_000)


# --- properties ---

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_property_encode_reads_back_with_json_loads(value: object) -> None:
    assert json.loads(encode_json(value)) == value


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans(), st.sampled_from([None, 2]))
def test_property_decode_reads_json_dumps(
    value: object, ensure_ascii: bool, indent: int | None
) -> None:
    assert decode_json(json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)) == value


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_property_round_trip_through_our_codec(value: object) -> None:
    text = encode_json(value)
    assert decode_json(text) == value
    assert encode_json(decode_json(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text() | st.integers(0xD800, 0xDFFF).map(chr)).map("".join))
def test_property_decode_strings_with_surrogates_like_json_loads(text: str) -> None:
    # A surrogate pair written as two escapes reads back as one character, so compare with
    # json.loads rather than with `text`.
    dumped = json.dumps(text)
    assert decode_json(dumped) == json.loads(dumped)


def test_a_lone_surrogate_is_named_with_its_place() -> None:
    with pytest.raises(SerializationError, match=r"lone surrogate \('\\ud800' at index 1\)"):
        encode_json({"k": "a\ud800b"}, "ctx")
