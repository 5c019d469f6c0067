"""Config files and --key=value overrides for the stage scripts, nanoGPT style.

A stage script declares its config as plain module globals, then calls `config = configure(globals())`:

    python pretrain.py config/tiny.py --batch_size=8 --lr=1e-3 --compile=true

Arguments apply left to right, later ones win: a bare one is a Python file executed on top of the globals,
--key=value sets one global. The keys are the globals of type int, float, bool, str, None, tuple or list,
except _private names and UPPER_CASE constants; configure() returns them as a dict (common.setup saves it as
config.json). It fixes nanoGPT's known faults: an int is fine for a float (--lr=1); a None default takes a
Python literal or else the text; values may contain '='; booleans parse from true/false, 1/0, yes/no, on/off
(bool("False") is True); an unknown key, a typo, stops the program naming the closest known keys.
"""
import ast
import difflib
import os
import sys

CONFIG_TYPES = (int, float, bool, str, type(None), tuple, list)
BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def config_keys(g):
    """The names in a globals dict that are config keys (UPPER_CASE names are constants like IGNORE_INDEX)."""
    return [k for k, v in g.items() if isinstance(v, CONFIG_TYPES) and not k.startswith("_") and not k.isupper()]


def _unknown(key, keys, where):
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known keys: {', '.join(sorted(keys))}"
    sys.exit(f"config error: unknown key '{key}' {where}; {hint}")


def _coerce(key, value, default, where):
    """Check a Python value against its default's type: ints pass for floats, lists for tuples and back."""
    if default is None:
        return value
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        value = type(default)(value)
    if not isinstance(value, type(default)) or isinstance(value, bool) != isinstance(default, bool):
        sys.exit(f"config error: {key} {where} must be {type(default).__name__} like its default "
                 f"{default!r}, got {value!r}")
    return value


def _parse(key, text, default):
    """Turn the text of --key=text into a value of the default's type."""
    if isinstance(default, bool):
        if text.lower() not in BOOLEANS:
            sys.exit(f"config error: --{key} must be true or false, got {text!r}")
        return BOOLEANS[text.lower()]
    if isinstance(default, str):
        return text  # verbatim: no quotes needed, '=' and spaces are fine
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if default is None:
            return text  # a None default takes a bare word as a string (--init_from=out/sft)
        sys.exit(f"config error: --{key}={text} is not a valid {type(default).__name__} (default {default!r})")
    return _coerce(key, value, default, "on the command line")


def configure(g, argv=None, verbose=True):
    """Apply argv (default sys.argv[1:]) to the globals dict g in place; return {key: value} of the config keys
    and print them (on rank 0, if verbose). Exits with a one-line message on any bad argument."""
    keys = config_keys(g)
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in keys:
                _unknown(key, keys, "on the command line")
            if not eq and not isinstance(g[key], bool):
                sys.exit(f"config error: --{key} needs a value: --{key}=...")
            g[key] = _parse(key, text if eq else "true", g[key])  # --flag alone means --flag=true
            continue
        if not os.path.isfile(arg):
            sys.exit(f"config error: config file {arg} not found (options are written --key=value)")
        # The file runs where it sees the current values (batch_size = 2 * batch_size); only the keys it
        # assigned are copied back.
        ns = {k: g[k] for k in keys}
        before = dict(ns)
        with open(arg) as f:
            exec(compile(f.read(), arg, "exec"), ns)
        for k, v in ns.items():
            if k.startswith("_") or not isinstance(v, CONFIG_TYPES):
                continue  # private helpers, __builtins__, imported modules, functions
            if k not in keys:
                _unknown(k, keys, f"in {arg}")
            if v is not before[k]:
                g[k] = _coerce(k, v, g[k], f"in {arg}")
    config = {k: g[k] for k in keys}
    if verbose and int(os.environ.get("RANK", "0")) == 0:
        width = max(map(len, config), default=0)
        print("config:\n" + "\n".join(f"  {k:<{width}} = {v!r}" for k, v in config.items()), flush=True)
    return config
