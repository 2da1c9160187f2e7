"""Typed hyper-parameters: a method declares each of its knobs once, as a `Knob` (name, default, type, allowed
values, help). The flag, its check (the same for the command line, a YAML preset and a saved args.yaml), the
model's keyword argument and the value a run label reads all come from that one declaration.

    KNOBS = (
        Knob("w_min", 10.0, "weight of the CLUB min-MI loss", interval="[0, inf)"),
        Knob("club_level", "patch", "where CLUB pairs inputs with latents", choices=("patch", "mask")),
    )
"""
import argparse
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.nn as nn

from util.config import bool_flag

_INTERVAL = re.compile(r"^\s*([\[(])\s*(-?inf|[-+0-9.e]+)\s*,\s*(-?inf|[-+0-9.e]+)\s*([\])])\s*$")


@dataclass(frozen=True)
class Interval:
    """A real interval such as [0, inf) or (0, 1]; `contains` and the text of the declaration."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> "Interval":
        match = _INTERVAL.match(text)
        if match is None:
            raise ValueError(f"interval {text!r}: write it as [a, b], (a, b], [a, inf) ...")
        low, high = float(match.group(2)), float(match.group(3))
        return cls(low, high, match.group(1) == "[", match.group(4) == "]", text.strip())

    def contains(self, value: float) -> bool:
        if math.isnan(value):
            return False
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below


@dataclass(frozen=True)
class Knob:
    """One hyper-parameter of a method.

    type: the value's type, by default the default's (bool, int, float or str); a callable from text for
        anything else (it may normalise, e.g. an official spelling to ours, and raises ArgumentTypeError).
    choices / interval: the allowed values; interval as "[0, inf)", "(0, 1]" ...
    aliases: further flag spellings (an official script's); model_arg: False for a knob the data pipeline
        reads rather than the model's constructor; bare: the flag alone (no value) means True.
    """

    name: str
    default: Any
    help: str
    type: Optional[Callable[[str], Any]] = None
    choices: tuple = ()
    interval: str = ""
    aliases: tuple[str, ...] = ()
    model_arg: bool = True
    bare: bool = False
    _interval: Optional[Interval] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.interval:
            object.__setattr__(self, "_interval", Interval.parse(self.interval))
        if self.type is None:
            if self.default is None:
                raise ValueError(f"knob {self.name}: a default of None needs an explicit type")
            object.__setattr__(self, "type", type(self.default))
        if self.default is not None:
            self.check(self.default)  # a declaration that violates itself is a bug, found at import

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self._interval is not None:
            return f"a {self.type.__name__} in {self._interval.text}"
        return f"a {getattr(self.type, '__name__', 'value')}"

    def convert(self, value: Any) -> Any:
        """A value from text (command line, YAML string) or from YAML's own types -> the knob's type, checked.
        Raises argparse.ArgumentTypeError saying the value and what is allowed."""
        try:
            if self.type is bool:
                converted = value if isinstance(value, bool) else bool_flag(str(value))
            elif self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                converted = int(value) if not isinstance(value, str) else int(value.strip())
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError
                converted = float(value)
            elif self.type is str:
                if not isinstance(value, str):
                    raise ValueError
                converted = value
            else:
                converted = self.type(value if isinstance(value, str) else str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            detail = f" ({err})" if str(err) else ""
            raise argparse.ArgumentTypeError(f"expected {self.allowed()}, got {value!r}{detail}") from None
        return self.check(converted, shown=value)

    def check(self, value: Any, shown: Any = None) -> Any:
        """`value` if allowed; else ArgumentTypeError quoting `shown` (the value as given) or `value`."""
        allowed = not self.choices or value in self.choices
        allowed = allowed and (self._interval is None or self._interval.contains(float(value)))
        if not allowed:
            raise argparse.ArgumentTypeError(f"expected {self.allowed()}, got {value if shown is None else shown!r}")
        return value

    def add_to(self, group: argparse._ArgumentGroup) -> None:
        # choices are checked by `convert`, so argparse's own `choices` only documents them in --help
        extra = {"nargs": "?", "const": True} if self.bare else {}
        convert = _named(self.convert, self.type)
        group.add_argument(self.flag, *(f"--{alias}" for alias in self.aliases), dest=self.name, default=self.default,
                           type=convert, metavar=_metavar(self),
                           help=self.help + (f"; in {self.interval}" if self.interval else ""), **extra)


def _named(function: Callable, kind: Any) -> Callable:
    """argparse names the type in its messages; keep the knob's type name there."""
    def convert(value):
        return function(value)
    convert.__name__ = getattr(kind, "__name__", "value")
    convert.knob_convert = function  # util.config checks YAML values through it, with YAML's own types
    return convert


def _metavar(knob: Knob) -> str:
    if knob.choices:
        return "{" + ",".join(str(c) for c in knob.choices) + "}"
    return knob.name.upper()


def add_knobs(group: argparse._ArgumentGroup, knobs: tuple[Knob, ...]) -> None:
    for knob in knobs:
        knob.add_to(group)


def knob_values(knobs: tuple[Knob, ...], source: dict) -> dict:
    """Each knob's value in `source` (parsed args or a saved args dict), its default where absent."""
    return {knob.name: source.get(knob.name, knob.default) for knob in knobs}


def model_kwargs(knobs: tuple[Knob, ...], args: argparse.Namespace) -> dict:
    """The model-constructor arguments among the knobs, from parsed args."""
    return {knob.name: getattr(args, knob.name) for knob in knobs if knob.model_arg}


def check_values(knobs: tuple[Knob, ...], values: dict, source: str = "argument") -> dict:
    """Convert and check each given value (e.g. a model's keyword arguments); ValueError names the flag."""
    by_name = {knob.name: knob for knob in knobs}
    checked = dict(values)
    for name, value in values.items():
        if name in by_name:
            try:
                checked[name] = by_name[name].convert(value)
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"{source} --{name}: {err}") from None
    return checked


