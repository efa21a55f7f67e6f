"""One small Registry class: a dict of named factory functions filled by a decorator.

A recipe section `{name: key, **kwargs}` maps to one call `factory(**runtime, **kwargs)`.
Each registry names the modules that register dltrain's own components into it and imports
them on its first lookup (as timm's registration on import does), so no caller has to load
anything first; the user's own modules (`imports:`) register into the same dicts.
The user's kwargs are checked against the factory's signature (names, types via the
annotations, constraints via `Annotated[..., Field(...)]`) before any data is read. Run-time
objects (parameters, class count, input shape...) are passed by dltrain at the call site and are
never accepted from the user. A registry may also have common arguments: keys every one of its
sections accepts that no factory takes, read by the caller from the validated section (e.g.
`optimizer.norms_and_biases`, which optim.build_optimizer turns into param groups).
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from dltrain.config.dataset_defaults import RecipeDefault
from dltrain.config.messages import recipe_error
from dltrain.errors import RecipeError, did_you_mean


class _InputPath:
    """Marks a component argument that names a file or folder the user's run reads:
    `Annotated[str, INPUT_PATH]`. Such values, written in a recipe file, are relative to the
    recipe's folder; the run checks they exist before anything else."""

    def __repr__(self) -> str:
        return "INPUT_PATH"


INPUT_PATH = _InputPath()


def _marks_input_path(annotation: Any) -> bool:
    if typing.get_origin(annotation) is typing.Annotated:
        return any(m is INPUT_PATH for m in annotation.__metadata__) or _marks_input_path(
            typing.get_args(annotation)[0]
        )
    return any(_marks_input_path(a) for a in typing.get_args(annotation))


@dataclass(frozen=True)
class Argument:
    """One user-settable argument of a factory, for `dltrain list` and docs."""

    name: str
    annotation: str
    default: Any  # inspect.Parameter.empty when required

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def __str__(self) -> str:
        return self.name if self.required else f"{self.name}={self.default!r}"


@dataclass(frozen=True)
class Family:
    """Names `prefix:member` served by one factory taking the member as first argument."""

    prefix: str
    factory: Callable[..., Any]
    members: Callable[[], list[str]]
    summary: str


