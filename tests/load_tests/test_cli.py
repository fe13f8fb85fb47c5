"""Bad command lines fail with status 2 and a message naming the option, before anything is sent."""
from __future__ import annotations

import json

import pytest

from epserve.load_tests.cli import main

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("args,message", [
    (["--slo", "itl=5"], "--slo"),
    (["--input-len", "uniform:9:3"], "uniform:9:3"),
    (["--request-rate", "0"], "positive"),
    (["--fault", "gpu:0@3"], "SERVICE@SECONDS"),
])
def test_bad_option_is_an_argparse_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--target", "openai", "--fault", "router@1"], "--fault needs --target epserve"),
    (["--fault", "router@1", "--request-rate", "1,2"], "one run at a time"),
    (["--num-prompts", "0"], "--num-prompts"),
    (["--target", "openai", "--path", "/v1/chat/completions"], "--workload sharegpt"),
])
def test_inconsistent_options_exit_2(args, message, capsys):
    assert main(["run", *args]) == 2
    assert message in capsys.readouterr().err


def test_sharegpt_generator_command(tmp_path):
    out = tmp_path / "sharegpt.json"
    assert main(["sharegpt", "--out", str(out), "--num", "7", "--seed", "4"]) == 0
    data = json.loads(out.read_text())
    assert len(data) == 7 and all(c["conversations"][0]["from"] == "human" for c in data)
