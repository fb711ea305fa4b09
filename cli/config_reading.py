"""Reading one config file (YAML, TOML or JSON) into a dict, within bounds.

The file must be a regular file (not a folder, a device such as
``/dev/zero`` or a pipe) of at most ``MAX_CONFIG_BYTES``, checked before it
is read; YAML aliases may expand to at most ``MAX_YAML_NODES`` nodes. What
the values may be is :mod:`klseg.cli.config_files`' business.

Standard library and click at module level; YAML and TOML readers load on
first use.
"""

from pathlib import Path

import click

__all__ = ["MAX_CONFIG_BYTES", "MAX_YAML_NODES", "kind_of", "read_config_file"]

#: The largest config file read (bytes); a larger one is refused unread.
MAX_CONFIG_BYTES = 1 << 20

#: The most nodes a YAML config file may hold once its aliases are expanded.
MAX_YAML_NODES = 100_000

#: What a value from a file is, in messages; ``bool`` before ``int`` (a
#: ``bool`` is an ``int`` in Python).
_KINDS = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "a list"),
    (dict, "a mapping"),
)


def kind_of(value):
    """What a value from a file is, in messages (``"an integer"``)."""
    for kind, text in _KINDS:
        if isinstance(value, kind):
            return text
    return f"a {type(value).__name__}"


_SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".json": "JSON"}


def read_config_file(path, *, param_hint="'--config'"):
    """Read a YAML, TOML or JSON file into a dict.

    Args:
        path: file path; the format follows the suffix (``.yaml``/``.yml``,
            ``.toml``, ``.json``).
        param_hint: the option named in error messages. Defaults to
            ``"'--config'"``.

    Returns:
        The mapping at the file's top level (empty for an empty file).

    Raises:
        click.BadParameter: the file is missing, a folder, not a regular
            file, larger than ``MAX_CONFIG_BYTES``, unreadable, not UTF-8
            text, not valid for its format, its YAML aliases expand past
            ``MAX_YAML_NODES`` nodes, or its top level is not a mapping.
            The message names the file.
    """
    path = Path(path)

    def fail(message):
        raise click.BadParameter(message, param_hint=param_hint)

    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        fail(f"config file {path} must end in .yaml, .yml, .toml or .json.")
    if path.is_dir():
        fail(f"config file {path} is a folder; give a {fmt} file.")
    data = _read_bounded(path, fail)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        fail(
            f"config file {path} is not UTF-8 text (byte 0x{data[e.start]:02x} "
            f"at offset {e.start})."
        )
    if not text.strip():
        return {}
    try:
        if fmt == "YAML":
            import yaml

            data = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader
            if data is None:  # only comments
                data = {}
        elif fmt == "TOML":
            data = _load_toml(text)
        else:
            import json

            data = json.loads(text, object_pairs_hook=_json_mapping)
    except click.BadParameter:
        raise
    except Exception as e:  # parser errors differ per format
        fail(f"config file {path} is not valid {fmt}: {_parser_message(e)}")
    if not isinstance(data, dict):
        found = "null" if data is None else kind_of(data)
        fail(
            f"config file {path} must hold a mapping of option names to values "
            f"at its top level; found {found}."
        )
    return data


def _read_bounded(path, fail):
    """The bytes of a regular file of at most ``MAX_CONFIG_BYTES``, checked
    before reading (a device such as ``/dev/zero`` would never end)."""
    import os
    import stat

    from klseg.paths import not_regular_file

    def irregular(kind):
        fail(f"config file {path} is not a regular file ({kind}); give a file.")

    kind = not_regular_file(path)
    if kind:
        irregular(kind)
    try:
        with open(path, "rb", opener=_open_no_block) as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):  # replaced since the check
                irregular("not a file")
            if info.st_size > MAX_CONFIG_BYTES:
                fail(
                    f"config file {path} has {info.st_size:,} bytes; a config "
                    f"file may have at most {MAX_CONFIG_BYTES:,} (1 MiB)."
                )
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        fail(f"cannot read config file {path}: {e.strerror or e}")
    if len(data) > MAX_CONFIG_BYTES:  # it grew while being read
        fail(f"config file {path} has more than {MAX_CONFIG_BYTES:,} bytes (1 MiB).")
    return data


def _open_no_block(path, flags):
    """``os.open`` that does not wait for a writer when ``path`` is a pipe."""
    import os

    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def _parser_message(error):
    problem = getattr(error, "problem", None)  # yaml.MarkedYAMLError
    mark = getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(error, RecursionError):
        return "nested too deeply."
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


class _DuplicateKey(ValueError):
    pass


def _json_mapping(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"key {key!r} is given twice in one object.")
        result[key] = value
    return result


_YAML_LOADER = None


def _yaml_loader():
    """PyYAML's SafeLoader, with YAML 1.2 floats, duplicate keys refused and
    the nodes its aliases expand to limited to ``MAX_YAML_NODES``."""
    global _YAML_LOADER
    if _YAML_LOADER is not None:
        return _YAML_LOADER
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def compose_document(self):
            node = super().compose_document()
            _check_expanded_size(node)
            return node

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        duplicate = key in seen
                    except TypeError:  # unhashable; the base class says so
                        continue
                    if duplicate:
                        raise yaml.constructor.ConstructorError(
                            None,
                            None,
                            f"key {key!r} is given twice in one mapping",
                            key_node.start_mark,
                        )
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    # YAML 1.2 reads 1e-3 as a float; PyYAML (YAML 1.1) needs a dot.
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    _YAML_LOADER = Loader
    return Loader


def _check_expanded_size(root):
    """Refuse a composed YAML document whose nodes, each alias expanded,
    number more than ``MAX_YAML_NODES``, or which holds itself.

    An alias is one node object reused; the expanded count of each node is
    counted once (memoised), so the check is linear in the file's size
    however far the aliases would expand.
    """
    import yaml

    sizes, open_nodes = {}, set()

    def refuse(node, problem):
        raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark)

    def size(node):
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            refuse(node, "an alias refers to a node that holds it (recursion)")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_YAML_NODES:
                refuse(
                    node,
                    f"its aliases expand to more than {MAX_YAML_NODES:,} nodes "
                    "(a config file holds a few hundred)",
                )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    if root is not None:
        size(root)