class Registry:
    """Named factories of one kind (models, datasets, losses...)."""

    def __init__(
        self, kind: str, runtime_args: tuple[str, ...] = (), modules: tuple[str, ...] = ()
    ):
        self.kind = kind
        self.singular = kind.removesuffix("es") if kind.endswith("sses") else kind.removesuffix("s")
        self.runtime_args = frozenset(runtime_args)
        self.modules = modules  # dltrain's own modules that register into this registry
        self._loaded = False
        self._factories: dict[str, Callable[..., Any]] = {}
        self._families: dict[str, Family] = {}
        self._schemas: dict[Callable[..., Any], type[BaseModel]] = {}
        self._common: dict[str, Any] = {}  # name -> annotation; each defaults to None
        self._tasks: dict[str, tuple[str, ...]] = {}  # the tasks a component is for, if known
        self._recipe_defaults: dict[str, tuple[RecipeDefault, ...]] = {}

    def load(self) -> None:
        """Import the modules that register dltrain's components (once; later calls are free)."""
        if self._loaded:
            return
        self._loaded = True  # first: those modules register while they are being imported
        for module in self.modules:
            importlib.import_module(module)

    def register(
        self,
        name: str | None = None,
        tasks: tuple[str, ...] | None = None,
        recipe_defaults: tuple[RecipeDefault, ...] = (),
    ) -> Callable[[Callable], Callable]:
        """Decorator: register a factory under `name` (default: the function's name). `tasks`:
        the only tasks it is for (a dataset's own task, the tasks a loss fits), so that a
        recipe that mixes them is refused before any data is read. `recipe_defaults`: what a
        recipe that uses it gets where it says nothing (config/dataset_defaults.py)."""

        def decorate(factory: Callable) -> Callable:
            if factory.__module__ not in self.modules:
                self.load()  # a user's component: a clash with a built-in name shows here
            key = name or factory.__name__
            if key in self._factories:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._factories[key] = factory
            if tasks is not None:
                self._tasks[key] = tuple(tasks)
            if recipe_defaults:
                self._recipe_defaults[key] = tuple(recipe_defaults)
            return factory

        return decorate

    def tasks(self, name: str) -> tuple[str, ...] | None:
        """The tasks `name` was registered for (None: any, or not known before its data)."""
        self.load()
        return self._tasks.get(name)

    def recipe_defaults(self, name: Any) -> tuple[RecipeDefault, ...]:
        """The recipe values `name` was registered with (none for unknown names)."""
        self.load()
        return self._recipe_defaults.get(name, ()) if isinstance(name, str) else ()

    def register_family(
        self, prefix: str, factory: Callable, members: Callable[[], list[str]], summary: str
    ) -> None:
        """Register `prefix:<member>` names, e.g. each torchvision model as 'torchvision:<name>'."""
        self._families[prefix] = Family(prefix, factory, members, summary)

    def add_common_argument(self, name: str, annotation: Any) -> None:
        """Accept `name` in every section of this registry, checked against `annotation`.

        The factories never receive it: the caller reads it from the validated section. Its
        default is None, and while it is None it is left out of the validated section, so
        recipes that do not use it resolve (and resume) as before. None cannot be written in
        a recipe unless the annotation allows it.
        """
        self._common[name] = annotation
        self._schemas.clear()

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a glob pattern, sorted; families appear as 'prefix:<name>',
        or, for a pattern in one family ('timm:convnext*'), as its matching members."""
        self.load()
        prefix, colon, members = pattern.partition(":")
        if colon and prefix in self._families:
            listed = self._families[prefix].members()
            return sorted(f"{prefix}:{m}" for m in fnmatch.filter(listed, members or "*"))
        keys = list(self._factories) + [f"{p}:<name>" for p in self._families]
        return sorted(k for k in keys if fnmatch.fnmatch(k, pattern))

    def __contains__(self, name: str) -> bool:
        try:
            self._resolve(name, "")
        except RecipeError:
            return False
        return True

    def summary(self, name: str) -> str:
        """The first line of the factory's docstring."""
        self.load()
        family = self._families.get(name.split(":")[0]) if ":" in name else None
        if family:
            return family.summary
        doc = inspect.getdoc(self._factories[name]) or ""
        return doc.splitlines()[0] if doc else ""

    def arguments(self, name: str) -> list[Argument]:
        """The arguments a user may set for `name` (or 'prefix:<name>'), in signature order."""
        self.load()
        prefix, _, member = name.partition(":")
        if member == "<name>" and prefix in self._families:
            factory = self._families[prefix].factory
        else:
            factory, _ = self._resolve(name, "")
        hints = typing.get_type_hints(factory)
        own = [
            Argument(p.name, _type_name(hints.get(p.name, Any)), p.default)
            for p in self._user_parameters(factory)
        ]
        common = [Argument(k, _type_name(a), None) for k, a in self._common.items()]
        return own + common

    def path_arguments(self, name: str) -> list[str]:
        """The arguments of `name` that name files or folders to read (marked INPUT_PATH)."""
        factory, _ = self._resolve(name, "")
        hints = typing.get_type_hints(factory, include_extras=True)
        return [
            p.name for p in self._user_parameters(factory) if _marks_input_path(hints.get(p.name))
        ]

    def validate(self, section: dict[str, Any], where: str) -> dict[str, Any]:
        """Check a `{name, **kwargs}` section; return it with every default filled in.

        `where` is the section's key path (e.g. 'optimizer'), used in error messages.
        """
        name = section.get("name")
        if not isinstance(name, str):
            raise RecipeError(
                f"{where}.name",
                f"must be the name of one of the {self.kind} (see `dltrain list {self.kind}`).",
            )
        factory, _ = self._resolve(name, f"{where}.name")
        kwargs = {k: v for k, v in section.items() if k != "name"}
        for key in kwargs:
            if key in self.runtime_args:
                raise RecipeError(
                    f"{where}.{key}",
                    "is supplied by dltrain at run time; remove it from the recipe.",
                )
        schema = self._schema(factory)
        try:
            checked = schema.model_validate(kwargs)
        except ValidationError as exc:
            raise recipe_error(exc, schema, where) from None
        values = checked.model_dump(mode="json")
        unset = {k for k in self._common if values.get(k) is None}
        return {"name": name, **{k: v for k, v in values.items() if k not in unset}}

    def build(self, section: dict[str, Any], **runtime: Any) -> Any:
        """Call the factory named by a validated section with run-time objects plus its kwargs."""
        factory, member = self._resolve(section["name"], "")
        kwargs = {k: v for k, v in section.items() if k != "name" and k not in self._common}
        schema = self._schema(factory)
        # Validate again to turn JSON-ish values (lists) into the annotated Python types.
        checked = schema.model_validate(kwargs)
        typed = {k: getattr(checked, k) for k in schema.model_fields if k not in self._common}
        extra = {k: v for k, v in kwargs.items() if k not in schema.model_fields}
        args = (member,) if member is not None else ()
        accepted = inspect.signature(factory).parameters
        runtime = {k: v for k, v in runtime.items() if k in accepted}  # each takes what it needs
        return factory(*args, **runtime, **typed, **extra)

    # -- internals ----------------------------------------------------------------------------

    def _resolve(self, name: str, where: str) -> tuple[Callable, str | None]:
        self.load()
        if name in self._factories:
            return self._factories[name], None
        prefix, _, member = name.partition(":")
        family = self._families.get(prefix) if member else None
        if family:
            members = family.members()
            if member not in members:
                raise RecipeError(
                    where,
                    f"unknown {prefix} {self.singular} '{member}'.{did_you_mean(member, members)}",
                )
            return family.factory, member
        known = list(self._factories) + [f"{p}:" for p in self._families]
        hint = did_you_mean(name, known) or f" Known: {', '.join(sorted(self._factories))}."
        raise RecipeError(where, f"unknown {self.singular} '{name}'.{hint}")

    def _user_parameters(self, factory: Callable) -> list[inspect.Parameter]:
        params = list(inspect.signature(factory).parameters.values())
        if factory in {f.factory for f in self._families.values()}:
            params = params[1:]  # the family member is passed positionally
        return [
            p
            for p in params
            if p.name not in self.runtime_args and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def _schema(self, factory: Callable) -> type[BaseModel]:
        """A pydantic model of the factory's user arguments (cached)."""
        if factory not in self._schemas:
            hints = typing.get_type_hints(factory, include_extras=True)
            accepts_more = any(
                p.kind == p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values()
            )
            fields = {
                p.name: (
                    hints.get(p.name, Any),
                    ... if p.default is inspect.Parameter.empty else p.default,
                )
                for p in self._user_parameters(factory)
            }
            clash = set(fields) & set(self._common)
            if clash:
                raise ValueError(
                    f"{self.singular} factory {factory.__name__} takes {sorted(clash)}, which "
                    f"every {self.singular} section accepts for dltrain; rename the argument."
                )
            # The default None is not validated: unset, the key is left out (see validate).
            fields |= {k: (a, None) for k, a in self._common.items()}
            config = ConfigDict(
                extra="allow" if accepts_more else "forbid",
                arbitrary_types_allowed=True,
                allow_inf_nan=False,  # nan/inf: never meant, and not kept by the resolved recipe
            )
            self._schemas[factory] = create_model(
                f"{factory.__name__}_args", __config__=config, **fields
            )
        return self._schemas[factory]


def _type_name(annotation: Any) -> str:
    """A short readable name of a type annotation, e.g. 'float', 'list[int]', 'str | None'."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


# The registries, each with the modules that fill it (the one list of them: a new model file is
# added to MODELS' modules). The run-time arguments listed here are passed by dltrain and refused
# in recipes. Models: num_classes is the output width (classes; 1 for regression; the target
# vocabulary for seq2seq); vocab_size the input vocabulary for token input; data_meta the rest.
MODELS = Registry(
    "models",
    runtime_args=("input_shape", "num_classes", "input_kind", "vocab_size", "task", "data_meta"),
    modules=tuple(
        f"dltrain.models.{m}"
        for m in (
            "cnn",
            "hf_text",
            "mlp",
            "resnet",
            "rnn",
            "speednet",
            "tabular",
            "timm_models",
            "torchvision_models",
            "transformer",
        )  # fmt: skip
    ),
)
DATASETS = Registry(
    "datasets",
    # task: data.task as the recipe asks for it (auto, ...); model: the recipe's model section
    # (a Hugging Face model's tokenizer encodes the texts); saved_meta: a checkpoint's
    # data_meta when its data is read again (eval): encode as in training
    runtime_args=("seed", "task", "model", "saved_meta"),
    modules=tuple(
        f"dltrain.data.{m}"
        for m in (
            "digits",
            "arrays",
            "images",
            "csv_tables",
            "text",
            "sequences",
            "synthetic",
            "torchvision_sets",
        )
    ),
)
LOSSES = Registry(
    "losses", runtime_args=("num_classes", "class_counts", "task"), modules=("dltrain.losses",)
)
OPTIMIZERS = Registry(
    "optimizers",
    runtime_args=("params", "device_type", "model"),
    modules=("dltrain.optim", "dltrain.muon"),
)
SCHEDULERS = Registry(
    "schedulers",
    runtime_args=("optimizer", "epochs", "steps_per_epoch"),
    modules=("dltrain.optim",),
)
AUGMENTATIONS = Registry(
    "augmentations",
    runtime_args=("input_kind", "input_shape"),
    modules=("dltrain.data.augment",),
)

REGISTRIES = {r.kind: r for r in (MODELS, DATASETS, LOSSES, OPTIMIZERS, SCHEDULERS, AUGMENTATIONS)}
