"""One generator for the options of distill, finetune, lora train and data prepare, built from dataclasses.

Each option is declared once, as `option(...)` metadata on a dataclass field
(`sdcompress.training.config`, plus the few command-level fields in each
command module). `training_command` turns a command's dataclasses into a Typer
command: it gives a function an explicit `__signature__` of
`Annotated[type, typer.Option(...)]` parameters (Typer reads signatures, so
this is how a signature is built from data), and on a call it merges
`--config run.toml`, checks the required options and builds the dataclasses
that the command's `run` receives. Per-command defaults and help texts are a
small override table, so the CLI default and the dataclass default can only
differ where that table says so. A command may take only some of a
dataclass's options (`data prepare` has no augmentation flags; the rest keep
their dataclass defaults), and may take one as a positional argument.

TOML keys are the flag names (`batch-size` or `batch_size`, `format`,
`type`, `dtype`), optionally under a table named after the command; the old
Python spellings (`format_`, `type_`, `save_dtype`) still work with a
deprecation note; a typo names the closest valid key. The command line wins
over the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from sdcompress.choices import DType
from sdcompress.cli._options import DTYPE_METAVAR, renamed
from sdcompress.errors import SdcError
from sdcompress.training.config import RUN, Flag, flag_of, option

if typing.TYPE_CHECKING:
    from sdcompress.training.engine import ProgressEvent

T = TypeVar("T")


@dataclass(frozen=True)
class OutputOptions:
    """What every training command shares besides the training itself: output dtype, input safety, JSON."""

    dtype: DType | None = field(
        default=None,
        metadata=option(
            "--dtype",
            "fp32, fp16 or bf16 (or float32, float16, bfloat16; default: keep the source dtype).",
            choices=DType,
            parser=DType.cli,
            metavar=DTYPE_METAVAR,
            aliases=("--save-dtype",),
        ),
    )
    allow_pickle: bool = field(
        default=False,
        metadata=option("--allow-pickle", "Allow pickled .ckpt/.bin inputs (read with weights_only=True)."),
    )
    json: bool = field(
        default=False, metadata=option("--json", "Print machine-readable JSON instead of tables.")
    )

    def __post_init__(self) -> None:
        from sdcompress.training.config import coerce_choices

        coerce_choices(self)


def text_encoder_lr(panel: str | None) -> dict[str, Flag]:
    """`--text-encoder-lr`, shared by finetune and lora train (each in its own help panel)."""
    return option("--text-encoder-lr", "Text-encoder learning rate (default: --lr).", panel)


CONFIG_HELP = "TOML file with any of these options (keys named like the flags); the command line wins."


# ---------------------------------------------------------------------------- the parameters


@dataclass(frozen=True)
class _Param:
    """One generated option: where its value goes (section, field path) and how Typer shows it."""

    flag: Flag
    section: type
    path: tuple[str, ...]
    annotation: Any
    default: Any
    help: str
    order: tuple[int, int, int]
    repeatable: bool = False  # a tuple field, given as a repeated option
    hidden_alias_of: str | None = None  # for a deprecated spelling: the key of the real option
    argument: str | None = None  # given as this positional argument instead of its flag

    @property
    def key(self) -> str:
        if self.argument is not None:
            return self.argument
        return self.flag.key if self.hidden_alias_of is None else _key(self.flag.aliases[0])

    def typer_parameter(self) -> inspect.Parameter:
        if self.argument is not None:
            info = typer.Argument(help=self.help, show_default=False)
            return inspect.Parameter(
                self.key,
                inspect.Parameter.KEYWORD_ONLY,
                default=self.default,
                annotation=Annotated[self.annotation, info],
            )
        names = [self.flag.name] if self.hidden_alias_of is None else [self.flag.aliases[0]]
        if self.flag.short and self.hidden_alias_of is None:
            names.append(self.flag.short)
        extra: dict[str, Any] = {}
        if self.flag.parser is not None:
            extra["parser"] = self.flag.parser
        if self.flag.metavar is not None:
            extra["metavar"] = self.flag.metavar
        info = typer.Option(
            *names,
            help=self.help,
            rich_help_panel=self.flag.panel,
            hidden=self.hidden_alias_of is not None,
            **extra,
        )
        default = None if self.hidden_alias_of is not None else self.default
        return inspect.Parameter(
            self.key,
            inspect.Parameter.KEYWORD_ONLY,
            default=default,
            annotation=Annotated[self.annotation, info],
        )


def _key(flag_name: str) -> str:
    return flag_name.lstrip("-").replace("-", "_")


def _cli_type(hint: Any, flag: Flag) -> Any:
    """The type Typer sees: lists for tuples (repeatable options), bool for negated flags."""
    if flag.negate:
        return bool
    args = typing.get_args(hint)
    optional = type(None) in args
    inner = [a for a in args if a is not type(None)] if args else [hint]
    base = inner[0] if len(inner) == 1 else hint
    if typing.get_origin(base) is tuple:
        return list[typing.get_args(base)[0]] | None
    if flag.choices is not None:
        return flag.choices | None if optional else flag.choices
    return hint


def _walk(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any, Flag, Any]]:
    """(field path, type hint, flag, dataclass default) of every flagged field, nested dataclasses included."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in fields(cls):
        flag = flag_of(f)
        if flag is not None:
            found.append(((*prefix, f.name), hints[f.name], flag, f.default))
        elif is_dataclass(f.default):
            found += _walk(type(f.default), (*prefix, f.name))
    return found


