"""A strict YAML reader for the config: every scalar stays text, except null, true and false.

YAML 1.1 (PyYAML's default) reads `off` as false, `010` as 8 and `1:30` as 90; here those stay
text, which config.py's parsers then reject by name. A repeated key is an error (PyYAML keeps
the last one silently), and so is any tag other than the plain ones.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.constructor import ConstructorError

__all__ = ["load_strict_yaml"]


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses repeated keys and leaves numbers as text for config.py.

    YAML 1.1 (PyYAML's default) reads `off` as false, `010` as 8 and `1:30` as 90; here those stay
    text, which the parsers then reject by name. A repeated key would silently replace the first.
    """

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


def _construct_bool(loader: _StrictLoader, node: yaml.ScalarNode) -> bool:
    text = loader.construct_scalar(node).lower()
    if text not in ("true", "false"):
        raise ConstructorError(None, None, f"{text!r} is not true or false", node.start_mark)
    return text == "true"


_TAG = "tag:yaml.org,2002:"
_StrictLoader.yaml_implicit_resolvers = {}
for _first, _entries in yaml.SafeLoader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _entries:
        if _tag in (_TAG + "null", _TAG + "merge"):
            _StrictLoader.yaml_implicit_resolvers.setdefault(_first, []).append((_tag, _regexp))
for _spelling in ("true", "True", "TRUE", "false", "False", "FALSE"):
    _bool_re = re.compile(f"^{_spelling}$")
    _StrictLoader.yaml_implicit_resolvers.setdefault(_spelling[0], []).append(
        (_TAG + "bool", _bool_re)
    )
# Any other tag (!!int, !!binary, !!python/...) is refused by the loader.
_StrictLoader.yaml_constructors = {
    _TAG + "null": yaml.SafeLoader.construct_yaml_null,
    _TAG + "bool": _construct_bool,
    _TAG + "str": yaml.SafeLoader.construct_yaml_str,
    _TAG + "seq": yaml.SafeLoader.construct_yaml_seq,
    _TAG + "map": yaml.SafeLoader.construct_yaml_map,
    None: yaml.SafeLoader.construct_undefined,
}


def load_strict_yaml(text: str) -> object:
    """Parse text; raise yaml.YAMLError (with a mark) on anything the loader refuses."""
    return yaml.load(text, Loader=_StrictLoader)
