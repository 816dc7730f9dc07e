"""
Settings for every program here (train.py, sample.py, prepare.py, bench.py, edit_experiment.py), nanoGPT style.

A program writes its settings as plain module-level assignments with a comment each, in one block; that block
is the documentation. Then:

    settings = configurator.configure(globals(), nullable={"d_ff": int})   # reads sys.argv

An argument is a config file (`config/x.py`: Python assignments, run in order) or `--key=value` (a Python
literal; a text key takes the text as it is). Later ones win. An unknown key or a wrong type is a one-line
ConfigError naming the valid keys; `--help` prints every key with its default and its comment.
"""

import ast
import os
import re
import sys
from types import SimpleNamespace

PLAIN = (int, float, bool, str, type(None))


class ConfigError(ValueError):
    """A bad setting or input. main() wrappers print it as one line, with no traceback."""


def defaults_of(namespace):
    """Every plain value (number, bool, text, None) named without a leading underscore: the settings block."""
    return {k: v for k, v in namespace.items() if not k.startswith("_") and type(v) in PLAIN}


def _type_name(expected, nullable):
    name = {bool: "True or False", int: "an int", float: "a number", str: "text", list: "a list"}[expected]
    return name + " or None" if nullable else name


def check_value(key, value, defaults, nullable, shown):
    """value as the setting's type (an int is fine for a float), or ConfigError naming what was expected."""
    expected = nullable.get(key, type(defaults[key]))
    if value is None and (key in nullable or defaults[key] is None):
        return None
    if expected is float and type(value) is int:
        return float(value)
    if expected is list and type(value) is tuple:
        value = list(value)
    if type(value) is not expected:  # type(), not isinstance(): True is not an int here
        raise ConfigError(f"{shown}: {key} must be {_type_name(expected, key in nullable)}, got {value!r}")
    return value


def parse_value(key, text, expected):
    if expected is str:
        return text  # text keys take the text as it is
    if expected is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # not a literal: check_value says what was expected


def read_config_file(path, current):
    """Run a config file (plain assignments; it may read the settings so far) and return what it assigned."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        tree = ast.parse(source, path)
        scope = dict(current)
        exec(compile(tree, path, "exec"), {"__builtins__": __builtins__}, scope)
    except Exception as e:
        raise ConfigError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    # every top-level assignment counts, even one that repeats the default
    assigned = [t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)]
    return {k: scope[k] for k in dict.fromkeys(assigned) if not k.startswith("_")}


def parse(argv, defaults, nullable=None, prog="", doc="", repeatable=(), choices=None):
    """Returns (settings dict, set of keys given explicitly). Keys in `repeatable` collect every --key=value
    into a list; choices {key: allowed values}. Raises ConfigError for anything it cannot use; --help prints
    the keys and exits."""
    nullable = nullable or {}
    settings, explicit = dict(defaults), set()
    valid = "valid keys: " + ", ".join(defaults)
    for key in repeatable:
        settings[key] = []
    for arg in argv:
        if arg in ("-h", "--help"):
            print_help(prog, doc, defaults)
            sys.exit(0)
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if key not in defaults:
                raise ConfigError(f"unknown key {arg.split('=')[0]}; {valid}")
            if not eq:
                raise ConfigError(f"{arg}: give a value as --{key}=VALUE")
            value = check_value(key, parse_value(key, text, nullable.get(key, type(defaults[key]))),
                                defaults, nullable, arg)
            if key in repeatable:
                settings[key].append(value)
            else:
                settings[key] = value
            explicit.add(key)
        elif arg.endswith(".py") and "=" not in arg:
            for key, value in read_config_file(arg, settings).items():
                if key not in defaults:
                    raise ConfigError(f"{arg} sets unknown key {key}; {valid}")
                settings[key] = check_value(key, value, defaults, nullable, f"{arg}: {key}={value!r}")
                explicit.add(key)
        else:
            raise ConfigError(f"cannot use argument {arg!r}: give config/*.py files and --key=value settings "
                              f"(see {os.path.basename(prog)} --help)")
    for key, allowed in (choices or {}).items():
        if settings[key] not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}, got {settings[key]!r}")
    return settings, explicit


def configure(namespace, argv=None, nullable=None, repeatable=(), choices=None):
    """The settings of the program whose globals() are `namespace`, as a SimpleNamespace."""
    settings, _ = parse(sys.argv[1:] if argv is None else argv, defaults_of(namespace), nullable,
                        namespace["__file__"], namespace.get("__doc__") or "", repeatable, choices)
    return SimpleNamespace(**settings)


def check_device(name):
    """A device setting this machine can use, or a ConfigError that says what to write instead."""
    import torch  # here, so that programs without torch (prepare.py) do not pay for its import
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported: use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use --device=cpu")


def print_help(prog, doc, defaults):
    """The program's docstring, then every key with its default and the comment beside it in the source."""
    print(doc.strip() + "\n\nkeys (--key=value), with their defaults:")
    comments = {}
    with open(prog) as f:
        for line in f:
            m = re.match(r"^(\w+) = .*?(?:\s+#\s*(.*))?$", line.rstrip())
            if m and m.group(1) in defaults:
                comments[m.group(1)] = m.group(2) or ""
    for key, value in defaults.items():
        print(f"  {f'--{key}={value!r}':<36} {comments.get(key, '')}".rstrip())


def run_main(main, prog):
    """Call main(); a ValueError (ConfigError, a model's own checks) becomes one line on stderr and exit 1."""
    try:
        main()
    except ValueError as e:
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every rank fails alike: say it once
            print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # output piped into a reader that stopped early (`--help | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        sys.exit(0)
