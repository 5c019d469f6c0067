"""Config files and --key=value overrides for the stage scripts, nanoGPT style.

A stage script declares its config as plain module globals, then calls

    config = configure(globals())

which reads sys.argv left to right: a bare argument is a Python config file executed on top of the
globals (config/tiny.py), an argument --key=value overrides one global. Later arguments win:

    python pretrain.py config/tiny.py --batch_size=8 --lr=1e-3 --compile=true

The config keys are the globals defined before the call whose values are int, float, bool, str,
None, tuple or list, except names starting with '_' and UPPER_CASE constants. configure() returns them as a dict (what
common.setup saves as config.json) and prints them. It fixes nanoGPT's known faults:
  - an int is accepted where the default is a float (--lr=1 means 1.0);
  - a key whose default is None accepts any value (a Python literal, else the text as a string);
  - values may contain '=' (--prompt="a=b" sets prompt to "a=b");
  - booleans parse from true/false, 1/0, yes/no, on/off (bool("False") is True in Python);
  - an unknown key, on the command line or in a config file, stops the program with one line that
    names the closest known keys (a typo never silently trains with the default).
Names starting with '_' in a config file are private helpers and are not checked.
"""
import ast
import difflib
import os
import sys

CONFIG_TYPES = (int, float, bool, str, type(None), tuple, list)
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def config_keys(g):
    """The names in a globals dict that are config keys (see the module docstring)."""
    return [k for k, v in g.items() if not k.startswith("_") and isinstance(v, CONFIG_TYPES)
            and not k.isupper()]  # UPPER_CASE names are constants (IGNORE_INDEX), not config


def _unknown(key, keys, where):
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known keys: {', '.join(sorted(keys))}"
    sys.exit(f"config error: unknown key '{key}' {where}; {hint}")


def _coerce(key, value, default, where):
    """Check a Python value against the default's type; ints are fine for floats."""
    if default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list))
        value = type(default)(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        sys.exit(f"config error: {key} {where} must be {type(default).__name__} like its default "
                 f"{default!r}, got {value!r}")
    return value


def _parse(key, text, default):
    """Turn the text of --key=text into a value of the default's type."""
    where = "on the command line"
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        sys.exit(f"config error: --{key} must be true or false, got {text!r}")
    if isinstance(default, str):
        return text  # taken verbatim: no quotes needed, '=' and spaces are fine
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if default is None:
            return text  # a None default takes a bare word as a string (--init_from=out/sft)
        sys.exit(f"config error: --{key}={text} is not a valid {type(default).__name__} (default {default!r})")
    return _coerce(key, value, default, where)


def configure(g, argv=None, verbose=True):
    """Apply config files and --key=value overrides from argv (default sys.argv[1:]) to the globals
    dict g in place; return {key: value} of the config keys; print them unless verbose is False or
    this is not rank 0 of a torchrun job. Exits with a one-line message on any bad argument."""
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(g)
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                sys.exit(f"config error: config file {arg} not found (options are written --key=value)")
            # Run the file in a namespace that sees the current values (so a config may write
            # batch_size = 2 * batch_size), then copy back only the keys it assigned.
            ns = {k: g[k] for k in keys}
            before = dict(ns)
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), ns)
            for k, v in ns.items():
                if k.startswith("_") or k == "__builtins__" or not isinstance(v, CONFIG_TYPES):
                    continue  # helpers, imported modules, functions
                if k not in g or k not in keys:
                    _unknown(k, keys, f"in {arg}")
                if k not in before or v is not before[k]:
                    g[k] = _coerce(k, v, g[k], f"in {arg}")
        else:
            key, eq, text = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in keys:
                _unknown(key, keys, "on the command line")
            if not eq:  # --flag alone means --flag=true for booleans
                if not isinstance(g[key], bool):
                    sys.exit(f"config error: --{key} needs a value: --{key}=...")
                text = "true"
            g[key] = _parse(key, text, g[key])
    config = {k: g[k] for k in keys}
    if verbose and int(os.environ.get("RANK", "0")) == 0:
        width = max(map(len, config), default=0)
        print("config:\n" + "\n".join(f"  {k:<{width}} = {v!r}" for k, v in config.items()), flush=True)
    return config
