"""Recipe YAML text → plain data: duplicate keys refused (PyYAML keeps the last silently), line
numbers kept for messages, and anchors/aliases bounded (a "billion laughs" file is refused)."""

from __future__ import annotations

import sys
from typing import Any

import yaml

from dltrain.errors import UserError

MAX_YAML_VALUES = 100_000  # values after expanding &anchors/*aliases (a recipe has hundreds)
MAX_INT_DIGITS = sys.get_int_max_str_digits() or 4300  # Python's own limit (0: none set)


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one, so a
    second `optimizer:` section would quietly replace the first)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # `<<:` merge keys may legitimately be overridden
            key = (key_node.tag, key_node.value)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{key_node.value}' (first set on line {first_line[key]})",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)

    def get_single_node(self):
        """The document's node graph, refused when aliases would expand it past
        MAX_YAML_VALUES (a 'billion laughs' document is small as text but not as data)."""
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}, set()) > MAX_YAML_VALUES:
            raise _TooLarge(
                f"the YAML expands to more than {MAX_YAML_VALUES:,} values through &anchors "
                "and *aliases (a recipe has a few hundred). Write the values out."
            )
        return node

    def construct_yaml_int(self, node):
        """Integers past Python's digit limit refused with the recipe's line, not with
        Python's advice to raise the limit (a recipe's numbers have a few digits)."""
        digits = sum(character.isdigit() for character in node.value)
        if digits > MAX_INT_DIGITS:
            raise _TooManyDigits(
                None,
                None,
                f"a number of {digits:,} digits (at most {MAX_INT_DIGITS:,} are read). Write "
                "a smaller number",
                node.start_mark,
            )
        return super().construct_yaml_int(node)


RecipeLoader.add_constructor("tag:yaml.org,2002:int", RecipeLoader.construct_yaml_int)


class _TooLarge(yaml.YAMLError):
    """A document whose aliases expand beyond MAX_YAML_VALUES."""


class _TooManyDigits(yaml.constructor.ConstructorError):
    """An integer longer than Python converts (well-formed YAML, so not a syntax error)."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `node` stands for once every alias is expanded (a cycle: unbounded)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        return MAX_YAML_VALUES + 1  # a recursive structure never ends
    open_nodes.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            total += _expanded_size(child, sizes, open_nodes)
            if total > MAX_YAML_VALUES:
                break
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            total += _expanded_size(k, sizes, open_nodes) + _expanded_size(v, sizes, open_nodes)
            if total > MAX_YAML_VALUES:
                break
    open_nodes.discard(key)
    sizes[key] = total
    return total


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """Parse YAML safely into a mapping; syntax errors name the line and column."""
    try:
        data = yaml.load(text, Loader=RecipeLoader)  # a SafeLoader: builds plain data only
    except _TooLarge as exc:
        raise UserError(f"{source}: {exc}") from None
    except _TooManyDigits as exc:
        raise UserError(f"{_where(exc, source)}: {exc.problem}.") from None
    except yaml.MarkedYAMLError as exc:
        raise UserError(
            f"{_where(exc, source)}: invalid YAML: {exc.problem}. Fix the syntax there."
        ) from None
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: invalid YAML: {exc}") from None
    except (ValueError, RecursionError) as exc:  # very deep nesting
        raise UserError(f"{source}: cannot read the YAML: {exc}") from None
    if data is None:
        raise UserError(f"{source}: the recipe is empty. See recipes/quickstart.yaml for one.")
    if not isinstance(data, dict):
        raise UserError(
            f"{source}: a recipe must be a mapping of keys (data:, model:, ...), "
            f"not a {type(data).__name__}."
        )
    return data


def _where(exc: yaml.MarkedYAMLError, source: str) -> str:
    mark = exc.problem_mark
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
