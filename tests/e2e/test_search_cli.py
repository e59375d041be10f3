"""End to end: `tempme index` on a folder of real (tiny) videos, then `tempme search`, through the CLI.

The weights are a tiny random CLIP the test writes as an OpenAI-style state dict (no LoRA in it, so
the command must build LoRA reproducibly to find the same model again at search time).
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tempme
from tempme.data import frames_to_tensor, read_frames
from tempme.weights import is_adapter_parameter
from tempme_cli.main import main

from data_fixtures import write_corrupt, write_damaged_video, write_video
from tiny_models import register_tiny_preset

PRESET = register_tiny_preset("test-tiny-search-cli")
QUERIES = ["a red square moves left", "a blue circle appears"]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_clip_weights(path: Path, seed: int) -> Path:
    """A random CLIP in OpenAI's plain state-dict layout: no LoRA, no clip positional embeddings."""
    torch.manual_seed(seed)
    model = tempme.create_model(PRESET, method="none", frames=4)
    state = {name: t for name, t in model.state_dict().items() if not is_adapter_parameter(name)}
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("library")
    for name, frames in (("cats.mp4", 20), ("dogs.mov", 35), ("trips/beach.mkv", 50)):
        write_video(root / name, num_frames=frames)
    write_corrupt(root / "broken.mp4")
    (root / "README.txt").write_text("not a video")
    return root


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_index_then_search(library, tmp_path, capsys, monkeypatch):
    weights = write_clip_weights(tmp_path / "clip.pt", seed=0)
    index = tmp_path / "library.index"
    args = ["index", str(library), "--weights", str(weights), "--out", str(index), "--frames", "4",
            "--device", "cpu", "--workers", "0", "--batch-size", "2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = cli(capsys, *args, "--json")
    # Done, but with a video left out: exit status 1, and a last line that counts it.
    assert code == 1 and err.endswith("tempme index: finished, but left out 1 undecodable video\n"), err
    # The undecodable video is reported in the summary, not warned about.
    assert not [w for w in caught if "skipping video" in str(w.message)]
    report = json.loads(out)
    broken = str((library / "broken.mp4").resolve())
    assert (report["found"], report["added"], report["total"]) == (4, 3, 3)
    # As `tempme eval --json` gives it: a list of {path, reason}.
    assert [sorted(video) for video in report["skipped"]] == [["path", "reason"]]
    assert report["skipped"][0]["path"] == broken and report["skipped"][0]["reason"].startswith("unreadable container")

    # A second run decodes nothing new but tries the broken video again, and says so in text.
    code, out, err = cli(capsys, *args)
    assert code == 1, err
    assert "3 videos indexed (0 new, 0 changed and embedded again, 1 undecodable" in out and f"undecodable: {broken}" in out

    code, out, err = cli(capsys, "search", str(index), *QUERIES, "-k", "2", "--json", "--device", "cpu")
    assert code == 0, err
    with pytest.warns(UserWarning, match="--per-video has no effect: .* holds whole videos"):
        code, _, err = cli(capsys, "search", str(index), QUERIES[0], "--per-video")
    assert code == 0, err
    results = [json.loads(line) for line in out.splitlines()]

    # Expected ranking, computed here without the index: the same weights loaded by the library (LoRA's
    # A is random, but B = 0 leaves outputs unchanged), frames decoded directly.
    model = tempme.load_model(weights, method="tempme", frames=4)
    videos = sorted(p.resolve() for p in library.rglob("*") if p.suffix in (".mp4", ".mov", ".mkv") and p.name != "broken.mp4")
    with torch.no_grad():
        video_features = torch.stack([
            model.encode_video(frames_to_tensor(read_frames(v, 4), 32)[None])[0] for v in videos
        ])
        text_features = model.encode_text(QUERIES)
    scores = F.normalize(text_features, dim=-1) @ F.normalize(video_features, dim=-1).T
    for query, result, row in zip(QUERIES, results, scores):
        assert result["query"] == query
        best = row.argsort(descending=True)[:2]
        assert [r["path"] for r in result["results"]] == [str(videos[i]) for i in best]
        assert [r["score"] for r in result["results"]] == pytest.approx(row[best].tolist(), abs=1e-3)
        assert [r["rank"] for r in result["results"]] == [1, 2]

    code, out, err = cli(capsys, "search", str(index), QUERIES[0], "--device", "cpu")
    assert code == 0, err
    assert out.splitlines()[0] == f"{QUERIES[0]!r}: 3 of 3 videos" and len(out.splitlines()) == 4

    # 41 tokens; the text encoder reads 30 between start and end. Shown cut to 60 characters.
    long_query = " ".join(["dog"] * 40) + " cat"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = cli(capsys, "search", str(index), long_query, QUERIES[0], "--device", "cpu")
    assert code == 0, err
    assert [str(w.message) for w in caught if "tokens" in str(w.message)] == [
        "query 'dog dog dog dog dog dog dog dog dog dog dog dog dog dog ...' has 41 tokens; the model reads "
        "the first 30 and ignores the rest"]

    # No queries on the command line: one per line of UTF-8 from standard input (a byte-order mark
    # dropped), blank lines ignored, a line that is not UTF-8 passed over with a warning.
    stdin = "\ufeff".encode() + f"{QUERIES[1]}\n\n".encode() + b"caf\xe9\n" + f"{QUERIES[0]}\n".encode()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = cli(capsys, "search", str(index), "-k", "2", "--json", "--device", "cpu")
    # The other queries are answered; the one passed over makes it exit 1, counted in a last line.
    assert code == 1 and err.endswith("tempme search: finished, but left out 1 non-UTF-8 query line\n"), err
    assert [json.loads(line) for line in out.splitlines()] == [results[1], results[0]]
    assert [str(w.message) for w in caught if "standard input" in str(w.message)] == [
        "line 3 of standard input is not UTF-8 text (invalid continuation byte at byte 3); passed over"]
    # Nothing but such lines: no query answered, which is no success.
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n\xff\n")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, out, err = cli(capsys, "search", str(index), "--device", "cpu")
    assert code == 2 and not out and err.endswith(
        "tempme search: error: no query was read: standard input held 2 lines of other text than UTF-8 and none in it\n"
    ), err
    # Nothing at all (`tempme search v.index < /dev/null`), or blank lines only: no success either.
    for stdin, said in [(b"", "standard input was empty (give queries after INDEX, or one per line of standard input)"),
                        (b"\n \n", "standard input held 2 blank lines and no query")]:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        code, out, err = cli(capsys, "search", str(index), "--device", "cpu")
        assert (code, out, err) == (2, "", f"tempme search: error: no query was read: {said}\n")
    # At a terminal, a session ended (Ctrl-D) before any query is the user's choice.
    monkeypatch.setattr("sys.stdin", Terminal(""))
    code, out, err = cli(capsys, "search", str(index), "--device", "cpu")
    assert (code, out) == (0, "") and err == f"3 videos in {index}; type a query and press Enter (Ctrl-D to end)\n"


def test_searching_an_index_of_no_videos_says_why_it_finds_nothing(tmp_path, capsys):
    write_corrupt(tmp_path / "videos" / "broken.mp4")
    weights = write_clip_weights(tmp_path / "clip.pt", seed=0)
    index = tmp_path / "v.index"
    code, out, err = cli(capsys, "index", str(tmp_path / "videos"), "--weights", str(weights), "--out", str(index),
                         "--frames", "4", "--device", "cpu", "--workers", "0")
    # Written (the broken video is tried again next time), but an index of nothing is no success.
    assert code == 2 and "0 videos indexed" in out and "1 undecodable" in out, err
    assert err.endswith(f"tempme index: error: {index} holds no videos: the 1 video found could not be decoded\n")
    code, out, err = cli(capsys, "search", str(index), QUERIES[0], "--device", "cpu")
    assert code == 2 and not out, out
    assert err.endswith(f"tempme search: error: {index} holds no videos (its 1 video could not be decoded; "
                        "`tempme index` says why): nothing to search\n"), err


def test_an_indexed_video_that_no_longer_decodes_is_said_to_be_dropped(library, tmp_path, capsys):
    videos = tmp_path / "videos"
    shutil.copytree(library, videos)
    weights = write_clip_weights(tmp_path / "clip.pt", seed=0)
    args = ["index", str(videos), "--weights", str(weights), "--out", str(tmp_path / "v.index"), "--frames", "4",
            "--device", "cpu", "--workers", "0"]
    assert cli(capsys, *args)[0] == 1  # the library's broken video left out, every time
    (videos / "cats-again.mp4").symlink_to(videos / "cats.mp4")  # the same video: found once
    code, out, err = cli(capsys, *args, "--json")
    assert code == 1 and json.loads(out)["found"] == 4 and json.loads(out)["added"] == 0, err
    cats = str((videos / "cats.mp4").resolve())
    Path(cats).write_bytes(b"not a video any more")
    code, out, err = cli(capsys, *args)
    assert code == 1 and err.endswith("tempme index: finished, but left out 2 undecodable videos\n"), err
    assert ("2 videos indexed (0 new, 0 changed and embedded again, 2 undecodable (1 of them indexed before, "
            "now dropped), 0 deleted and dropped") in out, out
    assert f"changed, no longer decodes, dropped: {cats}" in out and "undecodable: " in out


def test_search_refuses_other_weights_and_bad_input(library, tmp_path, capsys):
    weights = write_clip_weights(tmp_path / "clip.pt", seed=0)
    index = tmp_path / "one.index"
    code, _, err = cli(capsys, "index", str(library / "cats.mp4"), "--weights", str(weights), "--out", str(index),
                       "--frames", "4", "--device", "cpu", "--workers", "0", "--json")
    assert code == 0, err

    other = write_clip_weights(tmp_path / "other.pt", seed=1)
    code, _, err = cli(capsys, "search", str(index), "cats", "--weights", str(other))
    assert code == 2 and f"was built by other weights than {other.resolve()} ({weights.resolve()} as they were then)" in err

    code, _, err = cli(capsys, "index", str(library), "--weights", str(other), "--out", str(index),
                       "--frames", "4", "--device", "cpu", "--workers", "0")
    assert code == 2 and "was built by another model" in err

    # Other weights written over the very file the index names: said so, not "another model" naming it.
    rewritten, rewritten_index = write_clip_weights(tmp_path / "w3.pt", seed=0), tmp_path / "w3.index"
    again = ["index", str(library / "cats.mp4"), "--weights", str(rewritten), "--out", str(rewritten_index),
             "--frames", "4", "--device", "cpu", "--workers", "0"]
    assert cli(capsys, *again)[0] == 0
    write_clip_weights(rewritten, seed=1)
    said = f"{rewritten_index} was built by the weights at {rewritten.resolve()} as they were then; they changed since"
    code, _, err = cli(capsys, *again)
    assert code == 2 and said in err and "write a new index" in err and "another model" not in err, err
    code, _, err = cli(capsys, "search", str(rewritten_index), "cats")
    assert code == 2 and said in err and "index the videos again" in err and "other weights than" not in err, err

    code, _, err = cli(capsys, "index", str(tmp_path / "nowhere"), "--weights", str(weights), "--out", str(index))
    assert code == 2 and "nowhere: no such file or folder" in err

    code, _, err = cli(capsys, "index", str(library), "--weights", str(weights), "--out", str(tmp_path))
    assert code == 2 and "is a folder; name the file to write" in err and "videos.index" in err

    code, _, err = cli(capsys, "index", str(library), "--checkpoint", str(weights), "--frames", "8", "--out", str(index))
    assert code == 2 and "--method and --frames go with --weights" in err

    fresh = tmp_path / "fresh.index"
    code, _, err = cli(capsys, "index", str(library), "--checkpoint", str(weights), "--out", str(fresh),
                       "--device", "cpu", "--workers", "0")
    assert code == 2 and "not a checkpoint written by tempme train (for CLIP or other weights, use --weights)" in err
    code, _, err = cli(capsys, "index", str(library), "--checkpoint", str(tmp_path / "nosuch"), "--out", str(fresh))
    assert code == 2 and f"{tmp_path / 'nosuch'}: no such file or folder" in err, err

    # Decoded, a batch of windows would need some 100 TB: refused in one line instead of killed for
    # memory part-way (how many windows a batch gets is known only once the videos are opened).
    huge = tmp_path / "huge.index"
    code, _, err = cli(capsys, "index", str(library), "--weights", str(weights), "--out", str(huge), "--method", "none",
                       "--frames", "4096", "--batch-size", "10000000", "--segment", "1", "--device", "cpu",
                       "--workers", "0")
    assert code == 2 and "4096 frames of" in err and "GiB as one batch, more than this machine's" in err, err
    assert not huge.exists()
    # Whole videos: a batch holds the 4 found at most, whatever --batch-size says.
    code, _, err = cli(capsys, "index", str(library), "--weights", str(weights), "--out", str(huge), "--frames", "4",
                       "--batch-size", "1000000000", "--device", "cpu", "--workers", "0")
    assert code == 1 and "as one batch" not in err, err
    huge.unlink()
    code, _, err = cli(capsys, "index", str(library), "--weights", str(weights), "--out", str(huge),
                       "--frames", "100000", "--device", "cpu", "--workers", "0")
    assert code == 2 and err.endswith("tempme index: error: --frames must be at most 4096, got 100000\n"), err

    for option, value, message in [("--framerate", "0", "--framerate must be a positive number, got 0"),
                                   ("--workers", "-1", "--workers must not be negative")]:
        fresh = tmp_path / "fresh.index"
        code, _, err = cli(capsys, "index", str(library), "--weights", str(weights), "--out", str(fresh), option, value)
        assert code == 2 and message in err
        assert not fresh.exists()  # refused before anything was written

    moved = tmp_path / "moved.pt"
    weights.rename(moved)
    code, _, err = cli(capsys, "search", str(index), "cats")
    assert code == 2 and f"built with the weights at {weights}, which are not there any more" in err
    code, out, err = cli(capsys, "search", str(index), "cats", "--weights", str(moved))
    assert code == 0 and "1 of 1 videos" in out, err

    code, _, err = cli(capsys, "search", str(tmp_path / "missing.index"), "cats")
    assert code == 2 and "no such index file" in err

    with pytest.raises(SystemExit):  # argparse's usage error; QUERY is optional (stdin), INDEX is not
        main(["search"])
    assert capsys.readouterr().err.endswith("the following arguments are required: INDEX\n")

    code, _, err = cli(capsys, "search", str(index), "cats", "-k", "0")
    assert code == 2 and "-k must be at least 1" in err


def test_index_needs_a_model(library, tmp_path, capsys):
    assert main(["index", str(library), "--out", str(tmp_path / "x.index")]) == 2
    assert "name the model: --weights W (CLIP or tempme weights) or --checkpoint PATH" in capsys.readouterr().err


def test_an_index_written_from_python_is_searchable_from_the_command_line(library, tmp_path, capsys):
    from tempme.search import find_videos, update_index

    weights = write_clip_weights(tmp_path / "clip.pt", seed=0)
    videos = find_videos([library / "cats.mp4", library / "dogs.mov"])
    model = tempme.load_model(weights, method="tempme", frames=4).eval()

    # As README's Python example: model_info names the weights, so the index says how to load them.
    named = tmp_path / "named.index"
    update_index(model, videos, named, model_info={"weights": str(weights)}, progress=False)
    code, out, err = cli(capsys, "search", str(named), QUERIES[0], "--json", "--device", "cpu")
    assert code == 0, err
    assert len(json.loads(out)["results"]) == 2

    # Without model_info the index holds the method and frames, not the weights: one clear error,
    # and naming them is enough.
    unnamed = tmp_path / "unnamed.index"
    update_index(model, videos, unnamed, progress=False)
    code, _, err = cli(capsys, "search", str(unnamed), QUERIES[0])
    assert code == 2 and "does not record which weights built it" in err and "--weights" in err
    code, out, err = cli(capsys, "search", str(unnamed), QUERIES[0], "--weights", str(weights), "--json")
    assert code == 0, err
    assert json.loads(out)["results"] == json.loads(cli(capsys, "search", str(named), QUERIES[0], "--json")[1])["results"]


def test_reindexing_embeds_changed_videos_again_and_drops_deleted_subfolders(tmp_path, capsys):
    import shutil

    library = tmp_path / "library"
    write_video(library / "a.mp4", num_frames=20)
    write_video(library / "trips" / "b.mp4", num_frames=30)
    weights = write_clip_weights(tmp_path / "clip.pt", seed=0)
    index = tmp_path / "lib.index"
    args = ["index", str(library), "--weights", str(weights), "--out", str(index), "--frames", "4",
            "--device", "cpu", "--workers", "0", "--json"]
    code, out, err = cli(capsys, *args)
    assert code == 0 and json.loads(out)["added"] == 2, err

    write_video(library / "a.mp4", num_frames=45)  # another clip under the same name
    shutil.rmtree(library / "trips")  # a subfolder deleted inside a folder that is still there
    code, out, err = cli(capsys, *args)
    report = json.loads(out)
    assert code == 0, err
    assert report["updated"] == [str((library / "a.mp4").resolve())] and report["added"] == 0
    assert report["removed"] == [str((library / "trips" / "b.mp4").resolve())] and report["total"] == 1


def test_updating_an_index_follows_its_settings_and_copes_with_missing_folders(tmp_path, capsys):
    """Updating needs no more options than building did: frames, framerate and precision come from the
    index. A missing or emptied folder is passed over with a warning (its videos stay: it may be an
    unmounted drive), and --prune drops the videos of a folder moved for good."""
    first, second = tmp_path / "first", tmp_path / "second"
    write_video(first / "a.mp4", num_frames=20)
    write_video(second / "b.mp4", num_frames=30)
    write_video(second / "c.mp4", num_frames=25)
    weights = write_clip_weights(tmp_path / "clip.pt", seed=0)
    index = tmp_path / "lib.index"
    common = ["--weights", str(weights), "--out", str(index), "--device", "cpu", "--workers", "0", "--json"]
    code, out, err = cli(capsys, "index", str(first), str(second), *common, "--frames", "4", "--framerate", "2",
                         "--precision", "bf16")
    assert code == 0 and json.loads(out)["added"] == 3, err

    write_video(first / "d.mp4", num_frames=22)
    code, out, err = cli(capsys, "index", str(first), *common)  # no --frames, --framerate, --precision
    assert code == 0 and json.loads(out)["added"] == 1, err
    settings = tempme.search.VideoIndex.load(index).settings
    assert (settings["frames"], settings["framerate"], settings["precision"]) == (4, 2.0, "bf16")

    code, _, err = cli(capsys, "index", str(first), *common, "--frames", "6")  # said explicitly: refused
    assert code == 2 and "was built with frames=4, this run has frames=6" in err, err

    moved = tmp_path / "moved"
    second.rename(moved)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = cli(capsys, "index", str(first), str(second), *common)
    # Updated without it, which leaves it out: exit status 1.
    assert code == 1 and err.endswith("tempme index: finished, but left out 1 missing source\n"), err
    assert [str(w.message) for w in caught if str(second) in str(w.message)] == [
        f"{second} is not there (now): the 2 video(s) indexed from it stay in the index (--prune drops them)"]
    assert json.loads(out)["total"] == 4 and json.loads(out)["removed"] == []  # b and c kept
    assert json.loads(out)["missing_sources"] == [str(second)]
    # A mistyped path beside a folder that is there: passed over, and left out as well.
    typo = tmp_path / "frist"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = cli(capsys, "index", str(first), str(typo), *common[:-1])
    assert code == 1 and err.endswith("tempme index: finished, but left out 1 missing source\n"), err
    assert [str(w.message) for w in caught if str(typo) in str(w.message)] == [
        f"{typo}: no such file or folder, passed over (nothing in the index came from it)"]
    assert f"  not there, passed over: {typo}\n" in out, out

    code, out, err = cli(capsys, "index", str(moved), *common, "--prune")  # same videos, new place
    report = json.loads(out)
    assert code == 0, err
    assert sorted(Path(p).name for p in report["removed"]) == ["b.mp4", "c.mp4"] and report["added"] == 2
    assert sorted(Path(p).parent for p in tempme.search.VideoIndex.load(index).paths) == [
        first.resolve(), first.resolve(), moved.resolve(), moved.resolve()]

    for video in moved.iterdir():
        video.unlink()
    # Emptied, as an unmounted drive's mount point is: its videos stay, with a warning, unless --prune.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = cli(capsys, "index", str(moved), *common)
    assert code == 0 and json.loads(out)["total"] == 4 and json.loads(out)["removed"] == [], err
    assert [str(w.message) for w in caught if str(moved) in str(w.message)] == [
        f"{moved} holds no videos now (an empty mount point?): the 2 video(s) indexed from it stay in the index "
        "(--prune drops them)"]
    code, out, err = cli(capsys, "index", str(moved), *common, "--prune")
    assert code == 0 and json.loads(out)["total"] == 2 and len(json.loads(out)["removed"]) == 2, err

    deleted_file = first / "d.mp4"  # a file given by name and deleted: reported as deleted, no warning
    deleted_file.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = cli(capsys, "index", str(deleted_file), str(first / "a.mp4"), *common)
    assert code == 0 and json.loads(out)["removed"] == [str(deleted_file.resolve())], err
    assert not [w for w in caught if str(deleted_file) in str(w.message)]

    code, _, err = cli(capsys, "index", str(tmp_path / "nowhere"), *common)  # nothing given exists, nor came from there
    assert code == 2 and "nowhere: no such file or folder (nothing in" in err and "a mistyped path?" in err
    first.rename(tmp_path / "unmounted")  # the index's videos came from there
    code, _, err = cli(capsys, "index", str(first), *common)
    assert code == 2 and f"{first}: no such file or folder, so nothing to update" in err
    assert "keeps the videos indexed from there" in err and "--prune" in err


@pytest.mark.parametrize("stop, code, said", [("ctrl-c", 130, "interrupted"), ("sigterm", 143, "terminated (SIGTERM)")])
def test_a_stop_while_indexing_saves_and_says_what_was_saved(library, tmp_path, capsys, monkeypatch, stop, code, said):
    """Ctrl-C, or SIGTERM (a service manager's stop; by default it would kill the process at once)."""
    import signal

    import tempme.search as search

    embed, calls = search._embed_batch, []

    def stopped_at_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if stop == "ctrl-c":
                raise KeyboardInterrupt
            signal.raise_signal(signal.SIGTERM)
        return embed(*args, **kwargs)

    monkeypatch.setattr(search, "_embed_batch", stopped_at_the_second_batch)
    weights = write_clip_weights(tmp_path / "clip.pt", seed=0)
    index = tmp_path / "lib.index"
    exit_code, _, err = cli(capsys, "index", str(library), "--weights", str(weights), "--out", str(index),
                            "--frames", "4", "--batch-size", "1", "--device", "cpu", "--workers", "0")
    assert exit_code == code
    assert f"{index}: 1 video indexed, every finished video saved; run the same command again" in err, err
    assert f"tempme index: {said}" in err
    assert len(search.VideoIndex.load(index)) == 1


def test_a_file_name_with_a_line_break_stays_on_its_row(tmp_path, capsys):
    """One row per video: a name with a line break in it is shown quoted, with the break escaped."""
    folder = tmp_path / "odd"
    write_video(folder / "two\nlines.mp4", num_frames=20)
    write_video(folder / "plain.mp4", num_frames=20)
    weights = write_clip_weights(tmp_path / "clip.pt", seed=0)
    index = tmp_path / "odd.index"
    code, _, err = cli(capsys, "index", str(folder), "--weights", str(weights), "--out", str(index), "--frames", "4",
                       "--device", "cpu", "--workers", "0")
    assert code == 0, err
    code, out, err = cli(capsys, "search", str(index), "a scene", "--device", "cpu")
    assert code == 0, err
    rows = out.splitlines()
    assert len(rows) == 3  # the query's line and one row per video
    assert any(row.endswith(repr(str((folder / "two\nlines.mp4").resolve()))) for row in rows[1:]), rows
    assert any(row.endswith(str((folder / "plain.mp4").resolve())) for row in rows[1:]), rows


def test_a_second_index_run_stops_before_loading_its_model(library, tmp_path, capsys, monkeypatch):
    from tempme.files import exclusive_lock

    monkeypatch.setattr("tempme_cli.search.load_search_model", pytest.fail)  # never reached
    index = tmp_path / "busy.index"
    with exclusive_lock(index):  # what a run in another process holds
        code, _, err = cli(capsys, "index", str(library), "--weights", "ViT-B/32", "--out", str(index))
    assert code == 2 and f"{index} is being updated by another process" in err, err


class Terminal(io.StringIO):
    """Standard input as a terminal gives it."""

    def isatty(self) -> bool:
        return True


def test_windows_left_out_of_a_damaged_video_make_every_index_run_exit_1(tmp_path, capsys, monkeypatch):
    # Frames 80-119 do not decode, so the window from 8 to 12 s is left out of an index of 4-second ones.
    damaged = write_damaged_video(tmp_path / "videos" / "damaged.mp4")
    video = str(damaged.resolve())
    weights = write_clip_weights(tmp_path / "clip.pt", seed=0)
    index = tmp_path / "v.index"
    args = ["index", str(damaged.parent), "--weights", str(weights), "--out", str(index), "--frames", "4",
            "--segment", "4", "--device", "cpu", "--workers", "0"]
    with pytest.warns(UserWarning, match="left out, as fewer than half of their frames decode: 8.0-12.0 s"):
        code, out, err = cli(capsys, *args, "--json")
    assert code == 1 and err.endswith("tempme index: finished, but left out 1 damaged window\n"), err
    report = json.loads(out)
    assert (report["partial"], report["partial_earlier"]) == ({video: [[8.0, 12.0]]}, {})

    # Nothing changed: nothing decoded, but the index still lacks the window, and says so.
    code, out, err = cli(capsys, *args)
    assert code == 1 and err.endswith("tempme index: finished, but left out 1 damaged window\n"), err
    assert f"  damaged, indexed without 8.0-12.0 s (left out by an earlier run): {video}\n" in out, out
    code, out, err = cli(capsys, *args, "--json")
    report = json.loads(out)
    assert code == 1, err
    assert (report["added"], report["partial"], report["partial_earlier"]) == (0, {}, {video: [[8.0, 12.0]]})
    monkeypatch.setattr("sys.stdin", Terminal(""))
    code, _, err = cli(capsys, "search", str(index), "--device", "cpu")
    assert code == 0 and f"1 video (4 segments; windows of 1 damaged video left out) in {index};" in err, err

    write_video(damaged, num_frames=200)  # replaced by a whole copy: read again, clean
    code, out, err = cli(capsys, *args)
    assert code == 0 and f"changed, embedded again: {video}" in out and "indexed without" not in out, out + err
    code, out, err = cli(capsys, *args, "--json")
    assert code == 0 and json.loads(out)["partial_earlier"] == {}, out + err


def test_index_of_segments_then_search_finds_moments(tmp_path, capsys):
    weights = write_clip_weights(tmp_path / "clip.pt", seed=0)
    videos = tmp_path / "recordings"
    write_video(videos / "day.mp4", num_frames=120)  # 12 s: three 4-second segments
    write_video(videos / "clip.mp4", num_frames=30)  # 3 s: whole
    index = tmp_path / "moments.index"
    args = ["index", str(videos), "--weights", str(weights), "--out", str(index), "--frames", "4",
            "--device", "cpu", "--workers", "0"]
    code, out, err = cli(capsys, *args, "--segment", "4", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["added"], report["total"], report["segments"], report["partial"]) == (2, 2, 4, {})

    # Updating follows the index's segment length; another one is refused, naming both.
    write_video(videos / "more.mp4", num_frames=20)
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert "3 videos indexed in 5 segments (1 new" in out
    code, out, err = cli(capsys, *args, "--segment", "6")
    assert code == 2 and "built with segments of 4 s, this run has segments of 6 s" in err
    assert "loading" not in err  # refused before the model loads
    code, out, err = cli(capsys, *args, "--method", "none")
    assert code == 2 and "built by a model with method='tempme', this run asks for method='none'" in err
    assert "loading" not in err
    code, out, err = cli(capsys, *args, "--backend", "decord")
    assert code == 2 and "built with the pyav decoder, this run has the decord decoder" in err
    assert "loading" not in err

    code, out, err = cli(capsys, "search", str(index), QUERIES[0], "-k", "5", "--json")
    assert code == 0, err
    hits = json.loads(out)["results"]
    day = str((videos / "day.mp4").resolve())
    assert sorted((h["start"], h["end"]) for h in hits if h["path"] == day) == [(0.0, 4.0), (4.0, 8.0), (8.0, 12.0)]
    code, out, err = cli(capsys, "search", str(index), QUERIES[0], "-k", "5")
    assert code == 0, err
    assert "5 of 5 segments" in out and f"{day}  0:04-0:08" in out
    code, out, err = cli(capsys, "search", str(index), QUERIES[0], "-k", "5", "--per-video", "--json")
    assert code == 0, err
    best = json.loads(out)["results"]
    assert sorted(h["path"] for h in best) == sorted(str(p.resolve()) for p in videos.iterdir())
    assert [h["score"] for h in best] == [max(h["score"] for h in hits if h["path"] == b["path"]) for b in best]


@pytest.mark.parametrize("value, message", [
    ("0", "--segment must be a positive number, got 0.0"),
    ("-3", "--segment must be a positive number, got -3.0"),
    ("nan", "--segment must be a positive number, got nan"),
    ("0.5", "--segment must be at least 1 second(s), got 0.5"),
])
def test_a_segment_length_must_be_a_second_or_more(tmp_path, capsys, value, message):
    weights = write_clip_weights(tmp_path / "clip.pt", seed=0)
    write_video(tmp_path / "v" / "a.mp4", num_frames=20)
    code, out, err = cli(capsys, "index", str(tmp_path / "v"), "--weights", str(weights),
                         "--out", str(tmp_path / "i.index"), f"--segment={value}")
    assert code == 2 and message in err
    # Checked before the device: a machine without CUDA names the bad option all the same.
    code, out, err = cli(capsys, "index", str(tmp_path / "v"), "--weights", str(weights),
                         "--out", str(tmp_path / "i.index"), f"--segment={value}", "--device", "cuda")
    assert code == 2 and message in err


def test_times_are_shown_rounded_outwards():
    from tempme_cli.search import clock

    assert (clock(22.5), clock(30.0, round_up=True), clock(7.5, round_up=True)) == ("0:22", "0:30", "0:08")
    assert clock(3725.2) == "1:02:05" and clock(59.999, round_up=True) == "1:00"


def test_index_starts_no_more_decoding_workers_than_it_has_work_or_cpus(library, tmp_path, capsys, monkeypatch):
    import tempme.search as search
    from tempme import workers

    started = []

    def recorded_loader(start_workers: bool):
        class RecordedLoader(torch.utils.data.DataLoader):
            def __init__(self, *args, **kwargs):
                started.append(kwargs["num_workers"])
                super().__init__(*args, **(kwargs if start_workers else {**kwargs, "num_workers": 0}))

        return RecordedLoader

    monkeypatch.setattr(search, "DataLoader", recorded_loader(start_workers=True))
    cpus = workers.available_cpus()
    weights = write_clip_weights(tmp_path / "clip.pt", seed=0)
    common = ["--weights", str(weights), "--frames", "4", "--device", "cpu", "--workers", "10000", "--batch-size", "2"]
    with monkeypatch.context() as machine:  # a machine of 64 CPUs, whose workers this one need not start
        machine.setattr(workers, "available_cpus", lambda: 64)
        machine.setattr(search, "DataLoader", recorded_loader(start_workers=False))
        # 4 videos (one undecodable) in batches of 2: a worker per batch; with --segment, per video.
        assert cli(capsys, "index", str(library), "--out", str(tmp_path / "a.index"), *common)[0] == 1
        assert cli(capsys, "index", str(library), "--out", str(tmp_path / "b.index"), "--segment", "60", *common)[0] == 1
    assert started == [2, 4]
    # Never more than the CPUs: torch, which warns about that, has nothing to say.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli(capsys, "index", str(library), "--out", str(tmp_path / "c.index"), "--segment", "60", *common)[0] == 1
    assert started[-1] == min(4, cpus)
    assert not [w for w in caught if "worker processes" in str(w.message)]


def test_search_says_nothing_about_the_video_encoder_it_does_not_use(library, tmp_path, capsys):
    from tempme.weights import save_weights

    # A tempme file trained for 12 frames, indexed zero-shot as plain CLIP over 4: its clip positional
    # embeddings do not fit the video encoder, which indexing says; queries never go through it.
    torch.manual_seed(0)
    weights = save_weights(tempme.create_model(PRESET, method="tempme", frames=12), tmp_path / "w.safetensors")
    index = tmp_path / "v.index"
    with pytest.warns(UserWarning, match="clip positional embeddings .* do not fit this model"):
        code, _, err = cli(capsys, "index", str(library / "cats.mp4"), "--weights", str(weights), "--out", str(index),
                           "--method", "none", "--frames", "4", "--device", "cpu", "--workers", "0")
    assert code == 0, err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = cli(capsys, "search", str(index), QUERIES[0], "--device", "cpu")
    assert code == 0 and "1 of 1 videos" in out, err
    assert [str(w.message) for w in caught] == []
