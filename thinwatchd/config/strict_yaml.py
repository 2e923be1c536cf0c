"""A strict YAML reader for the config: every scalar stays text, except null, true and false.

YAML 1.1 (PyYAML's default) reads `off` as false, `010` as 8 and `1:30` as 90; here those stay
text, which load.py's parsers then reject by name. A repeated key is an error (PyYAML keeps
the last one silently), and so is any tag other than the plain ones.

Hostile documents fail fast: libyaml does the parsing, nesting is capped (composing recurses per
level) and so is the number of values, each alias counted as all it refers to ("billion laughs").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner, ScannerError

__all__ = ["MAX_DEPTH", "MAX_VALUES", "load_strict_yaml"]

#: A config is nested 5 levels deep (pools.<name>.data.step: value); this leaves room for style.
MAX_DEPTH = 32
#: A pool written out in full is about 60 values, so this allows hundreds of pools, yet stops a
#: document of 1 MiB of keys within a fraction of a second (composing is pure Python).
MAX_VALUES = 20_000


class _Strict(Composer, SafeConstructor, Resolver):
    """The composer (with the limits), constructor and resolver; the loaders add a parser."""

    def _start(self) -> None:
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0
        self._values = 0  # nodes composed so far, each alias counted as its anchor's whole tree
        self._anchor_values: dict[str, int] = {}  # anchor -> values in its tree, once complete

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: Any = self.peek_event()  # type: ignore[attr-defined]
        anchor: str | None = event.anchor
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            if anchor in self.anchors:  # else PyYAML reports the undefined alias
                values = self._anchor_values.get(str(anchor))
                if values is None:  # its anchor is still open: a recursive structure
                    problem = f"alias *{anchor} refers to a node that contains it"
                    raise ComposerError(None, None, problem, mark)
                self._count(values, mark, anchor)
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise ComposerError(None, None, _too_deep(), mark)
        before = self._values
        self._count(1, mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if anchor is not None:
            self._anchor_values[anchor] = self._values - before
        return node

    def _count(self, values: int, mark: Any, alias: str | None = None) -> None:
        self._values += values
        if self._values > MAX_VALUES:
            what = f"alias *{alias} expands the document to" if alias else "the document has"
            problem = f"{what} more than {MAX_VALUES} values; a config needs far fewer"
            raise ComposerError(None, None, problem, mark)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise ConstructorError(None, None, "expected a mapping", node.start_mark)
        own = {id(key_node) for key_node, _ in node.value}  # keys merged in by << may be overridden
        self.flatten_mapping(node)
        mapping: dict[Any, Any] = {}
        seen: set[object] = set()
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            problem = "" if isinstance(key, str | bool | None) else "a key that is not text"
            if not problem and id(key_node) in own:
                problem = f"duplicate key {key!r}" if key in seen else ""
                seen.add(key)
            if problem:
                raise ConstructorError(None, None, f"found {problem}", key_node.start_mark)
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


def _too_deep() -> str:
    return f"nested more than {MAX_DEPTH} levels deep; a config needs 5"


def _construct_bool(loader: _Strict, node: yaml.ScalarNode) -> bool:
    text = loader.construct_scalar(node).lower()
    if text not in ("true", "false"):
        raise ConstructorError(None, None, f"{text!r} is not true or false", node.start_mark)
    return text == "true"


_TAG = "tag:yaml.org,2002:"
_Strict.yaml_implicit_resolvers = {}
for _first, _entries in Resolver.yaml_implicit_resolvers.items():
    for _tag, _regexp in _entries:
        if _tag in (_TAG + "null", _TAG + "merge"):
            _Strict.yaml_implicit_resolvers.setdefault(_first, []).append((_tag, _regexp))
for _spelling in ("true", "True", "TRUE", "false", "False", "FALSE"):
    _bool_re = re.compile(f"^{_spelling}$")
    _Strict.yaml_implicit_resolvers.setdefault(_spelling[0], []).append((_TAG + "bool", _bool_re))
# Any other tag (!!int, !!binary, !!python/...) is refused by the loader.
_Strict.yaml_constructors = {
    _TAG + "null": SafeConstructor.construct_yaml_null,
    _TAG + "bool": _construct_bool,
    _TAG + "str": SafeConstructor.construct_yaml_str,
    _TAG + "seq": SafeConstructor.construct_yaml_seq,
    _TAG + "map": SafeConstructor.construct_yaml_map,
    None: SafeConstructor.construct_undefined,
}


class _PureLoader(Reader, Scanner, Parser, _Strict):
    """The fallback where PyYAML was built without libyaml."""

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        self._start()

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        # Looking ahead for a key, the scanner checks every open flow level at each character:
        # stop `[[[[...` here, before the composer would see it.
        if self.flow_level >= MAX_DEPTH:
            mark: Any = self.get_mark()
            raise ScannerError(None, None, _too_deep(), mark)
        super().fetch_flow_collection_start(TokenClass)


_Loader: Callable[[str], Any] = _PureLoader
if yaml.__with_libyaml__:  # as in every PyYAML wheel and distribution package
    from yaml._yaml import CParser

    class _CLoader(_Strict, CParser):
        """libyaml parses: the pure-Python scanner takes seconds for a MiB, libyaml milliseconds."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            self._start()

    _Loader = _CLoader


def load_strict_yaml(text: str) -> object:
    """Parse text; raise yaml.YAMLError (with a mark) on anything the loader refuses."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
