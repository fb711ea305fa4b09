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
A key that is no option of any klseg command is an error (a typo should not
pass silently); a key that belongs to another command is ignored, so one file
can hold the settings of several commands.

This module imports only the standard library and click at module level; YAML
and TOML readers load on first use.
"""

import json
from pathlib import Path

import click
from click.core import ParameterSource

__all__ = ["read_config_file", "resolve_options", "EXPLICIT_SOURCES"]

#: Parameter sources that count as "given on the command line".
EXPLICIT_SOURCES = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)

#: Options that only steer how a command is invoked; never read from files.
_NOT_FROM_FILES = frozenset({"config", "help"})

#: Options a resumed run never takes from the saved config of the run.
_NOT_FROM_SAVED = frozenset({"config", "help", "resume", "overwrite", "quiet"})


def read_config_file(path):
    """Read a YAML, TOML or JSON file into a dict.

    Args:
        path: file path; the format follows the suffix (``.yaml``/``.yml``,
            ``.toml``, ``.json``).

    Returns:
        The mapping at the file's top level.

    Raises:
        click.BadParameter: the file is missing, unreadable, not valid for its
            format, or its top level is not a mapping.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise click.BadParameter(
            f"cannot read config file {path}: {e.strerror or e}",
            param_hint="'--config'",
        ) from None
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = _load_toml(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise click.BadParameter(
                f"config file {path} must end in .yaml, .yml, .toml or .json.",
                param_hint="'--config'",
            )
    except click.BadParameter:
        raise
    except Exception as e:  # parser errors differ per format
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise click.BadParameter(
            f"config file {path} is not valid {suffix[1:].upper()}: {first_line}",
            param_hint="'--config'",
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise click.BadParameter(
            f"config file {path} must hold a mapping of option names to values; "
            f"found a {type(data).__name__}.",
            param_hint="'--config'",
        )
    return data


def _load_toml(text):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise click.BadParameter(
                "reading TOML on Python 3.10 needs the 'tomli' package "
                "(pip install tomli), or use a YAML config file.",
                param_hint="'--config'",
            ) from None
    return tomllib.loads(text)


def _key(name):
    return str(name).replace("-", "_")


def _all_option_names(ctx):
    """Option names of every command in the ``klseg`` tree (for typo checks)."""
    names = set()
    root = ctx.find_root().command

    def walk(command):
        for param in getattr(command, "params", ()):
            names.add(param.name)
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(root)
    return names


def _section_names(ctx):
    names = set()
    root = ctx.find_root().command

    def walk(command):
        for name, sub in getattr(command, "commands", {}).items():
            names.add(name)
            walk(sub)

    walk(root)
    return names


def _file_values(ctx, path):
    """Values for ``ctx.command`` from a config file, keyed by param name."""
    raw = read_config_file(path)
    own = {p.name for p in ctx.command.params} - _NOT_FROM_FILES
    known = _all_option_names(ctx)
    sections = _section_names(ctx)
    values = {}
    # A mapping under a command's name is that command's section; other
    # values under such a name (``data: DIR``) are plain options.
    top = {
        k: v
        for k, v in raw.items()
        if not (_key(k) in sections and isinstance(v, dict))
    }
    layers = [("top level", top)]
    section = raw.get(ctx.info_name)
    if isinstance(section, dict):
        layers.append((f"section '{ctx.info_name}'", section))
    for where, layer in layers:
        for key, value in layer.items():
            name = _key(key)
            if name in own:
                values[name] = (value, f"{path} ({where})")
            elif name in known or name in sections:
                continue  # another command's option or section
            else:
                valid = ", ".join(sorted(n.replace("_", "-") for n in own))
                raise click.BadParameter(
                    f"unknown key '{key}' in {where} of {path}. "
                    f"Valid keys for '{ctx.info_name}': {valid}.",
                    param_hint="'--config'",
                )
    return values


def _convert(ctx, param, value, origin):
    if value is None:
        return None
    try:
        return param.type_cast_value(ctx, value)
    except click.BadParameter as e:
        raise click.BadParameter(
            f"{e.message} (value from {origin})", ctx=ctx, param=param
        ) from None


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
        for name, param in params.items():
            if name in explicit:
                values[name], origins[name] = explicit[name], "command line"
            elif name in from_file:
                raw, origin = from_file[name]
                values[name] = _convert(ctx, param, raw, origin)
                origins[name] = origin
            elif name in saved:
                raw, origin = saved[name]
                values[name] = _convert(ctx, param, raw, origin)
                origins[name] = origin
            else:
                values[name], origins[name] = ctx.params.get(name), "default"
        return values, origins

    values, origins = merged({})
    if saved_config_for is not None:
        saved_path = saved_config_for(values)
        if saved_path is not None:
            raw = read_config_file(saved_path)
            saved = {
                _key(k): (v, str(saved_path))
                for k, v in raw.items()
                if _key(k) in params and _key(k) not in _NOT_FROM_SAVED
            }
            values, origins = merged(saved)
    ctx.meta["klseg.values"] = values
    return values, origins
