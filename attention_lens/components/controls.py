"""A page's controls: each parameter knows its name, default, bounds, label and widget.

A control parses its value from the URL or the widget (a bad value becomes the default or
the nearest bound, with a message saying what was wrong) and renders its labelled widget.
Bounds may depend on the model (``hi=lambda cfg: cfg.n_layers - 1``): the widget then
offers only the model's range and a value beyond it is clamped with a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import dash_bootstrap_components as dbc
from dash import Input, State, dcc, html

Bound = Union[int, None, Callable[[Any], Optional[int]]]


def control_id(page: str, name: str) -> str:
    """Id of a page's control ``name``."""
    return f"{page}-{name}"


def _bound(bound: Bound, cfg: Any) -> Optional[int]:
    if callable(bound):
        return bound(cfg) if cfg is not None else None
    return bound


#: Largest magnitude a whole number without bounds of its own may have: a page's position
#: or index beyond it is no position at all, and a number box (a float in the browser) and
#: the layout's JSON hold it exactly.
MAX_WHOLE = 2**31 - 1
#: Most numbers read from a list parameter.
MAX_LIST = 1024
#: Most digits read as a whole number (longer ones are beyond every bound anyway).
_MAX_DIGITS = 40
_HUGE = 10**_MAX_DIGITS


def _whole(raw: Any) -> Optional[int]:
    """``raw`` (URL text or a widget's value) as a whole number, or None if it is not one.

    A number of more than ``_MAX_DIGITS`` digits comes back as ``±_HUGE`` (beyond every
    bound, its sign kept) without converting thousands of digits.
    """
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float):
        return int(raw) if raw.is_integer() else None
    text = str(raw).strip()
    digits = text[1:] if text[:1] in "+-" else text
    if not (digits.isascii() and digits.isdigit()):
        return None
    if len(digits) > _MAX_DIGITS:
        return -_HUGE if text.startswith("-") else _HUGE
    return int(text, 10)


def _shown(value: Any) -> str:
    """A value as a message shows it: text quoted and cut, long numbers shortened."""
    if not isinstance(value, int):
        return repr(str(value)[:40])
    if abs(value) >= _HUGE:
        return f"{'-' if value < 0 else ''}(a number of more than {_MAX_DIGITS} digits)"
    text = str(value)
    if len(text) > 24:
        return f"{text[:10]}… ({len(text.lstrip('-'))} digits)"
    return text


def _group(label: str, widget: Any) -> dbc.InputGroup:
    return dbc.InputGroup([dbc.InputGroupText(label), widget], size="sm",
                          className="al-control")


