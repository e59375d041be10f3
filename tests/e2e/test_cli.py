"""The `tempme` command end to end: `tempme flops` (the paper's token and GFLOP figures), help texts, version."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tempme

from tempme_cli.common import exit_status_help
from tempme_cli.main import build_parser, main, parse_arguments


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


@pytest.mark.parametrize("command", [["flops"], ["bench", "--device", "cpu"]])
@pytest.mark.parametrize("frames, message", [("0", "must be at least 1, got 0"), ("5000", "must be at most 4096, got 5000")])
def test_a_frame_count_out_of_range_is_one_clear_error_naming_the_option(capsys, command, frames, message):
    assert main([*command, "--frames", frames]) == 2
    assert capsys.readouterr().err == f"tempme {command[0]}: error: --frames {message}\n"


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
    assert "(default: the config's, else 12)" in subcommands["flops"].format_help()


def test_every_subcommand_help_ends_with_its_exit_statuses(capsys):
    import argparse

    from tempme_cli.main import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    # The commands that can finish with some of their inputs left out, and those of them torchrun runs.
    leave_out, under_torchrun = {"prepare", "train", "eval", "index", "search"}, {"prepare", "train", "eval"}
    for name, subparser in subcommands.items():
        statuses = subparser.format_help().split("exit status:\n")[-1]
        assert statuses.startswith("  0    done\n") and "\n  2    error: " in statuses, name
        assert "\n  3    failed otherwise: " in statuses, name
        assert max(len(line) for line in statuses.splitlines()) <= 80, name
        assert ("\n  1    done, but " in statuses) == (name in leave_out), name
        assert ("0 under torchrun" in statuses) == (name in under_torchrun), name
    # No command is a usage error, as argparse's own are: 1 would say a command left inputs out.
    assert main([]) == 2 and "usage: tempme" in capsys.readouterr().out


def test_a_failure_that_is_not_bad_input_has_a_status_of_its_own(capsys, monkeypatch):
    # Neither 1 (inputs left out) nor 2 (bad input): 3, with a traceback only where it helps a bug report.
    import torch

    import tempme_cli.flops

    def failing(exception):
        def handler(args):
            raise exception
        return handler

    monkeypatch.setattr(tempme_cli.flops, "run", failing(RuntimeError("something unforeseen")))
    assert main(["flops"]) == 3
    said = capsys.readouterr().err
    assert said.startswith("Traceback (most recent call last):")
    assert said.endswith("tempme flops: failed: RuntimeError: something unforeseen\n"), said
    # --help and the README say so alike.
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    for told in (" ".join(exit_status_help().split()), readme):
        assert "or a bug (then a traceback comes first, for a bug report); a last line on standard error names the error" in told
    monkeypatch.setattr(tempme_cli.flops, "run", failing(torch.OutOfMemoryError("CUDA out of memory (simulated)")))
    assert main(["flops"]) == 3
    assert capsys.readouterr().err == "tempme flops: failed: OutOfMemoryError: CUDA out of memory (simulated)\n"


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


def test_config_overrides_may_follow_options():
    from tempme_cli.main import build_parser, parse_arguments

    args = parse_arguments(build_parser(), ["train", "--config", "c.yaml", "optim.lr=1e-4", "--output", "run",
                                            "run.log_every=1"])
    assert args.overrides == ["optim.lr=1e-4", "run.log_every=1"] and args.output == "run"


def test_unknown_options_show_the_subcommands_usage(capsys):
    for argv in (["train", "--config", "c.yaml", "--bogus"], ["flops", "--bogus"]):
        try:
            main(argv)
        except SystemExit as exit:
            assert exit.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
        err = capsys.readouterr().err
        assert err.startswith(f"usage: tempme {argv[0]} ") and f"unrecognized arguments: {argv[-1]}" in err


def test_files_that_cannot_be_written_are_one_line_before_any_work(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert main(["demo", "--quick", "--output", str(not_a_folder)]) == 2
    assert capsys.readouterr().err == f"tempme demo: error: --output {not_a_folder}: exists and is not a folder\n"
    assert main(["demo", "--quick", "--save-dir", str(not_a_folder / "videos")]) == 2
    err = capsys.readouterr().err
    assert err == f"tempme demo: error: --save-dir {not_a_folder / 'videos'}: cannot be created, {not_a_folder} is a file\n"
    # The index is checked before the model loads: these weights do not even exist.
    assert main(["index", str(tmp_path), "--weights", str(tmp_path / "none.pt"),
                 "--out", str(not_a_folder / "x.index")]) == 2
    err = capsys.readouterr().err
    assert err == (f"tempme index: error: --out {not_a_folder / 'x.index'}: its folder {not_a_folder}: "
                   "exists and is not a folder\n")


def run_flops_as(handler, monkeypatch) -> int:
    """``tempme flops`` with its handler replaced by ``handler``: how main() treats what a command does."""
    from tempme_cli import main as cli

    build = cli.build_parser

    def build_with_handler():
        parser = build()
        parser.get_default("command_parsers")["flops"].set_defaults(handler=handler)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_with_handler)
    return main(["flops"])


def test_an_os_error_is_one_line_without_a_traceback(monkeypatch, capsys):
    def denied(args):
        raise PermissionError(13, "Permission denied", "/data/videos.index")

    assert run_flops_as(denied, monkeypatch) == 2
    assert capsys.readouterr().err == "tempme flops: error: Permission denied: /data/videos.index\n"


@pytest.mark.parametrize("option, value, message", [
    ("--framerate", "nan", "--framerate must be a positive number, got nan"),
    ("--framerate", "inf", "--framerate must be a positive number, got inf"),
    ("--save-every", "nan", "--save-every must be a finite number, got nan"),
])
def test_index_refuses_numbers_that_are_not_numbers(tmp_path, option, value, message, capsys):
    assert main(["index", str(tmp_path), "--weights", "x.pt", "--out", str(tmp_path / "x.index"), option, value]) == 2
    assert message in capsys.readouterr().err


def test_warnings_are_one_line_messages(monkeypatch):
    import warnings

    from tempme_cli import main as cli

    shown = []

    def warns(args):  # how Python prints a warning while the command runs (pytest captures the real one)
        shown.append(warnings.formatwarning("skipping video /data/a.mp4: empty", UserWarning, "fetch.py", 54))

    assert run_flops_as(warns, monkeypatch) == 0
    assert shown == ["tempme: warning: skipping video /data/a.mp4: empty\n"]  # no file, line or source
    assert warnings.formatwarning is not cli.one_line_warning  # restored for the caller


def test_flops_refuses_schedule_options_the_method_ignores(capsys):
    assert main(["flops", "--method", "none", "--merge-layers", "1-2", "--no-prop-attn"]) == 2
    assert "--merge-layers, --no-prop-attn: no effect with method none" in capsys.readouterr().err
    assert main(["flops", "--method", "tome", "--clips-joined", "2-2"]) == 2
    assert "--clips-joined: no effect with method tome" in capsys.readouterr().err
    assert main(["flops", "--method", "tome", "--tome-r", "3"]) == 0  # tome reads r


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """`tempme ... | head`: once the reader has closed the pipe, writing fails; no error message, exit 141."""
    process = subprocess.Popen([sys.executable, "-m", "tempme_cli.main", "flops", "--model", "ViT-B/16"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # at once: the command is still importing torch, long before it writes
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141 and b"error" not in err.lower() and b"Traceback" not in err, err


def test_a_broken_pipe_that_is_not_standard_output_is_an_error(monkeypatch, capsys):
    """Only a closed standard output ends a command quietly; another pipe's failure is reported."""
    def writes_to_a_closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("tempme_cli.flops.run", writes_to_a_closed_pipe)
    assert main(["flops"]) == 2
    assert "tempme flops: error: [Errno 32] Broken pipe" in capsys.readouterr().err