def build_params(
    sections: Sequence[type],
    panels: Sequence[str | None],
    defaults: Mapping[str, Any],
    helps: Mapping[str, str],
    only: Mapping[type, Sequence[str]] | None = None,
    arguments: Mapping[str, str] | None = None,
) -> list[_Param]:
    """Every option of a command, in help order: by panel, then by section, then by field.

    `only[section]` lists the option keys a command takes from that section (default: all of them);
    `arguments` maps an option key to the positional argument that replaces its flag.
    """
    only, arguments = only or {}, arguments or {}
    params: list[_Param] = []
    seen: dict[str, type] = {}
    for s_index, section in enumerate(sections):
        for f_index, (path, hint, flag, default) in enumerate(_walk(section)):
            if section in only and flag.key not in only[section]:
                continue
            if flag.key in seen:
                raise TypeError(f"{flag.name} is declared by both {seen[flag.key]} and {section}")
            seen[flag.key] = section
            if flag.panel not in panels:
                raise TypeError(f"{flag.name}: panel {flag.panel!r} is not in this command's panels")
            repeatable = isinstance(default, tuple)
            if flag.key in defaults:
                default = defaults[flag.key]
            elif flag.negate:
                default = not default
            elif repeatable:
                default = None  # no values given means the dataclass default
            common = dict(
                flag=flag,
                section=section,
                path=path,
                annotation=_cli_type(hint, flag),
                default=default,
                help=helps.get(flag.key, flag.help),
                order=(panels.index(flag.panel), s_index, f_index),
                repeatable=repeatable,
            )
            params.append(_Param(**common, argument=arguments.get(flag.key)))
            for _ in flag.aliases[:1]:
                params.append(_Param(**common, hidden_alias_of=flag.key))
    selected = {key for keys in only.values() for key in keys} | set(arguments)
    unknown = (set(defaults) | set(helps) | selected) - set(seen)
    if unknown:
        raise TypeError(f"override for unknown options: {sorted(unknown)}")
    return sorted(params, key=lambda p: p.order)


# ---------------------------------------------------------------------------- --config


