"""Option values from config files, and the order in which they apply.

Every command takes ``--config FILE`` (YAML, TOML or JSON). A value is taken
from the first of these that sets it:

1. the command line;
2. the ``--config`` file: the section named after the command (for example a
   ``[finetune]`` table or a ``finetune:`` mapping), then the file's top level;
3. with ``--resume``, the ``config.yaml`` saved in the run folder being
   resumed;
4. the option's default.

Keys are option names with ``-`` or ``_`` (``kl-weight`` or ``kl_weight``).
``klseg data synth`` reads a ``synth:`` section, or a ``synth:`` mapping
inside a ``data:`` mapping (a ``data:`` mapping is the section of the ``klseg
data`` commands; a ``data:`` string is the ``--data`` option).

The rules, all checked before a command does any work; a broken rule is
exit 2 with a message that names the file, the section (or "top level"), the
key and the value:

- A key that is no option of any klseg command is an error (a typo should not
  pass silently). At the top level, a key that belongs to another command is
  ignored, so one file can hold the settings of several commands. Inside a
  command's section, a key that belongs only to other commands is an error
  that names the commands which take it. A ``config`` key is refused (a
  file cannot name another one).
- Each value has the type of its option, with no conversion between types:
  an integer option takes an integer (not ``1.5``, not ``true``, not the
  string ``"8"``); a number option takes an integer or a float (``2`` reads as
  ``2.0``) that is finite (not ``nan``, ``.inf``, ``Infinity``); a flag takes
  ``true`` or ``false``; a path, a name or a choice takes a string (a number
  or a date where a path belongs is refused: quote it), and a choice must be
  one of the listed strings; list options (``kl_weight``, ``class_names``)
  take a list of numbers or strings, or one number or string; the sizes
  (``image_size``, ``crop_size``, ``tile_size``) take ``"HxW"``, an integer
  or a list ``[H, W]`` of integers. The same
  range checks as on the command line apply.
- ``null`` (YAML ``null`` or ``~``, JSON ``null``) means "not set here": the
  next layer applies (the file's top level under a section, then the saved
  run config, then the default). TOML has no null.
- The top level and every section are mappings with string keys; a key given
  twice (also as ``batch-size`` and ``batch_size``) is an error. An empty
  file sets nothing. A file that cannot be read, is not UTF-8 text or is not
  valid for its format is an error that names it.
- A config file is a regular file (not a folder, a device such as
  ``/dev/zero`` or a pipe) of at most ``MAX_CONFIG_BYTES`` (1 MiB), checked
  before it is read. YAML aliases may expand to at most ``MAX_YAML_NODES``
  nodes in all (100,000; each alias counts the nodes it stands for, so a
  "billion laughs" stops at once).
- YAML numbers follow YAML 1.2: ``1e-3`` is a float (YAML 1.1, which PyYAML
  implements, reads it as a string).
- The ``config.yaml`` saved in a resumed run goes through the same type
  checks, naming that file. Keys there that the command does not take are
  ignored (a run saves fields that are no options).

Reading one file (size, format, YAML aliases) is
:mod:`klseg.cli.config_reading`. This module imports only the standard
library and click at module level; YAML and TOML readers load on first use.
"""

import math

import click
from click.core import ParameterSource

from .config_reading import MAX_CONFIG_BYTES, MAX_YAML_NODES, read_config_file
from .config_reading import kind_of as _kind
from .types import FloatList, ImageSize, MixedPrecision, NameList

__all__ = [
    "read_config_file",
    "resolve_options",
    "EXPLICIT_SOURCES",
    "MAX_CONFIG_BYTES",
    "MAX_YAML_NODES",
]

#: Parameter sources that count as "given on the command line".
EXPLICIT_SOURCES = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)

#: Options that only steer how a command is invoked; never read from files.
_NOT_FROM_FILES = frozenset({"config", "help"})

#: Options a resumed run never takes from the saved config of the run.
_NOT_FROM_SAVED = frozenset({"config", "help", "resume", "overwrite", "quiet"})


# --------------------------------------------------------------------------
# Which keys a command takes
# --------------------------------------------------------------------------


def _key(name):
    return name.replace("-", "_")


def _option_keys(command):
    """``{key: param}``: the param names and long option names a file may use."""
    keys = {}
    for param in getattr(command, "params", ()):
        if not isinstance(param, click.Option) or param.name in _NOT_FROM_FILES:
            continue
        keys[_key(param.name)] = param
        for opt in param.opts:
            if opt.startswith("--"):
                keys[_key(opt[2:])] = param
    return keys


def _display_key(param):
    long = [opt[2:] for opt in param.opts if opt.startswith("--")]
    return long[0] if long else param.name.replace("_", "-")


def _command_tree(ctx):
    """``{path: command}`` for every command below the root (``"data synth"``)."""
    found = {}
    root = ctx.find_root()

    def walk(command, prefix):
        # list_commands/get_command, not .commands: the commands load lazily.
        if not isinstance(command, click.Group):
            return
        for name in command.list_commands(root):
            sub = command.get_command(root, name)
            path = f"{prefix} {name}".strip()
            found[path] = sub
            walk(sub, path)

    walk(root.command, "")
    return found


