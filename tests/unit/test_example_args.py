"""The plain-DDP example's command line: a mistake is an argparse error (exit code 2)."""

import pytest

from dtrain.examples.digits import parse_args


@pytest.mark.parametrize("argv", [["--density", "0"], ["--density", "1.5"], ["--batch-size", "0"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert "error: --" in capsys.readouterr().err


def test_defaults_are_the_readme_recipe():
    args = parse_args([])
    assert (args.density, args.hook, args.epochs) == (0.001, "dgc", 30)
