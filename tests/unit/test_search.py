"""tempme.search: finding videos, building an index incrementally and resumably, ranking it by text."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file

import tempme
from tempme.data import frames_to_tensor, read_frames, read_windows
from tempme.search import (
    IndexOptions,
    VideoIndex,
    VIDEO_EXTENSIONS,
    VideoIndexError,
    encode_queries,
    find_videos,
    model_fingerprint,
    resolve_index_options,
    update_index,
)

from data_fixtures import write_corrupt, write_damaged_video, write_video
from file_fixtures import deny_reading
from tiny_models import register_tiny_preset

PRESET = register_tiny_preset("test-tiny-search")
FRAMES = 4

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0) -> tempme.TempMe:
    torch.manual_seed(seed)
    return tempme.create_model(PRESET, method="tempme", frames=FRAMES).eval()


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    """Four clips that differ in length (so in their sampled frames), one in a subfolder."""
    root = tmp_path_factory.mktemp("videos")
    for name, frames in (("a.mp4", 20), ("b.mp4", 30), ("c.mp4", 40), ("sub/d.mp4", 50)):
        write_video(root / name, num_frames=frames)
    return root


def reference_embedding(model: tempme.TempMe, path: Path) -> torch.Tensor:
    """The video embedding computed directly: decode, preprocess, encode, normalise."""
    frames = frames_to_tensor(read_frames(path, FRAMES), model.visual.image_size)
    with torch.no_grad():
        return F.normalize(model.encode_video(frames[None]), dim=-1)[0]


def copy_videos(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def index_a_copy(video_dir: Path, tmp_path: Path, **options) -> tuple[Path, tempme.TempMe, Path]:
    """``(videos, model, index path)``: a copy of the test videos, indexed once, for tests that change it."""
    videos = copy_videos(video_dir, tmp_path / "videos")
    model = tiny_model()
    index_path = tmp_path / "v.index"
    update_index(model, find_videos([videos]), index_path, progress=False, **options)
    return videos, model, index_path


# ------------------------------------------------------------------------------------- find_videos


def test_find_videos_recurses_filters_and_sorts(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    for name in ("b.MP4", "a.webm", "x/y/c.mkv", "notes.txt", ".hidden.mp4", "x/.cache/d.mp4"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    explicit = tmp_path / "clip.bin"
    explicit.write_bytes(b"")
    found = find_videos([tmp_path / "x", tmp_path, explicit])
    expected = sorted(p.resolve() for p in (tmp_path / "b.MP4", tmp_path / "a.webm", tmp_path / "x/y/c.mkv", explicit))
    assert found == expected


def test_find_videos_passes_over_typescript_files(tmp_path):
    # .ts is both MPEG transport streams and TypeScript: a source tree must not be "undecodable videos".
    stream = write_video(tmp_path / "broadcast.ts", num_frames=10, container_format="mpegts")
    (tmp_path / "app.ts").write_text("export const answer: number = 42;\n")
    (tmp_path / "types.d.ts").write_text("declare module 'x';\n")
    (tmp_path / "generated.ts").write_text("/** Generated: do not edit */\n" * 20)  # a G at byte 4
    os.mkfifo(tmp_path / "pipe.ts")  # not opened: opening a pipe waits for a writer
    (tmp_path / "empty.ts").write_bytes(b"")  # cannot tell: indexing says it is empty
    assert find_videos([tmp_path]) == [stream.resolve(), (tmp_path / "empty.ts").resolve()]
    assert find_videos([tmp_path / "app.ts"]) == [(tmp_path / "app.ts").resolve()]  # named: taken as given
    assert read_frames(stream, 4)  # a transport stream that PyAV reads


def test_find_videos_errors_name_the_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_videos([tmp_path / "nowhere"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no video files in"):
        find_videos([tmp_path])
    os.mkfifo(tmp_path / "pipe.mp4")  # there, but no file to read: not "no such file"
    with pytest.raises(ValueError, match="pipe.mp4: not a regular file or folder"):
        find_videos([tmp_path / "pipe.mp4"])


def test_find_videos_follows_linked_folders_without_looping(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_video(elsewhere / "x.mp4", num_frames=5)
    (elsewhere / "back").symlink_to(tmp_path / "library", target_is_directory=True)  # a cycle
    library = tmp_path / "library"
    (library / "sub").mkdir(parents=True)
    (library / "linked").symlink_to(elsewhere, target_is_directory=True)
    (library / "sub" / "again").symlink_to(library, target_is_directory=True)  # a link to a parent
    (library / "sub" / "y.m2ts").write_bytes(b"")
    found = find_videos([library])
    assert found == sorted([(elsewhere / "x.mp4").resolve(), (library / "sub" / "y.m2ts").resolve()])


def test_links_to_videos_that_lead_nowhere_are_warned_about(tmp_path):
    write_video(tmp_path / "library" / "x.mp4", num_frames=5)
    (tmp_path / "library" / "gone.mp4").symlink_to(tmp_path / "deleted.mp4")
    (tmp_path / "library" / "notes.txt").symlink_to(tmp_path / "deleted.txt")  # not a video: no word
    with pytest.warns(UserWarning, match=r"1 link\(s\) to videos in .*library lead to no file .*gone.mp4"):
        assert find_videos([tmp_path / "library"]) == [(tmp_path / "library" / "x.mp4").resolve()]


def test_video_extensions_cover_the_containers_pyav_reads(tmp_path):
    for extension in (".m2ts", ".mts", ".ts", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp"):
        assert extension in VIDEO_EXTENSIONS
    # An AVCHD camera file (MPEG transport stream): found, and decoded.
    clip = write_video(tmp_path / "camera" / "00001.M2TS", num_frames=10, container_format="mpegts")
    assert find_videos([tmp_path / "camera"]) == [clip.resolve()]
    assert len(read_frames(clip, 4)) == 4


# ------------------------------------------------------------------------------------- search


def test_search_ranks_by_cosine_against_hand_computed_scores():
    embeddings = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    index = VideoIndex(["v0", "v1", "v2"], embeddings, {"fingerprint": "x"}, {})
    hits = index.search(torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 4.0]]), k=2)
    # Query 1 points along y: v1 (0.8), then v0 and v2 tie at 0; topk breaks the tie either way.
    assert [h.path for h in hits[0]][0] == "v1" and hits[0][0].score == pytest.approx(0.8)
    assert hits[0][1].score == pytest.approx(0.0) and [h.rank for h in hits[0]] == [1, 2]
    # Query 2 is (0.6, 0, 0.8): v2 scores 0.8, v0 0.6, v1 0.36.
    assert [(h.path, round(h.score, 6)) for h in hits[1]] == [("v2", 0.8), ("v0", 0.6)]
    assert len(index.search(torch.ones(1, 3), k=10)[0]) == 3  # k beyond the index: all of it


def test_search_refuses_bad_queries():
    index = VideoIndex(["v0"], torch.ones(1, 3), {"fingerprint": "x"}, {})
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.search(torch.ones(1, 3), k=0)
    with pytest.raises(VideoIndexError, match="D=3"):
        index.search(torch.ones(1, 4))
    with pytest.raises(VideoIndexError, match="2 paths"):
        VideoIndex(["a", "b"], torch.ones(1, 3), {}, {})


def test_load_refuses_what_is_not_an_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such index file"):
        VideoIndex.load(tmp_path / "missing.index")
    with pytest.raises(VideoIndexError, match=f"{tmp_path} is a folder, not an index file"):
        VideoIndex.load(tmp_path)
    other = tmp_path / "weights.safetensors"
    save_file({"embeddings": torch.zeros(1, 2)}, str(other))
    with pytest.raises(VideoIndexError, match="written by something else"):
        VideoIndex.load(other)
    garbage = tmp_path / "garbage.index"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(VideoIndexError, match=r"not a tempme video index \(not even a safetensors file"):
        VideoIndex.load(garbage)


def test_an_unreadable_index_is_reported_as_unreadable_not_missing(tmp_path, monkeypatch):
    path = VideoIndex([], torch.empty(0, 2), {}, {}).save(tmp_path / "out.index")
    deny_reading(path, monkeypatch)
    with pytest.raises(VideoIndexError) as caught:
        VideoIndex.load(path)
    assert str(caught.value) == f"{path}: cannot read the index (Permission denied)"


def test_saving_again_keeps_the_mode_the_user_gave_the_index(tmp_path):
    path = VideoIndex([], torch.empty(0, 2), {}, {}).save(tmp_path / "out.index")
    path.chmod(0o644)  # shared with other users
    VideoIndex(["/v/a.mp4"], torch.ones(1, 2), {}, {}).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert VideoIndex.load(path).paths == ["/v/a.mp4"]


def rewrite_header(path: Path, change) -> None:
    """Rewrite an index file's JSON header with ``change(header)`` applied, keeping its embeddings."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    header = json.loads(metadata["index"])
    change(header)
    save_file(load_file(str(path)), str(path), metadata={**metadata, "index": json.dumps(header)})