@dataclass(frozen=True)
class Int:
    """A whole number (a number box), with a default and optional bounds."""

    name: str
    default: Optional[int]
    lo: Bound = None
    hi: Bound = None
    label: str = ""
    placeholder: str = ""
    step: int = 1

    def parse(self, raw: Any, cfg: Any = None) -> tuple[Optional[int], Optional[str]]:
        """The value of ``raw`` (URL text or widget value) and a problem, or None."""
        if raw is None or raw == "":
            return self.default, None
        value = _whole(raw)
        if value is None:
            return self.default, f"{self.name} must be a whole number, got {_shown(raw)}"
        lo, hi = _bound(self.lo, cfg), _bound(self.hi, cfg)
        if lo is not None and value < lo:
            return lo, f"{self.name} {_shown(value)} is below the smallest allowed value {lo}"
        if hi is not None and value > hi:
            return hi, f"{self.name} {_shown(value)} is above the largest allowed value {hi}"
        if abs(value) > MAX_WHOLE:  # no bound of its own: a number no page can use
            return self.default, (f"{self.name} {_shown(value)} is out of range (at most "
                                  f"{MAX_WHOLE:,} either way); the default is used")
        return value, None

    def widget(self, page: str, value: Any, cfg: Any = None) -> dbc.InputGroup:
        """A labelled number box (updates when the user leaves it or presses Enter)."""
        return _group(self.label or self.name, dbc.Input(
            id=control_id(page, self.name), type="number", value=value,
            min=_bound(self.lo, cfg), max=_bound(self.hi, cfg), step=self.step, debounce=True,
            placeholder=self.placeholder, inputmode="numeric"))


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of strings (a drop-down); ``labels`` name the options."""

    name: str
    default: str
    choices: tuple[str, ...]
    label: str = ""
    labels: Optional[dict[str, str]] = None

    def parse(self, raw: Any, cfg: Any = None) -> tuple[str, Optional[str]]:
        """``raw`` if it is one of the choices, else the default and a problem."""
        if raw is None or raw == "":
            return self.default, None
        if str(raw) in self.choices:
            return str(raw), None
        return self.default, (f"{self.name} must be one of {', '.join(self.choices)}, "
                              f"got {str(raw)[:40]!r}")

    def widget(self, page: str, value: Any, cfg: Any = None) -> dbc.InputGroup:
        """A labelled drop-down."""
        names = self.labels or {}
        return _group(self.label or self.name, dbc.Select(
            id=control_id(page, self.name), value=value,
            options=[{"label": names.get(c, c), "value": c} for c in self.choices]))


@dataclass(frozen=True)
class Text:
    """Free text (a target token, a search word), cut to ``max_len`` characters."""

    name: str
    default: str = ""
    max_len: int = 200
    label: str = ""
    placeholder: str = ""

    def parse(self, raw: Any, cfg: Any = None) -> tuple[str, Optional[str]]:
        """``raw`` as text, cut to ``max_len`` characters."""
        if raw is None:
            return self.default, None
        text = str(raw)
        if len(text) > self.max_len:
            return text[: self.max_len], f"{self.name} was cut to {self.max_len} characters"
        return text, None

    def widget(self, page: str, value: Any, cfg: Any = None) -> dbc.InputGroup:
        """A labelled text box (updates when the user leaves it or presses Enter)."""
        return _group(self.label or self.name, dbc.Input(
            id=control_id(page, self.name), type="text", value=value, debounce=True,
            placeholder=self.placeholder))


@dataclass(frozen=True)
class IntList:
    """A set of whole numbers (a multi-select; ``"0,2"`` in the URL); empty means all.

    ``count(cfg)`` gives how many options the widget offers (``prefix`` + index).
    """

    name: str
    count: Callable[[Any], int]
    label: str = ""
    prefix: str = ""

    @property
    def default(self) -> list[int]:
        """Nothing chosen: all."""
        return []

    def parse(self, raw: Any, cfg: Any = None) -> tuple[list[int], Optional[str]]:
        """The sorted distinct whole numbers in ``raw`` (a list or comma-separated text)."""
        if raw is None or raw == "" or raw == []:
            return [], None
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        out: list[int] = []
        if len(items) > MAX_LIST:
            return [], f"{self.name} lists {len(items):,} numbers; at most {MAX_LIST} are read"
        for item in items:
            value = _whole(item)
            if value is None:
                return [], (f"{self.name} must be whole numbers separated by commas, "
                            f"got {_shown(raw)}")
            out.append(value)
        n = self.count(cfg) if cfg is not None else None
        bad = [x for x in out if x < 0 or (n is not None and x >= n)]
        if bad:
            return [x for x in sorted(set(out)) if x not in bad], (
                f"{self.name}: {_shown(bad[0])} does not exist"
                + (f" (0-{n - 1})" if n else ""))
        return sorted(set(out)), None

    def widget(self, page: str, value: Any, cfg: Any = None) -> dbc.InputGroup:
        """A labelled multi-select (empty: all)."""
        n = self.count(cfg) if cfg is not None else 1
        return _group(self.label or self.name, html.Div(
            dcc.Dropdown(id=control_id(page, self.name), multi=True, value=value,
                         options=[{"label": f"{self.prefix}{i}", "value": i}
                                  for i in range(n)],
                         placeholder="all", className="al-dropdown"),
            style={"minWidth": "12rem", "flex": "1 1 auto"}))


Control = Union[Int, Choice, Text, IntList]


def control_of(param: Any) -> Control:
    """The page control of a declared analysis parameter (:mod:`..analysis.declare`): same
    URL name, default, bounds and label."""
    from ..analysis import declare as D

    name = param.url_name
    if isinstance(param, D.Int):
        return Int(name, param.default, param.lo, param.hi, label=param.label,
                   placeholder=param.placeholder)
    if isinstance(param, D.Position):
        return Int(name, None if param.auto else param.default, label=param.label,
                   placeholder=param.placeholder)
    if isinstance(param, D.Choice):
        return Choice(name, param.default, tuple(param.choices), label=param.label,
                      labels=param.labels)
    if isinstance(param, D.Token):
        return Text(name, "", label=param.label, placeholder=param.placeholder)
    raise TypeError(f"a {type(param).__name__} parameter has no page control; declare it "
                    "with page=False")


def controls_of(analysis: Any) -> list[Control]:
    """The page controls of a declared analysis's parameters shown on pages."""
    return [control_of(p) for p in analysis.params if p.page]


def control_input(page: str, control: Any) -> Input:
    """The callback input of a control (a control may name its own, e.g. pattern-matched)."""
    own = getattr(control, "input", None)
    return own(page) if callable(own) else Input(control_id(page, control.name), "value")


def control_state(page: str, control: Any) -> State:
    """The same dependency as a callback state."""
    dep = control_input(page, control)
    return State(dep.component_id, dep.component_property)


def parse_all(controls: Sequence[Control], raw: dict[str, Any], cfg: Any = None
              ) -> tuple[dict[str, Any], list[str]]:
    """Every control's value from ``raw``, and what was wrong with the input."""
    values, problems = {}, []
    for c in controls:
        value, problem = c.parse(raw.get(c.name), cfg)
        values[c.name] = value
        if problem:
            problems.append(problem)
    return values, problems


def names(controls: Iterable[Control]) -> list[str]:
    """The controls' names, in order."""
    return [c.name for c in controls]
