"""The eval embedding cache (tempme_train.evaluate) is keyed by the video files, not only by their ids."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import tempme
from tempme.data import load_custom
from tempme.data.cache import FrameCache
from tempme.data.video import BACKENDS, VideoDecodeError
from tempme_train.config import DataSettings
from tempme_train.evaluate import EvalSet, VideoProgress, cache_key, evaluate

from data_fixtures import write_corrupt, write_video
from tiny_models import register_tiny_preset

PRESET = register_tiny_preset("test-tiny-eval-cache")
FRAMES = 4

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:skipping video")]


@pytest.fixture(scope="module")
def model() -> tempme.TempMe:
    return tempme.create_model(PRESET, method="tempme", frames=FRAMES).eval()


def annotations(root: Path) -> Path:
    path = root / "captions.csv"
    path.write_text("video,caption\nclips/a.mp4,a red car\nclips/b.mp4,a blue boat\n", encoding="utf-8")
    return path


def settings(**changes) -> DataSettings:
    return DataSettings(dataset="custom", max_frames=FRAMES, image_size=32, num_workers=0, **changes)


def run(model, anno: Path, video_dir: Path, cache: Path, frame_cache: FrameCache | None = None, progress: bool = False,
        **data):
    eval_set = EvalSet.from_items(load_custom(anno, video_dir), settings(**data), "custom/test", frame_cache)
    return evaluate(model, eval_set, batch_size=2, cache_dir=cache, progress=progress)


def test_another_video_dir_is_not_answered_from_the_cache(model, tmp_path):
    anno = annotations(tmp_path)
    broken, good = tmp_path / "A", tmp_path / "B"
    write_video(broken / "clips" / "a.mp4")
    write_corrupt(broken / "clips" / "b.mp4")
    write_video(good / "clips" / "a.mp4")
    write_video(good / "clips" / "b.mp4", num_frames=30)
    first = run(model, anno, broken, tmp_path / "cache")
    assert first["skipped"] == ["clips/b.mp4"]
    second = run(model, anno, good, tmp_path / "cache")
    assert second["skipped"] == [] and second["num_videos"] == 2
    assert second["cache"] != first["cache"]
    # The same folder again is answered from the cache.
    assert run(model, anno, good, tmp_path / "cache")["cache"] == second["cache"]


def test_a_mended_video_is_embedded_again(model, tmp_path):
    anno = annotations(tmp_path)
    write_video(tmp_path / "clips" / "a.mp4")
    corrupt = write_corrupt(tmp_path / "clips" / "b.mp4")
    assert run(model, anno, tmp_path, tmp_path / "cache")["skipped"] == ["clips/b.mp4"]
    write_video(corrupt, num_frames=30)
    assert run(model, anno, tmp_path, tmp_path / "cache")["skipped"] == []


def test_a_touched_video_is_embedded_again(model, tmp_path):
    anno = annotations(tmp_path)
    write_video(tmp_path / "clips" / "a.mp4")
    video = write_video(tmp_path / "clips" / "b.mp4")
    first = run(model, anno, tmp_path, tmp_path / "cache")
    info = video.stat()
    os.utime(video, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))  # same size, newer
    assert run(model, anno, tmp_path, tmp_path / "cache")["cache"] != first["cache"]


def test_a_strict_run_is_not_answered_by_a_lenient_one(model, tmp_path):
    anno = annotations(tmp_path)
    write_video(tmp_path / "clips" / "a.mp4")
    write_corrupt(tmp_path / "clips" / "b.mp4")
    assert run(model, anno, tmp_path, tmp_path / "cache")["skipped"] == ["clips/b.mp4"]
    with pytest.raises(VideoDecodeError, match="b.mp4"):
        run(model, anno, tmp_path, tmp_path / "cache", strict=True)


def test_frame_cache_and_decoder_settings_enter_the_key(model, tmp_path):
    anno = annotations(tmp_path)
    write_video(tmp_path / "clips" / "a.mp4")
    write_video(tmp_path / "clips" / "b.mp4", num_frames=30)
    plain = run(model, anno, tmp_path, tmp_path / "cache")["cache"]
    frames = FrameCache(tmp_path / "frames", FRAMES, 1.0, 32)
    assert run(model, anno, tmp_path, tmp_path / "cache", frames)["cache"] != plain
    # (Not run: decord is an optional dependency.)
    items = load_custom(anno, tmp_path)
    keys = {cache_key(model, EvalSet.from_items(items, settings(backend=b), "custom/test"), "fp32") for b in BACKENDS}
    assert len(keys) == len(BACKENDS)


def test_an_interrupted_evaluation_carries_on_with_the_videos_it_embedded(model, tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    rows = ["video,caption"]
    for i in range(7):  # batches of 2: four batches, the fourth of one video
        write_video(root / "clips" / f"v{i}.mp4", num_frames=10 + 3 * i)
        rows.append(f"clips/v{i}.mp4,clip number {i}")
    write_corrupt(root / "clips" / "v3.mp4")  # undecodable: done too, not tried again
    anno = root / "captions.csv"
    anno.write_text("\n".join(rows) + "\n", encoding="utf-8")
    expected = run(model, anno, root, tmp_path / "uninterrupted")

    real_encode, videos_encoded = model.encode_video, []

    def encode_then_stop(frames, *args, **kwargs):
        if len(videos_encoded) >= 3:  # two batches went through: v0 v1, and v2 (v3 is undecodable)
            raise KeyboardInterrupt
        videos_encoded.extend(range(frames.shape[0]))
        return real_encode(frames, *args, **kwargs)

    monkeypatch.setattr(model, "encode_video", encode_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(model, anno, root, tmp_path / "cache", progress=True)
    assert [p.name.split(".", 1)[1] for p in (tmp_path / "cache").iterdir()] == ["0-of-1.partial"]
    partial = next((tmp_path / "cache").iterdir())
    assert f"4 of 7 videos embedded are kept in {partial}: the same command carries on from there\n" \
        in capsys.readouterr().err  # v0 to v3, v3 found undecodable

    monkeypatch.setattr(model, "encode_video", lambda frames, *a, **k: (videos_encoded.extend(range(frames.shape[0])),
                                                                     real_encode(frames, *a, **k))[1])
    videos_encoded.clear()
    resumed = run(model, anno, root, tmp_path / "cache")
    assert len(videos_encoded) == 3  # v4, v5 and v6: v3 was found undecodable, and is not tried again
    for direction in ("t2v", "v2t"):
        assert resumed[direction] == expected[direction]
    assert resumed["skipped"] == expected["skipped"] == ["clips/v3.mp4"]
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".safetensors"]  # the partial file is gone


def test_partial_embeddings_are_kept_as_they_go_and_a_place_that_cannot_take_them_is_said_once(model, tmp_path):
    from tempme_train.evaluate import encode_videos

    root = tmp_path / "data"
    for name in ("a", "b", "c"):
        write_video(root / "clips" / f"{name}.mp4", num_frames=12)
    anno = root / "captions.csv"
    anno.write_text("video,caption\nclips/a.mp4,one\nclips/b.mp4,two\nclips/c.mp4,three\n", encoding="utf-8")
    eval_set = EvalSet.from_items(load_custom(anno, root), settings(), "custom/test")
    partial = tmp_path / "kept.partial"
    seen = []

    real_save = VideoProgress.save

    def recording_save(self, path):
        seen.append(int(self.done.sum()))
        return real_save(self, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VideoProgress, "save", recording_save)
        video, present = encode_videos(model, eval_set, 1, torch.device("cpu"), "fp32", 0, False, partial, save_every_s=0)
    assert seen == [1, 2, 3] and present.all()  # after every batch, with save_every_s=0
    kept = VideoProgress.load(partial, 3, video.shape[1])
    torch.testing.assert_close(kept.video, video)

    blocked = tmp_path / "a-file" / "kept.partial"  # its folder is a file
    blocked.parent.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not keep the videos embedded so far") as caught:
        _, present = encode_videos(model, eval_set, 1, torch.device("cpu"), "fp32", 0, False, blocked, save_every_s=0)
    assert present.all() and len([w for w in caught if "could not keep" in str(w.message)]) == 1


def test_partial_files_go_once_the_cache_is_written(model, tmp_path):
    anno = annotations(tmp_path)
    write_video(tmp_path / "v" / "clips" / "a.mp4")
    write_video(tmp_path / "v" / "clips" / "b.mp4", num_frames=30)
    eval_set = EvalSet.from_items(load_custom(anno, tmp_path / "v"), settings(), "custom/test")
    key = cache_key(model, eval_set, "fp32")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{key}.1-of-2.partial").write_bytes(b"left by a run on two processes")
    (cache / "other.1-of-2.partial").write_bytes(b"another key's")
    with pytest.warns(UserWarning, match=rf"interrupted evaluation on 2 processes \({key}.1-of-2.partial\), which 1 "
                      "cannot read: this run embeds them again"):
        evaluate(model, eval_set, batch_size=2, cache_dir=cache, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{key}.safetensors", "other.1-of-2.partial"])