@pytest.mark.parametrize("key", ["paths", "model", "settings", "skipped"])
def test_a_header_without_a_key_is_one_clear_error(tmp_path, key):
    path = VideoIndex(["/v/a.mp4"], torch.ones(1, 2), {}, {}).save(tmp_path / "i.index")
    rewrite_header(path, lambda header: header.pop(key))
    with pytest.raises(VideoIndexError) as caught:
        VideoIndex.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: the index header is damaged (no '{key}' entry)")
    assert "into a new file" in message


def test_a_header_of_the_wrong_shape_names_the_file(tmp_path):
    path = VideoIndex(["/v/a.mp4"], torch.ones(1, 2), {}, {}).save(tmp_path / "i.index")
    rewrite_header(path, lambda header: header.update(paths=["/v/a.mp4", "/v/b.mp4"]))
    with pytest.raises(VideoIndexError, match=f"^{path}: 2 paths but embeddings of shape"):
        VideoIndex.load(path)
    rewrite_header(path, lambda header: header.update(skipped=["x"]))
    with pytest.raises(VideoIndexError, match="'skipped' is not a JSON object"):
        VideoIndex.load(path)


def test_an_index_written_before_damaged_windows_were_recorded_has_none(tmp_path):
    partial = {"/v/a.mp4": [[4.0, 8.0]]}
    # Only indexed videos' records are kept, as their links are.
    path = VideoIndex(["/v/a.mp4"], torch.ones(1, 2), {}, {"segment_s": 4.0}, spans=[[0.0, 4.0]],
                      partial={**partial, "/v/gone.mp4": [[0.0, 4.0]]}).save(tmp_path / "i.index")
    assert VideoIndex.load(path).partial == partial
    rewrite_header(path, lambda header: header.pop("partial"))
    assert VideoIndex.load(path).partial == {}


@pytest.mark.parametrize("partial, what", [
    (["/v/a.mp4"], "'partial' is not a JSON object"),
    ({"/v/a.mp4": [4.0, 8.0]}, "'partial' holds other than lists of [start, end] spans"),
    ({"/v/a.mp4": [[4.0]]}, "'partial' holds other than lists of [start, end] spans"),
    ({"/v/a.mp4": [[4.0, "8.0"]]}, "'partial' holds other than lists of [start, end] spans"),
    ({"/v/a.mp4": [[float("nan"), 8.0]]}, "'partial' holds other than lists of [start, end] spans"),
])
def test_a_damaged_partial_entry_is_one_clear_error(tmp_path, partial, what):
    index = VideoIndex(["/v/a.mp4"], torch.ones(1, 2), {}, {"segment_s": 4.0}, spans=[[0.0, 4.0]])
    path = index.save(tmp_path / "i.index")
    rewrite_header(path, lambda header: header.update(partial=partial))
    with pytest.raises(VideoIndexError) as caught:
        VideoIndex.load(path)
    assert str(caught.value) == (f"{path}: the index header is damaged ({what}); index the videos again into a new "
                                 "file (tempme index FOLDER ... --out NEW.index)")


def test_tensors_an_index_cannot_hold_are_one_clear_error(tmp_path):
    whole = VideoIndex(["/v/a.mp4"], torch.ones(1, 2), {}, {}).save(tmp_path / "i.index")
    with safe_open(str(whole), framework="pt") as handle:
        header = handle.metadata()
    for name, tensors in [("half", {"embeddings": torch.ones(1, 2, dtype=torch.half)}),
                          ("nan", {"embeddings": torch.tensor([[float("nan"), 1.0]])})]:
        save_file(tensors, str(tmp_path / f"{name}.index"), metadata=header)
        with pytest.raises(VideoIndexError, match=f"{name}.index: the index is damaged \\(its embeddings are not all "
                                                  "finite float32 numbers\\)"):
            VideoIndex.load(tmp_path / f"{name}.index")
    segments = {"format": "tempme-video-index", "index": json.dumps(
        {"version": 2, "videos": ["/v/a.mp4"], "model": {}, "settings": {}, "skipped": {}})}
    for name, row_video, spans, message in [
        ("inf", torch.zeros(1, dtype=torch.int64), torch.tensor([[0.0, float("inf")]]), "segment spans are not all finite"),
        ("float-rows", torch.zeros(1), torch.tensor([[0.0, 1.0]]), "row_video tensor does not hold video numbers"),
    ]:
        save_file({"embeddings": torch.ones(1, 2), "row_video": row_video, "spans": spans},
                  str(tmp_path / f"{name}.index"), metadata=segments)
        with pytest.raises(VideoIndexError, match=f"{name}.index: its {message}"):
            VideoIndex.load(tmp_path / f"{name}.index")


def test_another_index_version_says_what_to_do(tmp_path):
    path = VideoIndex([], torch.empty(0, 2), {}, {}).save(tmp_path / "i.index")
    rewrite_header(path, lambda header: header.update(version=3))
    with pytest.raises(VideoIndexError, match="index version 3; this tempme reads versions 1, 2: index the videos "
                       r"again into a new file \(tempme index FOLDER ... --out NEW.index\)"):
        VideoIndex.load(path)


def test_save_and_load_round_trip(tmp_path):
    index = VideoIndex(["/v/a.mp4"], torch.tensor([[0.6, 0.8]]), {"fingerprint": "f", "weights": "w"},
                       {"frames": 4}, {"/v/bad.mp4": "no video stream"})
    loaded = VideoIndex.load(index.save(tmp_path / "i.index"))
    assert loaded.paths == index.paths and torch.equal(loaded.embeddings, index.embeddings)
    assert (loaded.model, loaded.settings, loaded.skipped) == (index.model, index.settings, index.skipped)
    assert loaded.files == {}


# ------------------------------------------------------------------------------------- update_index


def test_index_holds_each_videos_own_embedding(video_dir, tmp_path):
    model = tiny_model()
    videos = find_videos([video_dir])
    update = update_index(model, videos, tmp_path / "v.index", batch_size=3, progress=False)
    assert (update.added, update.skipped, update.removed, update.total) == (4, {}, [], 4)
    index = VideoIndex.load(tmp_path / "v.index")
    assert index.paths == [str(v) for v in videos]
    assert index.settings == {"frames": FRAMES, "framerate": 1.0, "image_size": 32, "precision": "fp32", "decoding": 2}
    assert index.model["fingerprint"] == model_fingerprint(model)
    for row, video in zip(index.embeddings, videos):
        torch.testing.assert_close(row, reference_embedding(model, video), atol=1e-5, rtol=1e-5)
    # The videos differ, so their embeddings do: the test would notice rows in the wrong order.
    assert torch.pdist(index.embeddings).min() > 1e-4

    queries = encode_queries(model, ["a red square", "a blue circle"])
    scores = F.normalize(queries, dim=-1) @ torch.stack([reference_embedding(model, v) for v in videos]).T
    hits = index.search(queries, k=4)
    for query_hits, query_scores in zip(hits, scores):
        assert [h.path for h in query_hits] == [str(videos[i]) for i in query_scores.argsort(descending=True)]
        assert [h.score for h in query_hits] == pytest.approx(sorted(query_scores.tolist(), reverse=True), abs=1e-5)