def test_sigterm_stops_a_command_as_ctrl_c_does_and_exits_143(monkeypatch, capsys):
    """So that what a command has done is saved on the way out (tempme index writes its index)."""
    import signal

    cleaned_up = []

    def stopped_by_a_service_manager(args):
        try:
            signal.raise_signal(signal.SIGTERM)
        finally:
            cleaned_up.append(True)

    monkeypatch.setattr("tempme_cli.flops.run", stopped_by_a_service_manager)
    assert main(["flops"]) == 143
    assert cleaned_up == [True] and "tempme flops: terminated (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # as it was


def test_a_command_run_off_the_main_thread_leaves_signals_alone(capsys):
    """Signal handlers can only be set on the main thread: main() there still runs the command."""
    import threading

    codes = []
    thread = threading.Thread(target=lambda: codes.append(main(["flops", "--json"])))
    thread.start()
    thread.join(120)
    assert codes == [0], capsys.readouterr().err


def test_zero_shot_eval_takes_the_datasets_settings_and_the_weights_method(tmp_path):
    from tempme.weights import save_weights
    from tempme_cli.eval import resolve_config
    from tempme_cli.main import build_parser, parse_arguments

    def config_of(*argv):
        return resolve_config(parse_arguments(build_parser(), ["eval", *argv]), None, None)

    for dataset, frames, words, test_split in (("didemo", 64, 64, "test"), ("activitynet", 64, 64, "val"),
                                               ("msrvtt", 12, 32, "test"), ("lsmdc", 12, 32, "test")):
        config = config_of("--weights", "ViT-B/32", "--dataset", dataset)
        assert (config.model.frames, config.data.max_frames, config.data.max_words, config.data.test_split) == (
            frames, frames, words, test_split), dataset
    # A tempme weights file keeps the method it records, unless --method says otherwise.
    path = save_weights(tempme.create_model("tiny-B/32", method="none", frames=12), tmp_path / "none.safetensors")
    assert config_of("--weights", str(path), "--dataset", "msrvtt").model.method == "none"
    assert config_of("--weights", str(path), "--dataset", "msrvtt", "--method", "tome").model.method == "tome"
    assert config_of("--weights", "ViT-B/32", "--dataset", "msrvtt").model.method == "tempme"
    # OpenAI's .pt files record no method (and are no safetensors files): the default, not an error.
    openai = tmp_path / "ViT-B-32.pt"
    torch.save(tempme.create_model("tiny-B/32", method="none", frames=12).state_dict(), openai)
    assert config_of("--weights", str(openai), "--dataset", "msrvtt").model.method == "tempme"