def _command_path(ctx):
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(reversed(names))


class _Location:
    """Where a value sits: file, section and key, for error messages."""

    def __init__(self, path, where, key=None):
        self.path, self.where, self.key = path, where, key

    def at(self, key):
        return _Location(self.path, self.where, key)

    def __str__(self):
        text = f"{self.path}, {self.where}"
        return f"{text}, key {self.key!r}" if self.key is not None else text


def _show(value):
    """A value as a config file writes it, shortened for messages."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, (str, int, float, list, dict)):
        text = repr(value)
    else:  # dates and times from YAML or TOML
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sections(raw, tree, path):
    """Split a file's top level into plain keys and command sections.

    Returns:
        ``(top, sections)``: the top-level items that are no section, and
        ``{command path: [(location, mapping), ...]}``.
    """
    by_name = {}
    for command_path in tree:
        by_name.setdefault(command_path.split()[-1], []).append(command_path)
    all_options = set()
    for command in tree.values():
        all_options.update(_option_keys(command))
    top, sections = [], {}
    for key, value in raw.items():
        where = _Location(path, "top level", key)
        if not isinstance(key, str):
            _bad_file(f"{where}: a key must be a string (an option or command name).")
        name = _key(key)
        if name in by_name and isinstance(value, dict):
            for command_path in by_name[name]:
                section = _Location(path, f"section {key!r}")
                sections.setdefault(command_path, []).append((section, value))
                _subsections(tree, command_path, key, section, value, sections)
        elif name in by_name and name not in all_options:
            _bad_file(
                f"{where}: {_show(value)} is {_kind(value)}; the section of "
                f"'klseg {by_name[name][0]}' must be a mapping of option names "
                "to values."
            )
        else:
            top.append((key, value))
    return top, sections


def _subsections(tree, command_path, outer, section, mapping, sections):
    """A group's section (``data:``) holds its commands' sections (``synth:``)."""
    prefix = command_path + " "
    children = {p[len(prefix) :]: p for p in tree if p.startswith(prefix)}
    children = {name: p for name, p in children.items() if " " not in name}
    if not children:
        return
    for key, value in mapping.items():
        name = _key(key) if isinstance(key, str) else None
        if name in children and isinstance(value, dict):
            inner = _Location(section.path, f"section '{outer}.{key}'")
            sections.setdefault(children[name], []).append((inner, value))
            continue
        listed = ", ".join(sorted(children))
        _bad_file(
            f"{section.at(key)}: the section of 'klseg {command_path}' holds only "
            f"the sections of its commands ({listed}), each a mapping; "
            f"{_show(value)} is {_kind(value)}. (An option '{outer}' takes a "
            "string, not a mapping.)"
        )


def _bad_file(message, param_hint="'--config'"):
    raise click.BadParameter(message, param_hint=param_hint)


# --------------------------------------------------------------------------
# Checking values
# --------------------------------------------------------------------------


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parses_as(text, number_class):
    try:
        return math.isfinite(number_class(text))
    except (TypeError, ValueError):
        return False


def _type_problem(param, value):
    """Why ``value`` from a file does not fit ``param``'s type, or ``None``."""
    kind = _kind(value)
    shown = _show(value)
    ptype = param.type
    if isinstance(ptype, FloatList):
        items = value if isinstance(value, list) else [value]
        if items and all(_is_number(v) for v in items):
            return None
        return f"{shown} is not a number or a list of numbers ({kind})."
    if isinstance(ptype, NameList):
        items = value if isinstance(value, list) else [value]
        if items and all(isinstance(v, str) for v in items):
            return None
        return f"{shown} is not a list of names ({kind}); quote each name."
    if isinstance(ptype, ImageSize):
        if isinstance(value, str) or (
            isinstance(value, int) and not isinstance(value, bool)
        ):
            return None
        if isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return None
        return f"{shown} is not {ptype.a_noun}: HxW, an integer or [H, W] ({kind})."
    if isinstance(ptype, MixedPrecision):
        if isinstance(value, (str, bool)):
            return None
        return f"{shown} is not one of {_choices(ptype)}, true or false ({kind})."
    if isinstance(ptype, click.types.BoolParamType):
        if isinstance(value, bool):
            return None
        return f"{shown} is not true or false ({kind})."
    if isinstance(ptype, click.types.IntParamType):
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        hint = ""
        if isinstance(value, str) and _parses_as(value, int):
            hint = f"; write {value.strip()} without quotes"
        return f"{shown} is not a valid integer ({kind}{hint})."
    if isinstance(ptype, click.types.FloatParamType):
        if _is_number(value):
            return None
        hint = ""
        if isinstance(value, str) and _parses_as(value, float):
            hint = "; write the number without quotes"
        return f"{shown} is not a valid number ({kind}{hint})."
    if isinstance(ptype, click.Choice):
        if isinstance(value, str):
            return None
        return f"{shown} is not one of {_choices(ptype)} ({kind})."
    if isinstance(value, str):
        return None
    hint = "; write it in quotes" if not isinstance(value, (list, dict)) else ""
    return f"{shown} is not a string ({kind}{hint})."