@pytest.mark.parametrize("setting, message", [
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"framerate": 0.0}, "framerate must be a positive number, got 0.0"),
    ({"framerate": float("nan")}, "framerate must be a positive number, got nan"),
    ({"framerate": float("inf")}, "framerate must be a positive number, got inf"),
    ({"num_workers": -1}, "num_workers must not be negative"),
    ({"save_every_s": -5}, "save_every_s must be a number >= 0, got -5"),
    ({"save_every_s": float("nan")}, "save_every_s must be a number >= 0, got nan"),
])
def test_unusable_index_settings_are_refused_before_any_work(video_dir, tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        update_index(tiny_model(), find_videos([video_dir]), tmp_path / "v.index", progress=False, **setting)
    assert not (tmp_path / "v.index").exists()


def test_update_adds_new_videos_only_and_drops_deleted_ones(video_dir, tmp_path):
    videos, model, index_path = index_a_copy(video_dir, tmp_path)
    before = VideoIndex.load(index_path)

    (videos / "b.mp4").unlink()
    shutil.rmtree(videos / "sub")  # without sources, a missing folder may be an unmounted drive: kept
    write_video(videos / "e.mp4", num_frames=25)
    calls = []
    original = model.encode_video
    model.encode_video = lambda frames, mask=None: calls.append(frames.shape[0]) or original(frames, mask)
    with pytest.warns(UserWarning, match=r"^1 indexed video\(s\) are missing and stay in the index, as their "
                      "folders are missing too"):
        update = update_index(model, find_videos([videos]), index_path, progress=False)
    assert (update.added, update.removed, update.total) == (1, [str((videos / "b.mp4").resolve())], 4)
    assert str((videos / "sub" / "d.mp4").resolve()) in VideoIndex.load(index_path).paths
    assert calls == [1]  # only the new video was encoded
    after = VideoIndex.load(index_path)
    kept = [p for p in before.paths if not p.endswith("b.mp4")]
    assert after.paths == kept + [str((videos / "e.mp4").resolve())]
    for path in kept:
        torch.testing.assert_close(after.embeddings[after.paths.index(path)], before.embeddings[before.paths.index(path)])


def test_interrupted_run_keeps_finished_batches_and_resumes(video_dir, tmp_path):
    model = tiny_model()
    videos = find_videos([video_dir])
    update_index(model, videos, tmp_path / "whole.index", batch_size=1, progress=False)

    original = model.encode_video
    calls = []

    def interrupted(frames, mask=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(frames, mask)

    model.encode_video = interrupted
    with pytest.raises(KeyboardInterrupt):
        update_index(model, videos, tmp_path / "resumed.index", batch_size=1, save_every_s=3600, progress=False)
    partial = VideoIndex.load(tmp_path / "resumed.index")
    assert partial.paths == [str(v) for v in videos[:2]]  # saved on the way out, though not yet due

    model.encode_video = original
    update = update_index(model, videos, tmp_path / "resumed.index", batch_size=1, progress=False)
    assert update.added == 2
    whole, resumed = VideoIndex.load(tmp_path / "whole.index"), VideoIndex.load(tmp_path / "resumed.index")
    assert resumed.paths == whole.paths
    torch.testing.assert_close(resumed.embeddings, whole.embeddings)


def test_index_is_written_as_it_goes(video_dir, tmp_path, monkeypatch):
    written = []
    save = VideoIndex.save
    monkeypatch.setattr(VideoIndex, "save", lambda self, path: written.append(len(self)) or save(self, path))
    videos = find_videos([video_dir])
    update_index(tiny_model(), videos, tmp_path / "v.index", batch_size=1, save_every_s=0, progress=False)
    assert written == [1, 2, 3, 4, 4]  # after every batch (no time need pass), and once more at the end
    written.clear()
    update_index(tiny_model(), videos, tmp_path / "w.index", batch_size=1, save_every_s=3600, progress=False)
    assert written == [4]


def test_undecodable_videos_are_listed_and_retried(video_dir, tmp_path):
    videos = copy_videos(video_dir, tmp_path / "videos")
    broken = write_corrupt(videos / "broken.mp4")
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported in the result, not warned about as well
        update = update_index(model, find_videos([videos]), tmp_path / "v.index", batch_size=2, progress=False)
    assert update.added == 4 and list(update.skipped) == [str(broken.resolve())] and update.dropped == []
    index = VideoIndex.load(tmp_path / "v.index")
    assert str(broken.resolve()) not in index.paths and str(broken.resolve()) in index.skipped

    write_video(broken, num_frames=15)  # mended: the next run picks it up
    update = update_index(model, find_videos([videos]), tmp_path / "v.index", progress=False)
    assert (update.added, update.skipped) == (1, {})
    index = VideoIndex.load(tmp_path / "v.index")
    assert index.skipped == {} and index.paths[-1] == str(broken.resolve())


def test_a_video_with_a_damaged_stretch_is_indexed_around_it(tmp_path):
    import random

    clean = write_video(tmp_path / "clean" / "v.mp4", num_frames=200, keyframe_every=20)
    data = bytearray(clean.read_bytes())
    first, count = int(len(data) * 0.5), int(len(data) * 0.05)  # about frame 120, one of the 4 sampled
    data[first : first + count] = random.Random(1).randbytes(count)
    damaged = tmp_path / "videos" / "damaged.mp4"
    damaged.parent.mkdir()
    damaged.write_bytes(data)
    with pytest.warns(UserWarning, match="damaged.mp4: .* frames do not decode .*stand in for"):
        update = update_index(tiny_model(), [damaged], tmp_path / "v.index", progress=False)
    assert (update.added, update.skipped) == (1, {})
    # Its windows too, each read around the damage on its own (see test_data_video.py).
    with pytest.warns(UserWarning, match="damaged.mp4: .* frames from 12.0 s on do not decode .*stand in for"):
        update = update_index(tiny_model(), [damaged], tmp_path / "s.index", segment_s=4.0, progress=False)
    assert (update.added, update.skipped, update.segments, update.partial) == (1, {}, 5, {})


def test_windows_left_out_of_a_damaged_video_are_reported(tmp_path):
    damaged = write_damaged_video(tmp_path / "videos" / "damaged.mp4")
    path = tmp_path / "s.index"
    with pytest.warns(UserWarning, match="left out, as fewer than half of their frames decode: 8.0-12.0 s"):
        update = update_index(tiny_model(), [damaged], path, segment_s=4.0, progress=False)
    assert (update.added, update.skipped, update.segments) == (1, {}, 4)
    assert (update.partial, update.partial_earlier) == ({str(damaged.resolve()): [[8.0, 12.0]]}, {})
    assert VideoIndex.load(path).spans == [[0.0, 4.0], [4.0, 8.0], [12.0, 16.0], [16.0, 20.0]]


def test_windows_left_out_are_reported_by_every_later_update_until_the_file_changes(tmp_path):
    folder = tmp_path / "videos"
    damaged = str(write_damaged_video(folder / "damaged.mp4").resolve())
    write_video(folder / "clean.mp4", num_frames=30)
    path, model = tmp_path / "s.index", tiny_model()

    def update():
        return update_index(model, find_videos([folder]), path, sources=[folder], segment_s=4.0, progress=False)

    with pytest.warns(UserWarning, match="left out"):
        update()
    assert VideoIndex.load(path).partial == {damaged: [[8.0, 12.0]]}
    # The file is as it was: not decoded again, its damage reported from the index.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a decode of the damaged video would warn
        again = update()
    assert (again.added, again.updated, again.partial, again.partial_earlier) == (0, [], {}, {damaged: [[8.0, 12.0]]})

    write_video(folder / "damaged.mp4", num_frames=200)  # mended: read again, and clean now
    mended = update()
    assert (mended.updated, mended.partial, mended.partial_earlier) == ([damaged], {}, {})
    assert VideoIndex.load(path).partial == {}
    assert update().partial_earlier == {}

    write_damaged_video(folder / "damaged.mp4")  # damaged anew: recorded anew
    with pytest.warns(UserWarning, match="left out"):
        damaged_again = update()
    assert (damaged_again.updated, damaged_again.partial) == ([damaged], {damaged: [[8.0, 12.0]]})
    write_corrupt(folder / "damaged.mp4")  # no longer decodes: dropped, its damage with it
    dropped = update()
    assert (dropped.dropped, dropped.partial_earlier, VideoIndex.load(path).partial) == ([damaged], {}, {})

    write_damaged_video(folder / "damaged.mp4")
    with pytest.warns(UserWarning, match="left out"):
        assert update().partial == {damaged: [[8.0, 12.0]]}
    os.remove(damaged)
    deleted = update()
    assert (deleted.removed, deleted.partial_earlier, VideoIndex.load(path).partial) == ([damaged], {}, {})


def test_the_damage_recorded_stays_with_a_video_reached_through_another_link(tmp_path):
    """Indexed paths are the files' own (links resolved): a link renamed leads to the same video,
    which keeps its rows, stamp and damaged windows."""
    damaged = str(write_damaged_video(tmp_path / "store" / "damaged.mp4").resolve())
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "first.mp4").symlink_to(damaged)
    path, model = tmp_path / "s.index", tiny_model()

    def update():
        return update_index(model, find_videos([folder], resolve_links=False), path, sources=[folder], segment_s=4.0,
                            progress=False)

    with pytest.warns(UserWarning, match="left out"):
        update()
    (folder / "first.mp4").rename(folder / "renamed.mp4")
    relinked = update()
    assert (relinked.added, relinked.removed, relinked.partial_earlier) == (0, [], {damaged: [[8.0, 12.0]]})
    assert VideoIndex.load(path).links == {damaged: [str(folder / "renamed.mp4")]}


def test_index_refuses_another_model_or_other_settings(video_dir, tmp_path):
    videos = find_videos([video_dir])[:1]
    index_path = tmp_path / "v.index"
    update_index(tiny_model(seed=0), videos, index_path, model_info={"weights": "first.pt"}, progress=False)
    with pytest.raises(VideoIndexError, match=r"another model \(\{\"weights\": \"first.pt\", \"method\": \"tempme\""):
        update_index(tiny_model(seed=1), videos, index_path, progress=False)
    with pytest.raises(VideoIndexError, match="framerate=1.0, this run has framerate=2.0"):
        update_index(tiny_model(seed=0), videos, index_path, framerate=2.0, progress=False)
    with pytest.raises(ValueError, match="unknown precision 'fp64'"):
        update_index(tiny_model(seed=0), videos, tmp_path / "other.index", precision="fp64", progress=False)
    assert not (tmp_path / "other.index").exists()


def test_weights_written_over_are_told_from_other_weights(tmp_path):
    from tempme.search import rewritten_weights, weights_stamps

    weights, run = tmp_path / "w.pt", tmp_path / "run" / "best.safetensors"
    for path in (weights, run):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"old")
    recorded = {"weights": str(weights), "method": "none", "frames": 4, "fingerprint": "f",
                "weights_stamps": weights_stamps({"weights": str(weights)})}
    trained = {"checkpoint": str(run), "weights": str(weights)}
    recorded_trained = {**trained, "weights_stamps": weights_stamps(trained)}
    assert set(recorded_trained["weights_stamps"]) == {str(run), str(weights)}
    # The files as the index saw them: what differs is not the files (another schedule, another tempme).
    assert rewritten_weights(recorded, {"weights": str(weights), "method": "none"}) is None
    assert rewritten_weights(recorded_trained, trained) is None

    weights.write_bytes(b"other weights")
    assert rewritten_weights(recorded, {"weights": str(weights), "method": "none"}) == f"the weights at {weights}"
    assert rewritten_weights(recorded_trained, trained) == f"the weights at {run} (on the base weights at {weights})"
    # An index that recorded no stamps (older tempme) cannot tell: the caller's general message.
    no_stamps = {key: value for key, value in recorded.items() if key != "weights_stamps"}
    assert rewritten_weights(no_stamps, {"weights": str(weights), "method": "none"}) is None
    # Not the same files, or not loaded as the same model: nothing says the files changed.
    assert rewritten_weights(recorded, {"weights": str(run), "method": "none"}) is None
    assert rewritten_weights(recorded, {"weights": str(weights), "method": "tempme"}) is None
    assert weights_stamps({"weights": "ViT-B/32"}) == {}  # a preset, named not by path
    assert rewritten_weights({**recorded, "weights": "ViT-B/32"}, {"weights": "ViT-B/32"}) is None
    assert rewritten_weights(recorded_trained, {**trained, "weights": str(tmp_path / "moved.pt")}) is None


