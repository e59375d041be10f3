"""Retrieval datasets and bad-video handling (tempme.data.dataset)."""

from __future__ import annotations

import os
import pickle
import signal
import time
import warnings

import pytest
import torch
from data_fixtures import build_msrvtt, build_video_files
from torch.utils.data import DataLoader

from tempme.data.annotations import VideoItem, load_msrvtt
from tempme.data.cache import FrameCache
from tempme.data.dataset import (
    RetrievalPairs,
    RetrievalVideos,
    collate_skip_bad,
    flatten_captions,
    loader_batches,
    quiet_worker_init,
)
from tempme.data.video import SkippedVideo, VideoDecodeError

SIZE = 32
FRAMES = 4


def fake_tokenize(texts: list[str], max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Word lengths as ids: enough to check which caption a sample carries."""
    ids = torch.zeros(len(texts), max_words, dtype=torch.long)
    for row, text in enumerate(texts):
        lengths = [len(word) for word in text.split()][:max_words]
        ids[row, : len(lengths)] = torch.tensor(lengths)
    return ids, (ids > 0).long()


@pytest.fixture(scope="module")
def video_files(tmp_path_factory):
    return build_video_files(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def msrvtt_dir(tmp_path_factory):
    return build_msrvtt(tmp_path_factory.mktemp("msrvtt"))


@pytest.fixture
def mixed_items(video_files):
    return [
        VideoItem("good", video_files.mp4, ["a b", "ccc"]),
        VideoItem("corrupt", video_files.corrupt, ["dd"]),
        VideoItem("empty", video_files.empty, ["e"]),
        VideoItem("good_mkv", video_files.mkv, ["ffff ff"]),
    ]


def _pairs(items, **kwargs):
    return RetrievalPairs(items, fake_tokenize, max_words=8, max_frames=FRAMES, image_size=SIZE, **kwargs)


def test_pairs_one_sample_per_caption(mixed_items):
    dataset = _pairs(mixed_items)
    assert len(dataset) == 5
    sample = dataset[1]
    assert sample["video"].shape == (FRAMES, 3, SIZE, SIZE) and sample["video"].dtype == torch.float32
    assert sample["video_mask"].tolist() == [1] * FRAMES and sample["video_mask"].dtype == torch.long
    assert sample["text_ids"].tolist() == [3, 0, 0, 0, 0, 0, 0, 0]
    assert sample["text_mask"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert (sample["index"], sample["video_id"]) == (1, "good")


@pytest.mark.parametrize(("index", "name"), [(2, "corrupt.mp4"), (3, "empty.mp4")])
def test_bad_video_is_skipped_with_warning_naming_the_file(mixed_items, index, name):
    dataset = _pairs(mixed_items)
    with pytest.warns(UserWarning, match=name):
        sample = dataset[index]
    assert isinstance(sample, SkippedVideo) and sample.path.name == name and sample.video_id == name.split(".")[0]


def test_strict_reraises(mixed_items):
    with pytest.raises(VideoDecodeError, match="corrupt.mp4"):
        _pairs(mixed_items, strict=True)[2]


def test_strict_error_from_a_loader_worker_is_one_line_naming_the_file(mixed_items, video_files):
    videos = RetrievalVideos(mixed_items[:2], max_frames=FRAMES, image_size=SIZE, strict=True)
    loader = DataLoader(videos, batch_size=2, num_workers=1, collate_fn=collate_skip_bad)
    with pytest.raises(VideoDecodeError) as info:
        next(iter(loader))
    message = str(info.value)
    assert "\n" not in message and str(video_files.corrupt) in message and "unreadable container" in message


def test_collate_drops_bad_samples_and_reports_them(mixed_items):
    dataset = _pairs(mixed_items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = collate_skip_bad([dataset[i] for i in range(len(dataset))])
    assert batch["video"].shape == (3, FRAMES, 3, SIZE, SIZE)
    assert batch["text_ids"].shape == (3, 8) and batch["video_mask"].shape == (3, FRAMES)
    assert batch["index"].tolist() == [0, 1, 4]
    assert batch["video_id"] == ["good", "good", "good_mkv"]
    assert batch["skipped"] == ["corrupt", "empty"]


def test_collate_all_bad_returns_none():
    assert collate_skip_bad([SkippedVideo("x", None, "r"), None]) is None


def test_dataloader_with_collate(mixed_items):
    loader = DataLoader(_pairs(mixed_items), batch_size=5, collate_fn=collate_skip_bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (batch,) = list(loader)
    assert batch["video"].shape[0] == 3 and batch["skipped"] == ["corrupt", "empty"]


def test_worker_processes_report_skipped_ids_through_batches(mixed_items):
    dataset = _pairs(mixed_items, augment=True)
    loader = DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate_skip_bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert sorted(video_id for batch in batches for video_id in batch["skipped"]) == ["corrupt", "empty"]
    assert sum(batch["video"].shape[0] for batch in batches) == 3


def test_datasets_pickle_for_spawned_workers(mixed_items):
    restored = pickle.loads(pickle.dumps(_pairs(mixed_items, augment=True)))
    assert restored[0]["video"].shape == (FRAMES, 3, SIZE, SIZE)


def test_augmented_sample_keeps_shape(mixed_items):
    sample = _pairs(mixed_items, augment=True)[0]
    assert sample["video"].shape == (FRAMES, 3, SIZE, SIZE)


def test_videos_dataset_and_captions(msrvtt_dir):
    items = load_msrvtt(msrvtt_dir.anno_dir, msrvtt_dir.video_dir, "test")
    dataset = RetrievalVideos(items, max_frames=FRAMES, image_size=SIZE)
    assert len(dataset) == 2
    sample = dataset[1]
    assert set(sample) == {"video", "video_mask", "index", "video_id"}
    assert sample["video"].shape == (FRAMES, 3, SIZE, SIZE) and sample["video_id"] == "video9771"
    assert dataset.captions() == (
        ["a person is connecting something to system", "a little girl does gymnastics"],
        [0, 1],
    )


def test_videos_dataset_skips_missing_video(tmp_path):
    dataset = RetrievalVideos(
        [VideoItem("gone", tmp_path / "gone.mp4", ["x"])], max_frames=FRAMES, image_size=SIZE
    )
    with pytest.warns(UserWarning, match="gone.mp4"):
        assert isinstance(dataset[0], SkippedVideo)


def test_flatten_captions():
    items = [
        VideoItem("a", None, ["1", "2"]),
        VideoItem("b", None, ["3"]),
        VideoItem("c", None, ["4", "5"]),
    ]
    assert flatten_captions(items) == (["1", "2", "3", "4", "5"], [0, 0, 1, 2, 2])


def test_frame_cache_gives_the_same_eval_tensors(mixed_items, tmp_path):
    good = [mixed_items[0]]
    cache = FrameCache(tmp_path, max_frames=FRAMES, image_size=SIZE)
    plain = RetrievalVideos(good, max_frames=FRAMES, image_size=SIZE)[0]
    cached = RetrievalVideos(good, max_frames=FRAMES, image_size=SIZE, frame_cache=cache)
    first, second = cached[0], cached[0]  # the first call fills the cache, the second reads it
    assert cache.get(good[0]) is not None
    torch.testing.assert_close(first["video"], plain["video"])
    torch.testing.assert_close(second["video"], plain["video"])


def test_frame_cache_settings_must_match(mixed_items, tmp_path):
    with pytest.raises(ValueError, match="frame cache settings"):
        _pairs(mixed_items, frame_cache=FrameCache(tmp_path, max_frames=FRAMES + 1, image_size=SIZE))


def test_loader_workers_leave_stops_to_the_main_process():
    """Ctrl-C and a process-group SIGTERM reach the workers too: a worker goes on through Ctrl-C and
    the first SIGTERM (the main process decides when to stop, and shuts the loader down), and leaves,
    without failing, at the second SIGTERM, which that shutdown sends to a worker slow to finish."""
    import multiprocessing
    import signal

    from tempme.data import quiet_worker_init

    import time

    import tempme.data.dataset as dataset

    def worker(init, signals, then_wait):
        if init:
            dataset.SIGTERM_GRACE_S = 1
            quiet_worker_init(0)
        for signum in signals:
            signal.raise_signal(signum)
        time.sleep(then_wait)
        os._exit(3)  # went on past the signals

    context = multiprocessing.get_context("fork")
    exit_codes = []
    for init, signals, then_wait in [(False, [signal.SIGTERM], 0), (True, [signal.SIGINT, signal.SIGTERM], 0),
                                     (True, [signal.SIGTERM, signal.SIGTERM], 0),
                                     # One SIGTERM and nothing more (Python's exit waiting on the worker): it
                                     # leaves when the grace period (1 s here) is over.
                                     (True, [signal.SIGTERM], 20)]:
        process = context.Process(target=worker, args=(init, signals, then_wait))
        started = time.monotonic()
        process.start()
        process.join(30)
        exit_codes.append(process.exitcode)
    assert exit_codes == [-signal.SIGTERM, 3, 0, 0]
    assert time.monotonic() - started < 10


class WorkerPids(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, index):
        return os.getpid()


def test_a_loader_goes_on_through_a_sigterm_to_its_worker():
    """The whole DataLoader: a SIGTERM that reaches its worker (as a process-group stop does) is no
    failure, and every batch still comes."""
    import signal

    from tempme.data import quiet_worker_init

    loader = torch.utils.data.DataLoader(WorkerPids(), batch_size=1, num_workers=1, worker_init_fn=quiet_worker_init)
    pids = []
    for batch in loader:
        if not pids:
            os.kill(int(batch[0]), signal.SIGTERM)
        pids.append(int(batch[0]))
    assert len(pids) == 6 and len(set(pids)) == 1


class StuckAfterTheFirst(torch.utils.data.Dataset):
    """Its second item never comes, and no signal handler runs meanwhile: a decoder stuck in C code."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        if index > 0:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGALRM})
            time.sleep(600)
        return index


def test_loader_workers_that_no_signal_reaches_are_killed_on_the_way_out(monkeypatch):
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)  # torch's waits, shortened
    loader = DataLoader(StuckAfterTheFirst(), batch_size=1, num_workers=1, worker_init_fn=quiet_worker_init)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with loader_batches(loader) as batches:
            assert next(batches).tolist() == [0]
            workers = list(batches._workers)
            raise KeyboardInterrupt  # Ctrl-C while the worker is stuck on the next item
    assert workers and not any(worker.is_alive() for worker in workers)
    assert time.monotonic() - started < 30
