"""Property tests (hypothesis): whatever a user writes, the recipe loader and the override parser
end in a result or a UserError (exit 2 with a message), never another exception.

Inputs: arbitrary text as YAML, arbitrary override strings, and the quickstart recipe with random
leaves replaced by random values at random key paths (new keys included). A recipe that is
accepted must also survive its own resolved form (recipe.yaml, the checkpoint's copy), since
`eval` and `--resume` read that back. Nothing here reads data or trains.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from dltrain.config.loading import resolve_with_context
from dltrain.config.overrides import apply_overrides, parse_override
from dltrain.config.registry import REGISTRIES
from dltrain.config.schema import DataSection, Recipe, TrainSection, resolve, to_yaml
from dltrain.config.yaml_text import parse_yaml
from dltrain.errors import UserError

from helpers.cli import QUICKSTART

QUICKSTART_RAW = parse_yaml(QUICKSTART.read_text(encoding="utf-8"), str(QUICKSTART))

# No deadline: the first example imports the component registries, and CI machines vary.
FAST = settings(deadline=None, max_examples=150)

# -- strategies ---------------------------------------------------------------------------------

# Words that mean something to dltrain, so random inputs reach past the first check.
KNOWN_KEYS = sorted(
    {*Recipe.model_fields, *DataSection.model_fields, *TrainSection.model_fields}
    - {"imports"}  # random module names would be imported: that path has its own tests
    | {"lr", "dropout", "hidden", "padding", "shape", "num_classes", "path", "warmup_epochs"}
)
KNOWN_WORDS = sorted(
    {name for registry in REGISTRIES.values() for name in registry.names()}
    | {"auto", "cpu", "cuda", "cuda:0", "mps", "xla", "fp16", "bf16", "val_loss", "none", ""}
)

keys = st.sampled_from(KNOWN_KEYS) | st.text(max_size=8)
odd_keys = st.integers(-2, 2) | st.none() | st.booleans()  # YAML keys need not be strings
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    # nan and ±inf included; no subnormals: an in-process fit earlier in the session may have
    # set flush-to-zero (torch.set_flush_denormal), and hypothesis refuses to draw them then.
    | st.floats(allow_subnormal=False)
    | st.text(max_size=12)
    | st.sampled_from(KNOWN_WORDS)
)
# Values that often pass validation, so accepted recipes (and their round trip) are tested too.
plausible = (
    st.integers(0, 64)
    | st.floats(0, 1, exclude_max=True, allow_subnormal=False)
    | st.sampled_from(KNOWN_WORDS)
) | st.lists(st.integers(1, 16), max_size=3)
values = plausible | st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys | odd_keys, inner, max_size=3),
    max_leaves=8,
)


def key_paths(node: dict, prefix: str = "") -> list[str]:
    """Every dotted key path in a mapping: 'data', 'data.name', ..."""
    paths = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, dict):
            paths += key_paths(value, path + ".")
    return paths


@st.composite
def mutated_quickstart(draw) -> dict[str, Any]:
    """The quickstart mapping with 1-3 values set at random paths, old keys or new."""
    raw = copy.deepcopy(QUICKSTART_RAW)
    for _ in range(draw(st.integers(1, 3))):
        node = raw
        while True:
            existing = st.sampled_from(sorted(node, key=str)) if node else st.nothing()
            key = draw(existing | existing | keys | odd_keys)  # mostly keys that exist
            if isinstance(node.get(key), dict) and draw(st.booleans()):
                node = node[key]  # go deeper
                continue
            node[key] = draw(values)
            break
    return raw


def flow_yaml(value: Any) -> str:
    """A value as one line of YAML, as a user might type it after '='."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


dotted_keys = st.sampled_from(key_paths(QUICKSTART_RAW)) | st.lists(
    st.sampled_from(KNOWN_KEYS) | st.text("ab_.1 ", max_size=4), min_size=1
).map(".".join)
override_texts = (
    st.text(max_size=30)
    | st.builds(
        lambda path, value: f"{path}={value}",
        dotted_keys,
        st.text(max_size=20) | values.map(flow_yaml),
    )
    | st.builds(lambda value: f"{value}=", st.text(max_size=10))
)