def read_config_file(path: Path, command: str) -> dict[str, Any]:
    """Options from a TOML file: top-level keys, overridden by a table named after the command."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdcError(f"config file {path} does not exist; check the --config path.") from None
    except tomllib.TOMLDecodeError as exc:
        raise SdcError(f"config file {path} is not valid TOML ({exc}); fix the file.") from exc
    section = data.pop(command, {}) if isinstance(data.get(command), dict) else {}
    merged = {k: v for k, v in data.items() if not isinstance(v, dict)}
    merged.update(section)
    return merged


def config_key(key: str, params: Sequence[_Param], path: Path) -> tuple[str, str | None]:
    """The option a TOML key names, and the deprecated spelling used (or None); a typo is an error."""
    real = {p.key: p for p in params if p.hidden_alias_of is None}
    normal = key.replace("-", "_")
    if normal in real:
        return normal, None
    if normal.rstrip("_") in real:  # the Python names of 0.x files: format_, type_, json_
        return normal.rstrip("_"), key
    aliases = {_key(a): p.key for p in real.values() for a in p.flag.aliases}
    for spelling in (normal, normal.rstrip("_")):  # an old flag's name, or its Python name (type_)
        if spelling in aliases:
            return aliases[spelling], key
    names = [p.argument or p.flag.name.lstrip("-") for p in real.values()]
    close = difflib.get_close_matches(key.replace("_", "-"), names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "the keys are the option names, such as 'batch-size'."
    raise SdcError(f"config file {path} has an unknown option {key!r}; {hint}")


def _as_path(annotation: Any, value: Any) -> Any:
    """Typer converts command-line paths to Path; values from the file get the same treatment."""
    if value is None:
        return None
    if Path in typing.get_args(annotation) or annotation is Path:
        return Path(value)
    return value


def merge_config_file(
    ctx: typer.Context,
    values: dict[str, Any],
    params: Sequence[_Param],
    command: str,
    file_keys: Mapping[str, Callable[[Any, str], Any]] | None = None,
    file_values: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`values` with the file's options filled in where the command line gave none.

    `file_keys` are settings only a file can hold (distill's `[[stages]]` tables): each is parsed by its
    function and put in `file_values` instead.
    """
    path = values.pop("config", None)
    if not path:
        return values
    by_name = {p.name: p for p in ctx.command.params}
    by_key = {p.key: p for p in params}
    data = read_config_file(path, command)
    if file_keys:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))  # tables of tables are not options
        if isinstance(raw.get(command), dict):
            raw = {**raw, **raw[command]}
        for key, parse in file_keys.items():
            if key in raw:
                data.pop(key, None)
                (file_values if file_values is not None else {})[key] = parse(raw[key], str(path))
    for key, value in data.items():
        name, old = config_key(key, params, path)
        if old is not None:
            from sdcompress.cli._output import note

            note(f"config key {old!r} is deprecated; write {by_key[name].flag.name.lstrip('-')!r}.")
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE":  # by name: typer vendors its own click
            continue
        if by_key[name].repeatable and isinstance(value, str):
            value = [value]  # `teacher = "A"` in a file means one value, not one per character
        try:
            converted = by_name[name].process_value(ctx, value)
        except Exception as exc:  # the parameter's own conversion error, whichever click raised it
            message = getattr(exc, "message", str(exc))
            raise SdcError(f"config file {path}: option {key!r} has a bad value ({message}).") from exc
        values[name] = _as_path(by_key[name].annotation, converted)
    return values


# ---------------------------------------------------------------------------- building the dataclasses


class Parsed:
    """The command's dataclasses, built from the options: `parsed[TrainConfig]`."""

    def __init__(self, built: dict[type, Any], file: dict[str, Any] | None = None) -> None:
        self._built = built
        self.file = file or {}  # the command's file-only settings (`TrainingCommand.file_keys`)

    def __getitem__(self, cls: type[T]) -> T:
        return self._built[cls]


def _value(param: _Param, value: Any) -> Any:
    if param.flag.negate:
        return not value
    if isinstance(value, list):
        return tuple(value)
    return value


def build_sections(sections: Sequence[type], params: Sequence[_Param], values: Mapping[str, Any]) -> Parsed:
    """Each section dataclass from its fields' option values (nested dataclasses too)."""
    built = {}
    for section in sections:
        nested: dict[tuple[str, ...], dict[str, Any]] = {(): {}}
        for p in params:
            if p.section is not section or p.hidden_alias_of is not None:
                continue
            value = values[p.key]
            if value is None and p.repeatable:
                continue  # not given: the dataclass default (e.g. validation seed 0)
            nested.setdefault(p.path[:-1], {})[p.path[-1]] = _value(p, value)
        built[section] = _construct(section, nested, ())
    return Parsed(built)


def _construct(cls: type, nested: dict[tuple[str, ...], dict[str, Any]], prefix: tuple[str, ...]) -> Any:
    kwargs = dict(nested.get(prefix, {}))
    for f in fields(cls):
        if flag_of(f) is None and is_dataclass(f.default):
            kwargs[f.name] = _construct(type(f.default), nested, (*prefix, f.name))
    return cls(**kwargs)