def test_model_fingerprint_sees_every_weight():
    model = tiny_model()
    first = model_fingerprint(model)
    assert model_fingerprint(tiny_model()) == first
    with torch.no_grad():
        next(model.visual.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(model) != first


def test_the_same_weights_loaded_twice_have_one_fingerprint(tmp_path):
    # LoRA's A is drawn at random whenever a model is built; with B = 0 it changes nothing, and the
    # README's "run update_index again" must find the index that the same weights built.
    clip = {name: t for name, t in tiny_model().state_dict().items() if "lora_" not in name}
    torch.save(clip, tmp_path / "clip.pt")
    loaded = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        loaded.append(tempme.load_model(tmp_path / "clip.pt", frames=FRAMES))
    assert not torch.equal(loaded[0].visual.transformer.resblocks[0].attn.lora_a,
                           loaded[1].visual.transformer.resblocks[0].attn.lora_a)
    assert model_fingerprint(loaded[0]) == model_fingerprint(loaded[1])
    for model in loaded:  # trained adapters: A now matters
        with torch.no_grad():
            model.visual.transformer.resblocks[0].attn.lora_b.fill_(0.01)
    assert model_fingerprint(loaded[0]) != model_fingerprint(loaded[1])


def test_one_query_as_a_string_is_one_query():
    model = tiny_model()
    one = encode_queries(model, "a dog catches a frisbee")
    assert one.shape[0] == 1
    torch.testing.assert_close(one, encode_queries(model, ["a dog catches a frisbee"]))


def test_encode_queries_refuses_empty_text():
    with pytest.raises(ValueError, match="non-empty text; query 2 of 2 is '  '"):
        encode_queries(tiny_model(), ["a dog", "  "])
    with pytest.raises(ValueError, match="non-empty text; the query is ''"):
        encode_queries(tiny_model(), "")
    with pytest.raises(ValueError, match="no query"):
        encode_queries(tiny_model(), [])


# ------------------------------------------------------------------------------------- changed files


def count_encoded(model: tempme.TempMe) -> list[int]:
    """Make ``model`` record how many videos each encode_video call gets."""
    calls: list[int] = []
    original = model.encode_video
    model.encode_video = lambda frames, mask=None: calls.append(frames.shape[0]) or original(frames, mask)
    return calls


def test_a_replaced_video_is_embedded_again_in_its_place(video_dir, tmp_path):
    videos, model, index_path = index_a_copy(video_dir, tmp_path)
    before = VideoIndex.load(index_path)
    replaced = (videos / "b.mp4").resolve()
    write_video(replaced, num_frames=45)  # overwritten by another clip

    calls = count_encoded(model)
    update = update_index(model, find_videos([videos]), index_path, progress=False)
    assert (update.added, update.updated, update.removed, update.total) == (0, [str(replaced)], [], 4)
    assert calls == [1]
    after = VideoIndex.load(index_path)
    assert after.paths == before.paths
    row = after.paths.index(str(replaced))
    torch.testing.assert_close(after.embeddings[row], reference_embedding(model, replaced), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after.embeddings[row], before.embeddings[row], atol=1e-4)
    assert after.files[str(replaced)] == [replaced.stat().st_size, replaced.stat().st_mtime_ns]
    # Nothing changed since: nothing is embedded.
    calls.clear()
    again = update_index(model, find_videos([videos]), index_path, progress=False)
    assert (again.added, again.updated, calls) == (0, [], [])


def test_a_touched_video_of_the_same_size_is_embedded_again(video_dir, tmp_path):
    videos, model, index_path = index_a_copy(video_dir, tmp_path)
    touched = (videos / "a.mp4").resolve()
    info = touched.stat()
    os.utime(touched, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    update = update_index(model, find_videos([videos]), index_path, progress=False)
    assert update.updated == [str(touched)] and update.added == 0


def test_a_changed_video_that_no_longer_decodes_leaves_the_index(video_dir, tmp_path):
    videos, model, index_path = index_a_copy(video_dir, tmp_path)
    broken = write_corrupt((videos / "c.mp4").resolve())
    update = update_index(model, find_videos([videos]), index_path, progress=False)
    assert list(update.skipped) == [str(broken)] and update.updated == [] and update.total == 3
    assert update.dropped == [str(broken)]  # said, as it leaves search results
    index = VideoIndex.load(index_path)
    assert str(broken) not in index.paths and str(broken) not in index.files and str(broken) in index.skipped


def test_an_index_without_file_stamps_is_embedded_again_once(video_dir, tmp_path):
    model = tiny_model()
    index_path = tmp_path / "v.index"
    videos = find_videos([video_dir])
    update_index(model, videos, index_path, progress=False)
    rewrite_header(index_path, lambda header: header.pop("files"))  # as an older tempme wrote it
    assert VideoIndex.load(index_path).files == {}
    update = update_index(model, videos, index_path, progress=False)
    assert update.updated == [str(v) for v in videos] and update.added == 0
    assert update_index(model, videos, index_path, progress=False).updated == []


def test_deleted_subfolders_of_a_source_leave_the_index(video_dir, tmp_path):
    videos, model, index_path = index_a_copy(video_dir, tmp_path, sources=[tmp_path / "videos"])
    gone = str((videos / "sub" / "d.mp4").resolve())
    shutil.rmtree(videos / "sub")
    update = update_index(model, find_videos([videos]), index_path, progress=False, sources=[videos])
    assert update.removed == [gone] and update.total == 3
    assert gone not in VideoIndex.load(index_path).paths


def test_videos_of_a_missing_source_stay_in_the_index(video_dir, tmp_path):
    drive, other = tmp_path / "drive", tmp_path / "other"
    copy_videos(video_dir, drive)
    write_video(other / "e.mp4", num_frames=25)
    model = tiny_model()
    index_path = tmp_path / "v.index"
    update_index(model, find_videos([drive, other]), index_path, progress=False, sources=[drive, other])
    drive.rename(tmp_path / "unmounted")  # the drive is not there now, its mount point neither
    with pytest.warns(UserWarning, match=f"{drive} is not there \\(now\\): the 4 video\\(s\\) indexed from it stay"):
        update = update_index(model, find_videos([other]), index_path, progress=False, sources=[drive, other])
    assert (update.removed, update.total, update.missing_sources) == ([], 5, [str(drive)])
    with pytest.warns(UserWarning, match=r"^4 indexed video\(s\) are missing and stay"):  # no source names them now
        update = update_index(model, find_videos([other]), index_path, progress=False, sources=[other])
    assert (update.removed, update.total) == ([], 5)
    drive.mkdir()  # the empty mount point an unmounted drive leaves
    with pytest.warns(UserWarning, match=f"{drive} holds no videos now"):
        update = update_index(model, find_videos([other]), index_path, progress=False, sources=[drive, other])
    assert (update.removed, update.total, update.missing_sources) == ([], 5, [])  # there, though empty
    drive.rmdir()
    update = update_index(model, find_videos([other]), index_path, progress=False, sources=[drive, other],
                          prune=True)
    assert (len(update.removed), update.total, update.missing_sources) == (4, 1, [])  # its videos pruned
    # A source that nothing came from and that is not there: a mistyped path, passed over but said.
    typo = tmp_path / "othr"
    with pytest.warns(UserWarning, match=f"{typo}: no such file or folder, passed over \\(nothing in the index"):
        update = update_index(model, find_videos([other]), index_path, progress=False, sources=[other, typo])
    assert (update.removed, update.total, update.missing_sources) == ([], 1, [str(typo)])


def test_an_index_that_cannot_be_written_is_an_os_error_naming_it(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error, naming no file: the save names the index and
    leaves the file there as it was."""
    from safetensors import SafetensorError

    import tempme.search as search

    path = tmp_path / "videos.index"
    index = search.VideoIndex(["/v/a.mp4"], torch.ones(1, 4), {"fingerprint": "f"}, {"frames": 4})
    index.save(path)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(search, "save_file", disk_full)
    with pytest.raises(OSError, match=f"cannot write {path} \\(.*No space left on device.*\\); the index there is "
                                      "as it was before"):
        search.VideoIndex(["/v/b.mp4"], torch.zeros(1, 4), {"fingerprint": "f"}, {"frames": 4}).save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["videos.index"]


def test_a_second_run_on_an_index_being_updated_stops_at_once(video_dir, tmp_path):
    """Two runs on one index would each save what they embedded over the other's work: while one
    holds the index's lock, another is refused before decoding anything, and the index is untouched."""
    from tempme.files import exclusive_lock

    model, index = tiny_model(), tmp_path / "videos.index"
    videos = find_videos([video_dir])
    update_index(model, videos[:1], index, progress=False)
    before = index.read_bytes()
    with exclusive_lock(index):  # what a run in another process holds while it works
        with pytest.raises(VideoIndexError, match="being updated by another process"):
            update_index(model, videos, index, progress=False)
    assert index.read_bytes() == before
    assert update_index(model, videos, index, progress=False).added == len(videos) - 1  # free again


def test_index_loader_workers_leave_stops_to_the_main_process(video_dir, tmp_path, monkeypatch):
    import signal

    import tempme.search as search

    made = []

    class RecordedLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            made.append(kwargs.get("worker_init_fn"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(search, "DataLoader", RecordedLoader)
    update_index(tiny_model(), find_videos([video_dir])[:1], tmp_path / "v.index", progress=False)
    (init,) = made
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        init(0)  # what each worker runs first (quiet_worker_init, then the lock let go)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_index_loader_workers_close_the_lock_they_inherited(tmp_path, monkeypatch):
    # As a forked worker's copy of the lock's descriptor: closed by the worker's init, so that a
    # worker outliving its killed parent does not keep the next run out (tests/unit/test_files.py).
    import signal

    import tempme.search as search
    from tempme.files import exclusive_lock

    with exclusive_lock(tmp_path / "v.index") as lock:
        inherited = dataclasses.replace(lock, fd=os.dup(lock.fd))
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        try:
            search._index_worker_init(inherited, 0)
        finally:
            signal.signal(signal.SIGINT, before[0])
            signal.signal(signal.SIGTERM, before[1])
        with pytest.raises(OSError):
            os.fstat(inherited.fd)  # closed
        os.fstat(lock.fd)  # the holder's own is not


# ------------------------------------------------------------------------------------- symbolic links


def index_links(model, library: Path, index_path: Path, *, prune: bool = False):
    """Index ``library`` as `tempme index` does: videos as found (links not resolved), the folder as source."""
    videos = find_videos([library], allow_empty=True, resolve_links=False)
    return update_index(model, videos, index_path, sources=[library], prune=prune, progress=False)


def test_a_folder_of_links_alone_is_no_empty_mount_point(video_dir, tmp_path):
    elsewhere = copy_videos(video_dir, tmp_path / "elsewhere").resolve()
    playlist = tmp_path / "playlist"
    playlist.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (playlist / name).symlink_to(elsewhere / name)
    model, index_path = tiny_model(), tmp_path / "v.index"
    assert index_links(model, playlist, index_path).added == 2
    (playlist / "b.mp4").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "holds no videos now (an empty mount point?)"
        update = index_links(model, playlist, index_path)
    assert update.removed == [str(elsewhere / "b.mp4")] and update.total == 1


def test_pruning_drops_a_video_whose_links_went_with_their_folder(video_dir, tmp_path):
    elsewhere = copy_videos(video_dir, tmp_path / "elsewhere").resolve()
    source, other = tmp_path / "source", tmp_path / "other"
    source.mkdir()
    (source / "link.mp4").symlink_to(elsewhere / "a.mp4")
    write_video(other / "x.mp4", num_frames=12)
    model, index_path = tiny_model(), tmp_path / "v.index"
    videos = find_videos([source, other], resolve_links=False)
    update_index(model, videos, index_path, sources=[source, other], progress=False)
    shutil.rmtree(source)
    with pytest.warns(UserWarning, match="source is not there"):  # an unmounted drive, maybe: kept
        update = update_index(model, find_videos([other], resolve_links=False), index_path, sources=[source, other],
                              progress=False)
    assert update.removed == []
    update = update_index(model, find_videos([other], resolve_links=False), index_path, sources=[source, other],
                          prune=True, progress=False)
    assert update.removed == [str(elsewhere / "a.mp4")]


def test_links_are_saved_when_they_are_all_that_changed(video_dir, tmp_path):
    data = (tmp_path / "data").resolve()
    data.mkdir()
    shutil.copy(video_dir / "a.mp4", data / "a.mp4")  # the linked video alone: nothing new to embed below
    source = tmp_path / "source"
    source.mkdir()
    (source / "link.mp4").symlink_to(data / "a.mp4")
    model, index_path = tiny_model(), tmp_path / "v.index"
    index_links(model, source, index_path)
    assert VideoIndex.load(index_path).links == {str(data / "a.mp4"): [str(source.resolve() / "link.mp4")]}
    videos = find_videos([source, data], resolve_links=False)  # now found directly too: no longer linked only
    assert update_index(model, videos, index_path, sources=[source, data], progress=False).added == 0
    assert VideoIndex.load(index_path).links == {}
    (source / "link.mp4").unlink()
    update = update_index(model, find_videos([data], resolve_links=False), index_path, sources=[data],
                          progress=False)
    assert update.removed == [] and str(data / "a.mp4") in VideoIndex.load(index_path).paths


def test_a_link_given_by_name_and_deleted_is_no_mistyped_path(video_dir, tmp_path):
    elsewhere = copy_videos(video_dir, tmp_path / "elsewhere").resolve()
    (tmp_path / "src").mkdir()
    link = tmp_path / "src" / "l.mp4"
    link.symlink_to(elsewhere / "a.mp4")
    model, index_path = tiny_model(), tmp_path / "v.index"
    update_index(model, find_videos([link], resolve_links=False), index_path, sources=[link], progress=False)
    link.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not "nothing in the index came from it"
        update = update_index(model, [], index_path, sources=[link], progress=False)
    assert update.removed == [str(elsewhere / "a.mp4")]


def test_a_video_leaves_the_index_when_the_link_that_led_to_it_goes(video_dir, tmp_path):
    elsewhere = copy_videos(video_dir, tmp_path / "elsewhere").resolve()
    library = tmp_path / "library"
    write_video(library / "own.mp4", num_frames=12)  # so that the folder never looks like an empty mount point
    (library / "link.mp4").symlink_to(elsewhere / "a.mp4")
    (library / "trip").symlink_to(elsewhere / "sub", target_is_directory=True)
    model, index_path = tiny_model(), tmp_path / "v.index"
    update = index_links(model, library, index_path)
    a, b, d = (str(elsewhere / name) for name in ("a.mp4", "b.mp4", "sub/d.mp4"))
    own = str((library / "own.mp4").resolve())
    assert update.added == 3 and sorted(VideoIndex.load(index_path).paths) == sorted([own, a, d])
    assert VideoIndex.load(index_path).links == {a: [str(library.resolve() / "link.mp4")],
                                                 d: [str(library.resolve() / "trip" / "d.mp4")]}

    # Another folder indexed alone: the linked videos were not looked for, and stay.
    other = tmp_path / "other"
    write_video(other / "x.mp4", num_frames=14)
    assert index_links(model, other, index_path).removed == []

    # The link now leads to another video: that one comes in, the old one goes.
    (library / "link.mp4").unlink()
    (library / "link.mp4").symlink_to(elsewhere / "b.mp4")
    update = index_links(model, library, index_path)
    assert (update.added, update.removed) == (1, [a]) and b in VideoIndex.load(index_path).paths

    # The linked folder removed: its videos go, though their files are still there.
    (library / "trip").unlink()
    update = index_links(model, library, index_path)
    assert update.removed == [d] and Path(d).exists()
    index = VideoIndex.load(index_path)
    assert sorted(index.paths) == sorted([own, str((other / "x.mp4").resolve()), b]) and d not in index.links


def test_a_video_found_directly_as_well_as_through_a_link_is_not_a_linked_one(video_dir, tmp_path):
    library = copy_videos(video_dir, tmp_path / "library")
    (library / "sub" / "again.mp4").symlink_to(library / "a.mp4")
    model, index_path = tiny_model(), tmp_path / "v.index"
    update = index_links(model, library, index_path)
    assert update.added == 4 and VideoIndex.load(index_path).links == {}
    (library / "sub" / "again.mp4").unlink()
    assert index_links(model, library, index_path).removed == []


def test_a_library_reached_through_a_linked_folder_updates_as_any_other(video_dir, tmp_path):
    copy_videos(video_dir, tmp_path / "real")
    library = tmp_path / "library"
    library.symlink_to(tmp_path / "real", target_is_directory=True)
    model, index_path = tiny_model(), tmp_path / "v.index"
    assert index_links(model, library, index_path).added == 4
    assert VideoIndex.load(index_path).links == {}  # the link is the folder given, not one inside it
    assert index_links(model, library, index_path).removed == []  # nothing changed: nothing goes
    (tmp_path / "real" / "b.mp4").unlink()
    update = index_links(model, library, index_path)
    assert update.removed == [str((tmp_path / "real" / "b.mp4").resolve())] and update.total == 3


# ------------------------------------------------------------------------------------- segments


@pytest.fixture(scope="module")
def long_video_dir(tmp_path_factory) -> Path:
    """A 12-second and a 3-second clip (10 frames a second), whose frame colours change with time."""
    root = tmp_path_factory.mktemp("long")
    write_video(root / "long.mp4", num_frames=120)
    write_video(root / "short.mp4", num_frames=30)
    return root


def window_embeddings(model: tempme.TempMe, path: Path, window_s: float) -> tuple[list[list[float]], torch.Tensor]:
    """The spans of a video's windows and their embeddings, computed directly: decode, preprocess, encode."""
    spans, embeddings = [], []
    for window, frames in read_windows(path, FRAMES, 1.0, window_s):
        spans.append([window.start, window.end])
        with torch.no_grad():
            embeddings.append(F.normalize(model.encode_video(frames_to_tensor(frames, 32)[None]), dim=-1)[0])
    return spans, torch.stack(embeddings)


def test_an_index_of_segments_holds_each_windows_own_embedding(long_video_dir, tmp_path):
    model = tiny_model()
    long, short = find_videos([long_video_dir])
    update = update_index(model, [long, short], tmp_path / "s.index", batch_size=3, segment_s=4.0, progress=False)
    assert (update.added, update.total, update.segments, update.skipped) == (2, 2, 4, {})
    index = VideoIndex.load(tmp_path / "s.index")
    assert index.paths == [str(long)] * 3 + [str(short)]
    assert index.spans == [[0.0, 4.0], [4.0, 8.0], [8.0, 12.0], [0.0, 3.0]]
    assert index.settings["segment_s"] == 4.0 and index.videos == 2
    spans, embeddings = zip(window_embeddings(model, long, 4.0), window_embeddings(model, short, 4.0))
    assert index.spans == spans[0] + spans[1]
    torch.testing.assert_close(index.embeddings, torch.cat(embeddings), atol=1e-5, rtol=1e-5)
    # The windows show different frames, so their embeddings differ: rows in the wrong order would show.
    assert torch.pdist(index.embeddings[:3]).min() > 1e-4

    query = encode_queries(model, "a red square")
    expected = (F.normalize(query, dim=-1) @ index.embeddings.T)[0]
    hits = index.search(query, k=4)[0]
    assert [(h.start, h.end) for h in hits] == [tuple(index.spans[i]) for i in expected.argsort(descending=True)]
    assert [h.score for h in hits] == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-5)


def test_an_index_of_whole_videos_stays_version_1_and_segments_make_version_2(long_video_dir, tmp_path):
    model = tiny_model()
    videos = find_videos([long_video_dir])
    update_index(model, videos, tmp_path / "whole.index", progress=False)
    update_index(model, videos, tmp_path / "segments.index", segment_s=4.0, progress=False)
    long, short = (str(v) for v in videos)
    for name, version, rows in (("whole.index", 1, {"paths": [long, short]}), ("segments.index", 2, {"videos": [long, short]})):
        with safe_open(str(tmp_path / name), framework="pt") as handle:
            header = json.loads(handle.metadata()["index"])
            names = set(handle.keys())
        assert header["version"] == version and {key: header.get(key) for key in rows} == rows
        assert names == ({"embeddings"} if version == 1 else {"embeddings", "row_video", "spans"})
    tensors = load_file(str(tmp_path / "segments.index"))
    assert tensors["row_video"].tolist() == [0, 0, 0, 1]
    assert tensors["spans"].tolist() == [[0.0, 4.0], [4.0, 8.0], [8.0, 12.0], [0.0, 3.0]]
    assert VideoIndex.load(tmp_path / "whole.index").search(encode_queries(model, "x"), k=1)[0][0].start is None

    rewrite_header(tmp_path / "segments.index", lambda header: header.pop("videos"))
    with pytest.raises(VideoIndexError, match="no 'videos' entry"):
        VideoIndex.load(tmp_path / "segments.index")
    update_index(model, videos, tmp_path / "damaged.index", segment_s=4.0, progress=False)
    tensors = load_file(str(tmp_path / "damaged.index"))
    with safe_open(str(tmp_path / "damaged.index"), framework="pt") as handle:
        metadata = handle.metadata()
    tensors["row_video"][1] = 2
    save_file(tensors, str(tmp_path / "damaged.index"), metadata=metadata)
    with pytest.raises(VideoIndexError, match="row_video points past the 2 videos listed; index the videos again"):
        VideoIndex.load(tmp_path / "damaged.index")


def test_an_index_keeps_whole_videos_or_its_segment_length(long_video_dir, tmp_path):
    model = tiny_model()
    videos = find_videos([long_video_dir])
    update_index(model, videos, tmp_path / "whole.index", progress=False)
    update_index(model, videos, tmp_path / "segments.index", segment_s=4.0, progress=False)
    with pytest.raises(VideoIndexError, match="built with whole videos, this run has segments of 5 s"):
        update_index(model, videos, tmp_path / "whole.index", segment_s=5.0, progress=False)
    with pytest.raises(VideoIndexError, match="built with segments of 4 s, this run has segments of 2.5 s"):
        update_index(model, videos, tmp_path / "segments.index", segment_s=2.5, progress=False)


def test_an_index_path_may_start_with_the_home_folder(video_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    model = tiny_model()
    videos = find_videos([video_dir])
    update_index(model, videos[:1], "~/v.index", framerate=2.0, progress=False)
    assert (tmp_path / "v.index").is_file()
    assert update_index(model, videos, "~/v.index", progress=False).added == len(videos) - 1  # its framerate
    assert resolve_index_options("~/v.index").framerate == 2.0


def test_an_update_takes_the_settings_the_index_was_built_with(long_video_dir, tmp_path):
    """From Python as on the command line: settings left unset are the index's own."""
    model = tiny_model()
    videos = find_videos([long_video_dir])
    path = tmp_path / "s.index"
    built = update_index(model, videos[:1], path, segment_s=4.0, framerate=2.0, progress=False)
    update = update_index(model, videos, path, progress=False)
    assert update.added == len(videos) - 1 and update.segments > built.segments
    index = VideoIndex.load(path)
    assert (index.settings["segment_s"], index.settings["framerate"], index.settings["precision"]) == (4.0, 2.0, "fp32")
    assert resolve_index_options(path) == IndexOptions(framerate=2.0, segment_s=4.0, backend="pyav", precision="fp32")
    # A new index: the device decides the precision (bf16 on a GPU).
    assert resolve_index_options(tmp_path / "new.index", framerate=3.0) == IndexOptions(3.0, None, "pyav", None)
    with pytest.raises(VideoIndexError, match="built with framerate=2.0, this run has framerate=1.0"):
        update_index(model, videos, path, framerate=1.0, progress=False)


@pytest.mark.parametrize("segment_s", [0.0, 0.5, -1.0, float("nan"), float("inf")])
def test_a_segment_length_must_be_a_second_or_more(long_video_dir, tmp_path, segment_s):
    with pytest.raises(ValueError, match=f"segment_s must be at least 1 second\\(s\\), got {segment_s}"):
        update_index(tiny_model(), find_videos([long_video_dir]), tmp_path / "s.index", segment_s=segment_s,
                     progress=False)


def test_a_video_interrupted_between_its_segments_is_embedded_again_whole(long_video_dir, tmp_path):
    model = tiny_model()
    videos = find_videos([long_video_dir])  # long.mp4 (3 segments), short.mp4 (1)
    update_index(model, videos, tmp_path / "whole.index", segment_s=4.0, batch_size=1, progress=False)

    calls = count_encoded(model)
    original = model.encode_video

    def stop_at_the_second_segment(frames, mask=None):
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(frames, mask)

    model.encode_video = stop_at_the_second_segment
    with pytest.raises(KeyboardInterrupt):
        update_index(model, videos, tmp_path / "resumed.index", segment_s=4.0, batch_size=1, save_every_s=0,
                     progress=False)
    assert VideoIndex.load(tmp_path / "resumed.index").paths == []  # one segment of three is not a video

    model.encode_video = original
    update = update_index(model, videos, tmp_path / "resumed.index", segment_s=4.0, batch_size=1, progress=False)
    assert (update.added, update.segments) == (2, 4)
    whole, resumed = VideoIndex.load(tmp_path / "whole.index"), VideoIndex.load(tmp_path / "resumed.index")
    assert (resumed.paths, resumed.spans) == (whole.paths, whole.spans)
    torch.testing.assert_close(resumed.embeddings, whole.embeddings)


def test_a_changed_video_gets_the_segments_of_its_new_length(long_video_dir, tmp_path):
    videos_dir = copy_videos(long_video_dir, tmp_path / "videos")
    model = tiny_model()
    index_path = tmp_path / "s.index"
    long, short = find_videos([videos_dir])
    update_index(model, [long, short], index_path, segment_s=4.0, progress=False)
    before = VideoIndex.load(index_path)

    write_video(short, num_frames=80)  # 8 s now: two segments where there was one
    update = update_index(model, [long, short], index_path, segment_s=4.0, progress=False)
    assert (update.updated, update.added, update.total, update.segments) == ([str(short)], 0, 2, 5)
    after = VideoIndex.load(index_path)
    assert after.paths == [str(long)] * 3 + [str(short)] * 2
    assert after.spans == before.spans[:3] + [[0.0, 4.0], [4.0, 8.0]]
    torch.testing.assert_close(after.embeddings[:3], before.embeddings[:3])
    torch.testing.assert_close(after.embeddings[3:], window_embeddings(model, short, 4.0)[1], atol=1e-5, rtol=1e-5)

    write_video(long, num_frames=110)  # as many segments as before (11 s): replaced where they were
    update_index(model, [long, short], index_path, segment_s=4.0, progress=False)
    last = VideoIndex.load(index_path)
    assert last.paths == after.paths
    # Windows start at frames: 3.7 s is the first frame at or after a third of 11 s.
    assert last.spans == [[0.0, 3.7], [3.7, 7.4], [7.4, 11.0]] + after.spans[3:]
    torch.testing.assert_close(last.embeddings[:3], window_embeddings(model, long, 4.0)[1], atol=1e-5, rtol=1e-5)


def test_undecodable_videos_and_windows_leave_no_rows(long_video_dir, tmp_path, monkeypatch):
    videos_dir = copy_videos(long_video_dir, tmp_path / "videos")
    broken = write_corrupt(videos_dir / "broken.mp4").resolve()
    long = (videos_dir / "long.mp4").resolve()
    read_windows_original = tempme.data.dataset.read_windows

    def third_window_fails(path, *args):
        for number, window in enumerate(read_windows_original(path, *args)):
            if Path(path) == long and number == 2:
                raise tempme.data.VideoDecodeError(path, "corrupt stream (test)")
            yield window

    monkeypatch.setattr(tempme.data.dataset, "read_windows", third_window_fails)
    model = tiny_model()
    calls = count_encoded(model)
    # A corrupt file fails at once; long.mp4 after two of its three windows, the first of them in
    # the batch that brings its failure: neither leaves a row, nor is that window encoded.
    update = update_index(model, find_videos([videos_dir]), tmp_path / "s.index", segment_s=4.0,
                          batch_size=16, progress=False)
    assert sorted(update.skipped) == sorted([str(broken), str(long)])
    assert update.skipped[str(long)] == "corrupt stream (test) (after 8.0 s)"
    index = VideoIndex.load(tmp_path / "s.index")
    assert index.paths == [str((videos_dir / "short.mp4").resolve())] and update.added == 1
    assert calls == [1]  # short.mp4's one window


def test_per_video_search_keeps_the_best_segment_of_each_video():
    rows = {"a": [[1.0, 0.0], [0.6, 0.8]], "b": [[0.8, 0.6], [0.96, 0.28]], "c": [[0.0, 1.0]]}
    paths = ["a", "a", "b", "c", "b"]
    embeddings = torch.tensor([rows["a"][0], rows["a"][1], rows["b"][0], rows["c"][0], rows["b"][1]])
    spans = [[0.0, 30.0], [30.0, 60.0], [0.0, 30.0], [0.0, 20.0], [30.0, 60.0]]
    index = VideoIndex(paths, embeddings, {}, {"segment_s": 30.0}, spans=spans)
    query = torch.tensor([[2.0, 0.0]])  # scores 1, 0.6, 0.8, 0, 0.96
    every = index.search(query, k=3)[0]
    assert [(h.path, h.start) for h in every] == [("a", 0.0), ("b", 30.0), ("b", 0.0)]
    assert [h.score for h in every] == pytest.approx([1.0, 0.96, 0.8])
    best = index.search(query, k=5, per_video=True)[0]
    assert [(h.rank, h.path, h.start, h.end) for h in best] == [(1, "a", 0.0, 30.0), (2, "b", 30.0, 60.0),
                                                                (3, "c", 0.0, 20.0)]
    assert [h.score for h in best] == pytest.approx([1.0, 0.96, 0.0])
    assert [h.path for h in index.search(query, k=1, per_video=True)[0]] == ["a"]
    assert index.videos == 3 and len(index) == 5


def test_a_video_of_many_windows_counts_once_when_deleted_or_kept(long_video_dir, tmp_path):
    drive, other = copy_videos(long_video_dir, tmp_path / "drive"), tmp_path / "other"
    write_video(other / "e.mp4", num_frames=20)
    model = tiny_model()
    index_path = tmp_path / "s.index"
    update_index(model, find_videos([drive, other]), index_path, segment_s=4.0, sources=[drive, other], progress=False)
    long = str((drive / "long.mp4").resolve())

    (drive / "long.mp4").unlink()  # three windows, one video
    update = update_index(model, find_videos([drive, other]), index_path, segment_s=4.0, sources=[drive, other],
                          progress=False)
    assert (update.removed, update.total, update.segments) == ([long], 2, 2)

    write_video(drive / "long.mp4", num_frames=120)
    update_index(model, find_videos([drive, other]), index_path, segment_s=4.0, sources=[drive, other], progress=False)
    shutil.rmtree(drive)  # an unmounted drive: its two videos (four windows) stay
    with pytest.warns(UserWarning, match="the 2 video\\(s\\) indexed from it stay"):
        update = update_index(model, find_videos([other]), index_path, segment_s=4.0, sources=[drive, other],
                              progress=False)
    assert (update.removed, update.total, update.segments) == ([], 3, 5)


def test_an_update_without_model_info_keeps_the_weights_the_index_names(video_dir, tmp_path):
    videos, model, index_path = index_a_copy(video_dir, tmp_path, model_info={"weights": "/models/clip.pt"})
    os.utime(videos / "a.mp4", ns=(1, 1))  # changed: the next update embeds it again
    update = update_index(model, find_videos([videos]), index_path, progress=False)
    assert update.updated == [str((videos / "a.mp4").resolve())]
    assert VideoIndex.load(index_path).model["weights"] == "/models/clip.pt"


def test_an_optimised_model_needs_the_fingerprint_of_the_weights_it_was_loaded_from(video_dir, tmp_path):
    model = tiny_model()
    fingerprint = model_fingerprint(model)
    model.optimize_for_inference()
    one_video = str(video_dir / "a.mp4")  # a single path, as a string
    with pytest.raises(ValueError, match="take fingerprint=model_fingerprint\\(model\\) before optimising"):
        update_index(model, one_video, tmp_path / "v.index", progress=False)
    update = update_index(model, one_video, tmp_path / "v.index", fingerprint=fingerprint, progress=False)
    assert update.added == 1 and VideoIndex.load(tmp_path / "v.index").model["fingerprint"] == fingerprint
    assert find_videos(str(video_dir)) == find_videos([video_dir])
    with pytest.raises(ValueError, match="is a folder: update_index takes video files"):
        update_index(model, str(video_dir), tmp_path / "v.index", fingerprint=fingerprint, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a source given as a string is one folder, not its characters
        update_index(model, one_video, tmp_path / "v.index", fingerprint=fingerprint, sources=str(video_dir),
                     progress=False)


def test_indexing_builds_no_autograd_graph_with_a_trainable_model(video_dir, tmp_path, monkeypatch):
    seen = []
    model = tiny_model()
    encode = model.encode_video

    def watched(*args, **kwargs):
        embeddings = encode(*args, **kwargs)
        seen.append((torch.is_grad_enabled(), embeddings.requires_grad))
        return embeddings

    monkeypatch.setattr(model, "encode_video", watched)
    assert any(p.requires_grad for p in model.parameters())  # as load_model gives it: LoRA and CPE trainable
    update_index(model, find_videos([video_dir]), tmp_path / "v.index", progress=False)
    assert seen and all(state == (False, False) for state in seen)


def test_an_index_of_tempme_0_1_is_updated_with_a_warning_about_rotated_videos(video_dir, tmp_path):
    videos, model, index_path = index_a_copy(video_dir, tmp_path)
    index = VideoIndex.load(index_path)
    del index.settings["decoding"]  # as tempme 0.1 wrote it
    index.save(index_path)
    write_video(videos / "e.mp4", num_frames=25)
    with pytest.warns(UserWarning, match="built by tempme 0.1, which read videos stored with a rotation"):
        assert update_index(model, find_videos([videos]), index_path, progress=False).added == 1
    assert "decoding" not in VideoIndex.load(index_path).settings  # its older embeddings are still 0.1's


def test_an_index_keeps_to_the_decoder_that_built_it(video_dir, tmp_path, monkeypatch):
    _, model, index_path = index_a_copy(video_dir, tmp_path)
    monkeypatch.setattr("tempme.search.check_backend", lambda backend: None)  # whether decord is installed or not
    assert "backend" not in VideoIndex.load(index_path).settings  # PyAV's: as indexes before it was recorded
    with pytest.raises(VideoIndexError, match="built with the pyav decoder, this run has the decord decoder"):
        update_index(model, find_videos([video_dir]), index_path, backend="decord", progress=False)


def test_a_missing_decoder_is_refused_before_an_index_is_written(video_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # as where decord is not installed
    index_path = tmp_path / "v.index"
    with pytest.raises(ValueError, match="backend='decord' needs the optional decord package"):
        update_index(tiny_model(), find_videos([video_dir]), index_path, backend="decord", progress=False)
    assert not index_path.exists()


def test_a_new_index_that_failed_before_any_video_is_not_written(video_dir, tmp_path, monkeypatch):
    # Its settings would bind the next run, with nothing in it worth keeping.
    model = tiny_model()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "encode_video", broken)
    index_path = tmp_path / "v.index"
    with pytest.raises(RuntimeError, match="out of memory"):
        update_index(model, find_videos([video_dir]), index_path, progress=False)
    assert not index_path.exists()
