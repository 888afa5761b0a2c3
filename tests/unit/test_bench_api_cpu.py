"""The rate arguments of `python -m bench.api_cpu`."""

import pytest

from bench.api_cpu import _rate, main


@pytest.mark.parametrize("text", ["0", "-5", "fast"])
def test_bad_rate_rejected(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([text])
    assert exit_info.value.code == 2
    assert "invalid" in capsys.readouterr().err


def test_peak_and_number_accepted():
    assert _rate("peak") is None
    assert _rate("8134") == 8134.0
