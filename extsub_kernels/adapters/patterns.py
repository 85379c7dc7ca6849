"""Which modules an adapter config's patterns select, by PEFT's rules, in bounded time: PEFT's `re` can take
exponential time (`([a-z_.0-9]+)+!`), so they are matched with `regex` (same syntax, a timeout) within a budget per
config, past which the config is refused."""

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import regex

from extsub_kernels.errors import AdapterError

# Seconds all pattern matching of one adapter config may take. A real config needs microseconds per module.
PATTERN_BUDGET_S = 2.0


@dataclass
class PatternMatcher:
    """Regular expressions of one adapter config (`where`), compiled once, matched within `budget_s` seconds in all
    (None: `PATTERN_BUDGET_S`)."""

    where: str
    budget_s: float | None = None
    _compiled: dict = field(default_factory=dict, repr=False)
    _deadline: float | None = field(default=None, repr=False)

    def compile(self, pattern: str, what: str) -> "regex.Pattern":
        """`pattern` compiled; an AdapterError naming `what` (the config field) when it is not a regular expression."""
        compiled = self._compiled.get(pattern)
        if compiled is None:
            try:
                compiled = self._compiled[pattern] = regex.compile(pattern, regex.VERSION0)
            except (regex.error, TypeError, ValueError, OverflowError, RecursionError) as e:
                raise AdapterError(
                    f"{self.where}: {what} {pattern!r} is not a valid regular expression ({e})"
                ) from None
        return compiled

    def matches(self, pattern: str, text: str, what: str, *, full: bool = False, shown: str | None = None) -> bool:
        """Whether `pattern` matches at the start of `text` (all of it with `full`), as `re.match`/`fullmatch` do."""
        return self.match(pattern, text, what, full=full, shown=shown) is not None

    def match(
        self, pattern: str, text: str, what: str, *, full: bool = False, shown: str | None = None
    ) -> "regex.Match | None":
        """`re.match` (`re.fullmatch` with `full`) within the budget, else an AdapterError naming `what`/`shown`."""
        compiled = self.compile(pattern, what)
        budget = PATTERN_BUDGET_S if self.budget_s is None else self.budget_s
        if self._deadline is None:
            self._deadline = time.monotonic() + budget
        left = self._deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            found = compiled.fullmatch(text, timeout=left) if full else compiled.match(text, timeout=left)
        except TimeoutError:
            raise AdapterError(
                f"{self.where}: matching module names against {what} {shown or pattern!r} takes more than the "
                f"{budget:g} s allowed for a config's patterns (a pattern that backtracks exponentially, or very "
                "many patterns); PEFT would hang on it too: simplify the pattern"
            ) from None
        return found


def is_names(value: object) -> bool:
    """Whether a config value is a list of names (module lists, as PEFT's configs take them)."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def pattern_key(
    patterns: Mapping[str, object], module: str, matcher: PatternMatcher | None = None, what: str = "pattern key"
) -> str | None:
    """The first rank_pattern/alpha_pattern key matching `module` as PEFT does (`(.*\\.)?({key})$`); None: none."""
    matcher = matcher or PatternMatcher("adapter config")
    for key in patterns:
        matcher.compile(key, what)
        if matcher.matches(rf"(.*\.)?({key})$", module, what, shown=repr(key)):
            return key
    return None


def selects(config: Mapping, module: str, matcher: PatternMatcher) -> bool:
    """Whether PEFT puts a layer on `module` for this config (its `check_target_module_exists`); no target_modules
    (PEFT's per-model defaults, unknown here) or "all-linear" select every module."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str):
        if matcher.matches(exclude, module, "exclude_modules", full=True):
            return False
    elif exclude and (module in exclude or any(module.endswith(f".{key}") for key in exclude)):
        return False
    for name in config.get("modules_to_save") or ():
        if matcher.matches(rf"(^|.*\.){name}($|\..*)", module, "modules_to_save entry", shown=repr(name)):
            return False
    targets = config.get("target_modules")
    if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
        return True
    if isinstance(targets, str):
        return matcher.matches(targets, module, "target_modules", full=True)
    if module in targets:
        return True
    if not any(module.endswith(f".{key}") for key in targets):
        return False
    return _in_transformed_layers(config, module, matcher)


def _in_transformed_layers(config: Mapping, module: str, matcher: PatternMatcher) -> bool:
    indexes = config.get("layers_to_transform")
    if indexes is None or indexes == []:
        return True
    layers_pattern = config.get("layers_pattern")
    if not layers_pattern:
        found = _layer_index(matcher, r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        found = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            found = _layer_index(matcher, rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if found is not None:
                break
    if found is None:
        return False
    return found == indexes if isinstance(indexes, int) else found in indexes


def _layer_index(matcher: PatternMatcher, pattern: str, module: str) -> int | None:
    found = matcher.match(pattern, module, "layers_pattern")
    return None if found is None else int(found["idx"])