def test_a_checkpoint_evaluated_on_another_benchmark_takes_its_splits_and_words(tmp_path):
    from tempme_cli.eval import resolve_config
    from tempme_cli.main import build_parser, parse_arguments
    from tempme_train.config import load_config
    from tempme_train.modeling import save_trained_weights, stored_config

    trained_on = load_config("msrvtt_b32_tempme", ["model.preset=tiny-B/32", "model.weights=null"])
    assert trained_on.data.val_split == "holdout"
    path = tmp_path / "best.safetensors"
    save_trained_weights(tempme.create_model("tiny-B/32", frames=12), path, trained_on, base="0")

    def config_of(*argv):
        arguments = parse_arguments(build_parser(), ["eval", "--checkpoint", str(path), *argv])
        return resolve_config(arguments, path, stored_config(path))

    didemo = config_of("--dataset", "didemo")
    data = didemo.data
    assert (data.dataset, data.val_split, data.test_split, data.max_words) == ("didemo", "val", "test", 64)
    assert (didemo.model.frames, data.max_frames, didemo.model.preset) == (12, 12, "tiny-B/32")  # the trained model
    assert config_of("--dataset", "activitynet").data.test_split == "val"
    assert config_of("--dataset", "msrvtt").data == trained_on.data  # its own benchmark: as trained


def test_prepare_splits_leave_later_overrides_to_the_config(capsys):
    from tempme_cli.main import build_parser, parse_arguments

    args = parse_arguments(build_parser(), ["prepare", "--config", "c.yaml", "--splits", "val", "test",
                                            "data.frame_cache=/x", "data.num_workers=2"])
    assert args.splits == ["val", "test"] and args.late_overrides == ["data.frame_cache=/x", "data.num_workers=2"]
    with pytest.raises(SystemExit):
        parse_arguments(build_parser(), ["prepare", "--config", "c.yaml", "--splits", "valid"])
    assert "argument --splits: invalid choice: 'valid' (choose from train, val, test)" in capsys.readouterr().err


