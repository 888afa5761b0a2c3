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


BAD_FRESHNESS_NUMBERS = [("--freshness-load", text, "invalid fraction") for text in ["0", "-1", "2", "inf", "nan", "abc"]] + [
    ("--freshness-rate", text, "invalid rate") for text in ["0", "0.5", "-5", "inf", "nan", "abc"]
]


@pytest.mark.parametrize(("option", "text", "message"), BAD_FRESHNESS_NUMBERS)
def test_bad_freshness_numbers_rejected(option, text, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args([option, text])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_freshness_load_and_rate_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["--freshness-load", "0.5", "--freshness-rate", "8000"])
    assert exit_info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_freshness_options_need_freshness_part(capsys):
    assert main(["--part", "http", "--freshness-rate", "8000"]) == 2
    assert "apply to the freshness part only" in capsys.readouterr().err


def test_freshness_options_parsed():
    assert _parser().parse_args(["--freshness-load", "0.25"]).freshness_load == 0.25
    assert _parser().parse_args(["--freshness-rate", "8000"]).freshness_rate == 8000.0
    assert _parser().parse_args([]).freshness_load is None


@pytest.mark.parametrize("text", ["0", "70000", "-1", "abc", "80.5"])
def test_bad_port_rejected(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["--port", text])
    assert exit_info.value.code == 2
    assert "invalid port" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--port", "18080", "--worker-port", "18080"], "--port and --worker-port are both 18080"),
    (["--port", "18080", "--worker-port", "18079"], "--port and the second worker's port (--worker-port + 1)"),
    (["--port", "17091", "--worker-port", "18091"], "the metrics port (--port + 1000) and --worker-port"),
    (["--port", "65000"], "the metrics port (--port + 1000) would be 66000"),
    (["--worker-port", "65535"], "the second worker's port (--worker-port + 1) would be 65536"),
])
def test_port_conflicts_rejected(argv, message, capsys):
    assert main([*argv, "--part", "worker"]) == 2
    assert message in capsys.readouterr().err