yaml_texts = st.text(max_size=200) | st.lists(
    st.sampled_from(
        [
            *(f"{k}:" for k in KNOWN_KEYS[:12]),
            *KNOWN_WORDS[:12],
            *("\n", "  ", "\t", "- ", ": ", "[", "]", "{", "}", ",", "&a ", "*a", "<<: ", "? "),
            *("!!python/object:os.system ", "!!binary ", "|", ">", "#", "'", '"', "---", "..."),
            *("~", ".nan", "-.inf", "0x1F", "1e400", "2024-01-01", "'\\x00'", "%YAML 1.1\n"),
        ]
    ),
    max_size=40,
).map("".join)


def succeeds_or_user_error(run) -> Any:
    """Call `run`; a UserError is a fine answer (exit 2), anything else fails the test."""
    try:
        result = run()
    except UserError as exc:
        assert exc.exit_code == 2 and str(exc)
        event("user error")  # `pytest --hypothesis-show-statistics` shows the balance
        return None
    event("accepted")
    return result


def assert_resolved_form_loads(recipe: Recipe | None) -> None:
    """An accepted recipe must load again from what is written into recipe.yaml / checkpoints."""
    if recipe is not None:
        resolve(yaml.safe_load(to_yaml(recipe)))


# -- properties ---------------------------------------------------------------------------------


@FAST
@given(yaml_texts)
@example("seed: " + "9" * 5000)  # beyond int()'s digit limit: once a ValueError
@example("a: " + "[" * 2000 + "]" * 2000)  # deeper than Python's recursion limit
def test_any_text_is_a_recipe_or_a_user_error(text):
    raw = succeeds_or_user_error(lambda: parse_yaml(text, "recipe.yaml"))
    if raw is not None:
        assert isinstance(raw, dict)
        raw.setdefault("name", "recipe")
        recipe = succeeds_or_user_error(lambda: resolve_with_context(raw, [], "recipe.yaml", text))
        assert_resolved_form_loads(recipe)


@FAST
@given(mutated_quickstart())
@example({**QUICKSTART_RAW, "optimizer": {"name": "adam", "lr": float("inf")}})  # once kept
@example({**QUICKSTART_RAW, "train": {"grad_clip": float("nan")}})  # ... and stored as null
def test_any_mutated_recipe_resolves_or_is_a_user_error(raw):
    text = yaml.safe_dump(raw, sort_keys=False)  # as if read from a file: errors get a line
    recipe = succeeds_or_user_error(lambda: resolve_with_context(raw, [], "recipe.yaml", text))
    assert_resolved_form_loads(recipe)


@FAST
@given(override_texts)
@example("seed=" + "9" * 5000)
@example("model.hidden=" + "[" * 2000)
def test_any_override_parses_or_is_a_user_error(text):
    parsed = succeeds_or_user_error(lambda: parse_override(text))
    if parsed is not None:
        keys_, _ = parsed
        assert keys_ and all(keys_)


@FAST
@given(st.lists(override_texts, max_size=4))
def test_any_overrides_of_the_quickstart_resolve_or_are_a_user_error(overrides):
    before = copy.deepcopy(QUICKSTART_RAW)
    succeeds_or_user_error(lambda: apply_overrides(QUICKSTART_RAW, overrides))
    assert before == QUICKSTART_RAW  # overrides never modify the mapping they are given
    recipe = succeeds_or_user_error(
        lambda: resolve_with_context(QUICKSTART_RAW, overrides, "quickstart.yaml")
    )
    assert_resolved_form_loads(recipe)


@settings(
    deadline=None, max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(override_texts, max_size=3))
def test_dltrain_check_exits_0_or_2_without_a_traceback(invoke, overrides):
    # `invoke` fails the test if anything but SystemExit escapes the command.
    result = invoke("check", str(QUICKSTART), "--", *overrides)
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert result.stderr.startswith("error:")


@pytest.mark.parametrize("value", ["1e400", ".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused_with_the_key(value):
    with pytest.raises(UserError, match="optimizer.lr: input should be a finite number"):
        resolve_with_context(QUICKSTART_RAW, [f"optimizer.lr={value}"], "quickstart.yaml")