def test_flops_takes_the_model_of_a_training_config(tmp_path, capsys):
    def report(*argv):
        assert main(["flops", "--json", *argv]) == 0
        return {key: value for key, value in json.loads(capsys.readouterr().out).items()}

    assert report("--config", "didemo_b32_tempme") == report("--model", "ViT-B/32", "--frames", "64", "--method", "tempme")
    assert report("--config", "msrvtt_b16_none") == report("--model", "ViT-B/16", "--method", "none")
    own = tmp_path / "ablation.yaml"  # a config of one's own, changing the schedule
    own.write_text("base: msrvtt_b32_tempme\nmodel: {schedule: {cross_merge_ratio: 0.5}}\n")
    assert report("--config", str(own)) == report("--cross-merge-ratio", "0.5")
    assert report("--config", str(own), "--frames", "8")["frames"] == 8  # options change what the config says


def test_ctrl_c_while_torch_loads_is_one_line(monkeypatch, capsys):
    # Loading torch takes seconds; the command module must not load it before main() can catch Ctrl-C.
    imported = subprocess.run([sys.executable, "-c", "import sys, tempme_cli.main; print('torch' in sys.modules)"],
                              capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"

    def interrupted_while_loading():
        raise KeyboardInterrupt

    monkeypatch.setattr("tempme_cli.main.build_parser", interrupted_while_loading)
    assert main(["search", "x.index", "query"]) == 130
    assert capsys.readouterr().err == "tempme: interrupted\n"


def test_search_queries_may_follow_options():
    from tempme_cli.main import build_parser, parse_arguments

    parser = build_parser()
    for argv, queries, top in ((["x.index", "-k", "1", "a dog"], ["a dog"], 1),
                               (["x.index", "a dog", "--json", "a cat"], ["a dog", "a cat"], 10),
                               (["x.index", "-k", "2", "--", "--dashed query"], ["--dashed query"], 2)):
        args = parse_arguments(parser, ["search", *argv])
        assert (args.index, args.queries, args.top) == ("x.index", queries, top), argv
    with pytest.raises(SystemExit):
        parse_arguments(parser, ["search", "x.index", "a dog", "--bogus"])


def test_prepare_names_the_override_that_set_a_bad_value(tmp_path, capsys):
    good = tmp_path / "captions.csv"
    good.write_text("video,caption\na.mp4,a red square\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"base: msrvtt_b32_tempme\ndata: {{dataset: custom, anno_path: {good}, frame_cache: {tmp_path / 'c'}}}\n")
    # The benchmark's video folder, inherited: custom paths are relative to the annotation file's folder.
    assert main(["prepare", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "_msrvtt.yaml: data.video_dir: no such folder; with data.video_dir= (empty), the video paths" in error, error
    bad = tmp_path / "header.csv"
    bad.write_text("clip,text\na.mp4,a red square\n")
    assert main(["prepare", "--config", str(config), "data.video_dir=", f"data.anno_path={bad}"]) == 2
    error = capsys.readouterr().err
    assert f"command-line override 'data.anno_path={bad}': data.anno_path: bad train annotations" in error, error


def test_commands_that_do_not_share_work_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in (["flops"], ["search", "x.index", "a dog"], ["demo", "--quick"]):
        assert main(command) == 2
        assert capsys.readouterr().err == f"tempme {command[0]}: error: {command[0]} runs as one process: start it " \
            "without torchrun\n"


def test_escape_sequences_in_a_message_reach_the_terminal_escaped(tmp_path, capsys):
    # An index names the weights that built it; one from elsewhere can name anything.
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"not decoded: the weights fail first")
    assert main(["index", str(tmp_path / "videos"), "--weights", "\x1b[2Jcleared", "--out", str(tmp_path / "x.index"),
                 "--workers", "0"]) == 2
    error = capsys.readouterr().err
    assert "\\x1b[2Jcleared does not exist" in error and "\x1b" not in error, error


def test_flops_takes_the_settings_of_an_ablation_as_training_does(capsys, tmp_path):
    def gflops(*args: str) -> float:
        assert main(["flops", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)["gflops"]

    as_options = gflops("--tome-r", "3", "--merge-layers", "7-9-10")
    assert gflops("--config", "msrvtt_b32_tempme", "model.schedule.tome_r=3", "model.schedule.merge_layers=[7,9,10]") \
        == gflops("--tome-r", "3", "--merge-layers", "[7, 9, 10]") == as_options != gflops()
    assert gflops("model.frames=8") == pytest.approx(23.17, abs=0.005)  # SPEC: 8 -> 4 -> 2 -> 1
    # One video is counted: the config's training batch of 128 such videos is no limit here.
    assert gflops("model.frames=1024") == gflops("--frames", "1024")
    many = tmp_path / "many_frames.yaml"
    many.write_text("base: msrvtt_b32_tempme\nmodel: {frames: 1024}\ndata: {max_frames: 1024}\n")
    assert gflops("--config", str(many)) == gflops("--frames", "1024")
    # --method starts from the paper's schedule for it; KEY=VALUE settings then change that.
    assert gflops("--method", "tome", "model.schedule.tome_r=5") == gflops("--method", "tome", "--tome-r", "5") \
        != gflops("--method", "tome")
    assert main(["flops", "--method", "none", "model.schedule.tome_r=3"]) == 2
    assert capsys.readouterr().err.endswith("error: model.schedule.tome_r: no effect with method none (it does not "
                                            "read that setting)\n")
    assert main(["flops", "optim.lr=1"]) == 2
    assert capsys.readouterr().err == "tempme flops: error: optim.lr=1: tempme flops reads only the model's settings (model.*)\n"


def test_every_path_option_takes_the_home_folder_for_a_tilde(tmp_path, monkeypatch):
    # Left as it is, "~/x" makes a folder named "~" in the working directory (and `rm -rf ~` then...).
    monkeypatch.setenv("HOME", str(tmp_path))
    parser = build_parser()
    home = str(tmp_path)
    args = parse_arguments(parser, ["eval", "--config", "~/c.yaml", "--checkpoint", "~/run", "--cache-dir", "~/emb",
                                    "--anno-path", "~/anno", "--video-dir", "~/videos"])
    assert (args.config, args.checkpoint, args.cache_dir, args.anno_path, args.video_dir) == (
        f"{home}/c.yaml", f"{home}/run", f"{home}/emb", f"{home}/anno", f"{home}/videos")
    assert parse_arguments(parser, ["search", "~/v.index", "a dog", "--checkpoint", "~/run"]).index == f"{home}/v.index"
    assert str(parse_arguments(parser, ["demo", "--output", "~/out", "--save-dir", "~/clips"]).output) == f"{home}/out"
    assert parse_arguments(parser, ["train", "--config", "~/c.yaml", "--output", "~/run"]).output == f"{home}/run"
    assert parse_arguments(parser, ["flops", "--config", "~/c.yaml"]).config == f"{home}/c.yaml"
    assert parse_arguments(parser, ["flops", "--config", "msrvtt_b32_tempme"]).config == "msrvtt_b32_tempme"


def test_options_of_one_meaning_take_one_another_s_names(capsys):
    # --batch-size as eval and index spell it, --output as train and demo do.
    parser = build_parser()
    assert parse_arguments(parser, ["bench", "--batch-size", "3"]).batch == 3
    assert parse_arguments(parser, ["index", "v.mp4", "--output", "x.index", "--weights", "w"]).out == "x.index"
    # An option's error names the option, not only the setting it sets.
    assert main(["eval", "--weights", "tiny-B/32", "--frames", "0"]) == 2
    assert capsys.readouterr().err == "tempme eval: error: --frames: model.frames: must be positive (got 0)\n"


def test_search_checks_the_device_before_it_reads_the_index_or_loads_a_model(tmp_path, capsys):
    assert main(["search", str(tmp_path / "none.index"), "a dog", "--device", "tpu"]) == 2
    assert capsys.readouterr().err.startswith("tempme search: error: --device tpu: ")
