"""The `tempme` command end to end: `tempme flops` (the paper's token and GFLOP figures), help texts, version."""

import json
import subprocess
import sys

from tempme_cli.main import main


def test_flops_json_reproduces_table1_row(capsys):
    assert main(["flops", "--model", "ViT-B/32", "--frames", "12", "--method", "tempme", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 97
    assert round(result["gflops"], 1) == 34.8
    assert [row["out_tokens"] for row in result["layers"]][-4:] == [44, 56, 107, 97]


def test_flops_table_lists_every_layer(capsys):
    assert main(["flops", "--model", "ViT-B/16", "--method", "tome"]) == 0
    out = capsys.readouterr().out
    assert "12 x 77" in out and "144.26" in out
    assert out.count(" imgme ") == 12


def test_schedule_overrides_reach_the_model(capsys):
    assert main(["flops", "--merge-layers", "6-8-10", "--json"]) == 0
    assert round(json.loads(capsys.readouterr().out)["gflops"], 1) == 31.9  # paper Table 10, layers 7/9/11


def test_impossible_schedule_is_one_clear_error(capsys):
    assert main(["flops", "--clips-joined", "2-2-5"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "tempme flops: error: cannot join 5 clips at layer 10: 3 clips remain "
        "(frames=12, clips_joined=[2, 2, 5]); each step must divide the clip count"
    )


def test_frame_count_below_one_is_one_clear_error(capsys):
    assert main(["flops", "--frames", "0"]) == 2
    assert capsys.readouterr().err.strip() == "tempme flops: error: frames must be at least 1, got 0"


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "tempme_cli.main", "flops", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "multiply-accumulate" in out and "--merge-layers" in out


def test_every_subcommand_help_shows_only_meaningful_defaults():
    import argparse

    from tempme_cli.main import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"flops", "bench", "demo", "index", "search", "train", "eval", "prepare"} <= set(subcommands)
    for name, subparser in subcommands.items():
        text = subparser.format_help()
        for noise in ("(default: None)", "(default: False)"):
            assert noise not in text, f"tempme {name} --help: {noise}"
    assert "(default: 12)" in subcommands["flops"].format_help()


def test_version_names_tempme_and_torch(capsys):
    import importlib.metadata

    import pytest
    import torch

    import tempme

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"tempme {tempme.__version__} (torch {torch.__version__}")
    assert importlib.metadata.version("tempme") == tempme.__version__  # pyproject reads the same string
