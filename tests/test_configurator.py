"""configurator.configure: config files, --key=value overrides, and the nanoGPT faults it fixes."""
import pytest

from configurator import configure


def defaults():
    import math  # a module in the globals is not a config key
    return {"lr": 1e-3, "batch_size": 16, "compile": False, "init_from": None, "out_dir": "out/x",
            "betas": (0.9, 0.95), "prompts": ["a"], "math": math, "_private": 1, "IGNORE_INDEX": -100}


def run(argv, g=None):
    g = defaults() if g is None else g
    return configure(g, argv, verbose=False), g


def fails(argv, capsys=None):
    with pytest.raises(SystemExit) as e:
        run(argv)
    msg = str(e.value.code)
    assert e.value.code not in (0, None) and "\n" not in msg  # non-zero, one line
    return msg


def test_returns_only_config_keys_with_their_values():
    config, g = run([])
    assert config == {"lr": 1e-3, "batch_size": 16, "compile": False, "init_from": None, "out_dir": "out/x",
                      "betas": (0.9, 0.95), "prompts": ["a"]}


def test_int_accepted_for_float_and_stored_as_float():
    config, g = run(["--lr=1"])
    assert g["lr"] == 1.0 and isinstance(g["lr"], float) and config["lr"] == 1.0
    assert run(["--lr=3e-4"])[1]["lr"] == 3e-4


def test_none_default_takes_a_literal_or_a_plain_string():
    assert run(["--init_from=out/sft"])[1]["init_from"] == "out/sft"
    assert run(["--init_from=42"])[1]["init_from"] == 42
    assert run(["--init_from=[1, 2]"])[1]["init_from"] == [1, 2]


def test_values_may_contain_equals_signs_and_strings_need_no_quotes():
    assert run(["--out_dir=a=b=c"])[1]["out_dir"] == "a=b=c"
    assert run(["--out_dir=with spaces"])[1]["out_dir"] == "with spaces"


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True), ("yes", True),
                                        ("false", False), ("False", False), ("0", False), ("off", False)])
def test_booleans_parse_from_words(text, value):
    assert run([f"--compile={text}"])[1]["compile"] is value


def test_bare_flag_sets_a_boolean_and_dashes_mean_underscores():
    assert run(["--compile"])[1]["compile"] is True
    assert run(["--batch-size=3"])[1]["batch_size"] == 3


def test_tuples_and_lists_parse_as_literals():
    assert run(["--betas=(0.8, 0.99)"])[1]["betas"] == (0.8, 0.99)
    assert run(["--betas=0.8,0.9"])[1]["betas"] == (0.8, 0.9)
    assert run(["--prompts=['x', 'y']"])[1]["prompts"] == ["x", "y"]


def test_unknown_key_names_the_closest_keys():
    msg = fails(["--batchsize=3"])
    assert "batchsize" in msg and "batch_size" in msg
    msg = fails(["--lrr=1"])
    assert "'lrr'" in msg and "lr" in msg


def test_unknown_key_without_close_match_lists_known_keys():
    msg = fails(["--zzzzzz=1"])
    assert "zzzzzz" in msg and "batch_size" in msg


@pytest.mark.parametrize("arg,what", [("--batch_size=abc", "batch_size"), ("--batch_size=1.5", "batch_size"),
                                      ("--compile=maybe", "compile"), ("--lr=fast", "lr"),
                                      ("--betas=0.9", "betas"), ("--batch_size", "batch_size")])
def test_bad_values_fail_with_one_line(arg, what):
    assert what in fails([arg])


def test_constants_private_names_and_modules_are_not_keys():
    assert "IGNORE_INDEX" in fails(["--IGNORE_INDEX=1"])
    fails(["--_private=2"])
    fails(["--math=2"])


def test_config_file_then_overrides_in_order(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\n_half = 8\nbatch_size = 2 * _half\nlr = 2  # int for a float\n"
                 "compile = True\nout_dir = 'out/' + str(batch_size)\n")
    config, g = run([str(f), "--batch_size=4"])
    assert config["batch_size"] == 4 and config["lr"] == 2.0 and isinstance(config["lr"], float)
    assert config["compile"] is True and config["out_dir"] == "out/16"
    config, g = run(["--batch_size=4", str(f)])  # the file comes later and wins
    assert config["batch_size"] == 16


def test_config_file_sees_current_values(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("batch_size = batch_size * 2\n")
    assert run(["--batch_size=5", str(f)])[0]["batch_size"] == 10


def test_config_file_typo_and_type_errors_fail(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("bach_size = 8\n")
    msg = fails([str(f)])
    assert "bach_size" in msg and "batch_size" in msg and str(f) in msg
    f.write_text("batch_size = 'eight'\n")
    assert "batch_size" in fails([str(f)])


def test_missing_config_file():
    assert "nope.py" in fails(["nope.py"])


def test_prints_final_config(capsys):
    configure(defaults(), ["--batch_size=7"])
    out = capsys.readouterr().out
    assert "batch_size" in out and "= 7" in out