# ---------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class TrainingCommand:
    """A command as data: its sections, help panels, overrides, required flags and what it runs."""

    name: str  # the TOML table of its options
    sections: tuple[type, ...]
    panels: tuple[str | None, ...]
    run: Callable[[Parsed], None]
    doc: str
    required: tuple[str, ...] = ()  # option keys
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    helps: Mapping[str, str] = dataclasses.field(default_factory=dict)
    file_keys: Mapping[str, Callable[[Any, str], Any]] = dataclasses.field(default_factory=dict)
    only: Mapping[type, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # see `build_params`
    arguments: Mapping[str, str] = dataclasses.field(default_factory=dict)  # option key -> argument name
    config_panel: str | None = RUN  # the help panel of --config


def training_command(spec: TrainingCommand) -> Callable[..., None]:
    """A function Typer can register: its signature lists every option; calling it runs `spec.run`."""
    params = build_params(spec.sections, spec.panels, spec.defaults, spec.helps, spec.only, spec.arguments)
    by_key = {p.key: p for p in params}

    def command(ctx: typer.Context, **values: Any) -> None:
        file_values: dict[str, Any] = {}
        values = merge_config_file(ctx, values, params, spec.name, spec.file_keys, file_values)
        for p in params:
            if p.hidden_alias_of is not None:
                real = by_key[p.hidden_alias_of]
                values[real.key] = renamed(
                    values[real.key],
                    values.pop(p.key),
                    new=real.flag.name,
                    old=p.flag.aliases[0],
                    default=real.default,
                )
        for key in spec.required:
            if values.get(key) in (None, ""):
                raise SdcError(
                    f"{by_key[key].flag.name} is required; give it on the command line or in the --config file."
                )
        parsed = build_sections(spec.sections, params, values)
        parsed.file = file_values
        spec.run(parsed)

    config = inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Path | None, typer.Option("--config", help=CONFIG_HELP, rich_help_panel=spec.config_panel)
        ],
    )
    parameters = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    parameters += [p.typer_parameter() for p in params] + [config]
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = spec.doc
    command.__name__ = command.__qualname__ = spec.name.replace("-", "_")
    return command


# ---------------------------------------------------------------------------- progress


class TrainingProgress:
    """A rich progress bar on stderr fed by the engine's events: step, loss terms, lr, it/s."""

    def __init__(self, console, *, disable: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[terms]}"),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=disable,
        )
        self.task_id = None
        self.disable = disable

    def __enter__(self) -> TrainingProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: ProgressEvent) -> None:
        if self.task_id is None:
            self.task_id = self.progress.add_task("training", total=event.max_steps, terms="", speed="")
            self.progress.update(self.task_id, completed=event.step)
        if event.kind == "step":
            terms = " ".join(f"{k}={v:.4g}" for k, v in event.losses.items())
            self.progress.update(
                self.task_id,
                completed=event.step,
                terms=f"{terms} lr={event.lr:.2e}",
                speed=f"{event.it_per_s:.2f} it/s",
            )
        elif event.kind == "start" and event.message:
            self.progress.console.print(f"[dim]{event.message}[/dim]")
        elif event.kind == "eval" and not self.disable:
            self.progress.console.print(f"[dim]teacher agreement at step {event.step}: {event.message}[/dim]")
        elif event.kind in ("checkpoint", "validation", "interrupted") and not self.disable:
            self.progress.console.print(f"[dim]{event.kind} at step {event.step}: {event.path}[/dim]")


def report(result, as_json: bool) -> None:
    """Loss table (or JSON), data notes, and exit 130 after an interrupted run (finetune, lora train)."""
    from sdcompress.cli._output import emit_json, note

    if as_json:
        emit_json(result.__dict__)
    else:
        loss_table(result)
    if result.interrupted:
        note(
            f"stopped at step {result.steps}; checkpoint {result.last_checkpoint}; rerun with --resume latest"
        )
        raise typer.Exit(130)


def loss_table(result) -> None:
    """First and last value of each loss term, and what the data scan skipped."""
    from sdcompress.cli._output import note, table

    rows = [
        (k, f"{result.first_losses.get(k, float('nan')):.4g}", f"{v:.4g}")
        for k, v in result.last_losses.items()
    ]
    table("loss terms", ["term", "first step", "last step"], rows, right=["first step", "last step"])
    if result.data.get("unreadable") or result.data.get("missing_captions"):
        note(
            f"data: {result.data['images']} images used, {result.data['unreadable']} unreadable skipped, "
            f"{result.data['missing_captions']} without caption (trained with an empty caption)"
        )