def with_defaults(knobs: tuple[Knob, ...], kwargs: dict, source: str = "argument") -> dict:
    """A model constructor's keyword arguments: each knob's default, then `kwargs` checked over them. A knob
    given or declared as None is left out: None means the model's own default (CMAE's reduced decoder)."""
    defaults = {knob.name: knob.default for knob in knobs if knob.model_arg and knob.default is not None}
    given = {name: value for name, value in kwargs.items() if value is not None}
    return {**defaults, **check_values(knobs, given, source)}


def model_factory(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: mark `factory` as a model that `--model <its name>` builds (util/registry.py collects it)."""
    factory.is_model_factory = True
    return factory


@dataclass(frozen=True)
class Method:
    """A pre-training method: models named `<prefix>...` and its hyper-parameters, each declared once as a
    `util.spec.Knob`; its flags, their checks, the model's keyword arguments and the run label come from them."""

    name: str
    prefix: str
    # The factory arguments every method takes from the common flags (MAE's input size, mask ratio, target).
    common_kwargs: Callable[[argparse.Namespace], dict]
    knobs: tuple[Knob, ...] = ()
    # Checks that involve several flags or the model (a single value's type and range are its knob's); raises
    # ValueError naming the flags.
    validate: Optional[Callable[[argparse.Namespace], None]] = None
    # The name a run's results go under (tools/make_tables.py), from its saved args with every knob's value
    # (its default where the args predate it); e.g. MI-MAE with its MI losses off is the "MAE x 4" control.
    run_label: Optional[Callable[[dict], str]] = None
    # The method's training samples and between-epoch work, a util.datasets.TrainData subclass built from the
    # args (CMAE: two ContrastiveCrop views). Default: TrainData itself, MAE's one augmented view.
    train_data: Optional[Callable[[argparse.Namespace], object]] = None
    # Why one optimizer step must be one forward over the whole gathered batch, or None where it need not: a loss
    # that reads the batch as one sample (U-MAE's and M-MAE's regulariser, whose m is the micro-batch). With
    # --effective_batch, accum_iter then stays 1 and the per-process batch follows the world size (util.batch).
    whole_batch: Optional[Callable[[argparse.Namespace], Optional[str]]] = None

    def model_kwargs(self, args: argparse.Namespace) -> dict:
        """The factory's keyword arguments from parsed flags; a knob left at None means the model's own default
        (e.g. CMAE's reduced decoder)."""
        own = {knob.name: getattr(args, knob.name) for knob in self.knobs if knob.model_arg}
        return {**self.common_kwargs(args), **{name: value for name, value in own.items() if value is not None}}

    def label(self, args: dict) -> str:
        return self.run_label({**args, **knob_values(self.knobs, args)}) if self.run_label is not None else self.name