def _choices(ptype):
    return ", ".join(repr(c) for c in ptype.choices)


def _check_value(ctx, param, value, location):
    """Convert one value from a file, or exit 2 naming where it came from."""
    problem = _type_problem(param, value)
    if problem is None:
        try:
            return param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            problem = e.message
        except Exception as e:  # a type that did not expect this value
            problem = f"{_show(value)} is not valid here ({e})."
    raise click.BadParameter(f"{location}: {problem}", ctx=ctx, param=param)


def _file_values(ctx, path):
    """Values for ``ctx.command`` from a config file, keyed by param name.

    Returns:
        ``{param name: (value, origin)}`` with converted values.
    """
    raw = read_config_file(path)
    tree = _command_tree(ctx)
    me = _command_path(ctx)
    own = _option_keys(ctx.command)
    owners = {}
    for command_path, command in tree.items():
        for name in _option_keys(command):
            owners.setdefault(name, []).append(command_path)
    top, sections = _sections(raw, tree, path)
    layers = [(_Location(path, "top level"), top)]
    layers += [(where, list(m.items())) for where, m in sections.get(me, [])]
    values = {}
    for where, items in layers:
        seen = {}
        for key, value in items:
            location = where.at(key)
            if not isinstance(key, str):
                _bad_file(f"{location}: a key must be a string (an option name).")
            name = _key(key)
            if name in own:
                param = own[name]
                if param.name in seen:
                    _bad_file(
                        f"{location}: the same option as key "
                        f"{seen[param.name]!r} there; give it once."
                    )
                seen[param.name] = key
                if value is None:
                    continue  # null: not set here
                converted = _check_value(ctx, param, value, location)
                values[param.name] = (converted, f"{path} ({where.where})")
            elif name == "config":
                _bad_file(f"{location}: a config file cannot name another one.")
            elif name in owners:
                if where.where == "top level":
                    continue  # another command's option: one file, many commands
                takers = ", ".join(f"'klseg {c}'" for c in owners[name])
                _bad_file(
                    f"{location}: '{key}' is no option of 'klseg {me}'; it is an "
                    f"option of {takers}. Move it to that command's section or "
                    "to the top level."
                )
            else:
                valid = ", ".join(sorted({_display_key(p) for p in own.values()}))
                _bad_file(
                    f"unknown key {key!r} in {where.where} of {path}. "
                    f"Valid keys for '{me}': {valid}."
                )
    return values


def _saved_values(ctx, path):
    """Values for ``ctx.command`` from a resumed run's saved ``config.yaml``."""
    raw = read_config_file(path, param_hint="'--resume'")
    own = _option_keys(ctx.command)
    where = _Location(path, "top level")
    values = {}
    for key, value in raw.items():
        param = own.get(_key(key)) if isinstance(key, str) else None
        if param is None or param.name in _NOT_FROM_SAVED or value is None:
            continue  # a run saves fields that are no options
        converted = _check_value(ctx, param, value, where.at(key))
        values[param.name] = (converted, str(path))
    return values


def resolve_options(ctx, *, saved_config_for=None):
    """Merge command line, config file, saved run config and defaults.

    Args:
        ctx: the command's click context (after parsing).
        saved_config_for: a callable ``values -> path or None``; called with
            the values merged so far (command line over file over defaults),
            it names a saved ``config.yaml`` to use as the layer under the
            config file (the run being resumed), or returns ``None``.

    Returns:
        ``(values, origins)``: the resolved values keyed by parameter name,
        and where each came from (``"command line"``, a file, or
        ``"default"``).

    Raises:
        click.BadParameter: a config file breaks one of the rules in this
            module's docstring (exit 2).
    """
    params = {p.name: p for p in ctx.command.params}
    explicit = {
        name: value
        for name, value in ctx.params.items()
        if ctx.get_parameter_source(name) in EXPLICIT_SOURCES
    }
    config_path = ctx.params.get("config")
    from_file = _file_values(ctx, config_path) if config_path else {}

    def merged(saved):
        values, origins = {}, {}
        for name in params:
            if name in explicit:
                values[name], origins[name] = explicit[name], "command line"
            elif name in from_file:
                values[name], origins[name] = from_file[name]
            elif name in saved:
                values[name], origins[name] = saved[name]
            else:
                values[name], origins[name] = ctx.params.get(name), "default"
        return values, origins

    values, origins = merged({})
    if saved_config_for is not None:
        saved_path = saved_config_for(values)
        if saved_path is not None:
            values, origins = merged(_saved_values(ctx, saved_path))
    ctx.meta["klseg.values"] = values
    return values, origins
