"""The command line of bench/run: bad options get a usage error before any work starts."""

import pytest

from bench.__main__ import _parser, main


def test_process_counts_parsed():
    assert _parser().parse_args([]).processes == (1, 2)
    assert _parser().parse_args(["--processes", "2"]).processes == (2,)


@pytest.mark.parametrize("text", ["abc", "1,x", "0,1", ""])
def test_bad_process_counts_rejected(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["--processes", text])
    assert exit_info.value.code == 2
    assert "invalid process counts" in capsys.readouterr().err


@pytest.mark.parametrize("runs", ["0", "-1"])
def test_runs_below_one_rejected(runs, capsys):
    assert main(["--runs", runs, "--quick"]) == 2
    assert "--runs must be at least 1" in capsys.readouterr().err
