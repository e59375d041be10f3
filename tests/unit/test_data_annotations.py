"""Annotation loaders (tempme.data.annotations)."""

from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path

import pytest
from data_fixtures import (
    DIDEMO_VIDEOS,
    LSMDC_BROKEN,
    LSMDC_CLIP,
    LSMDC_CLIP_2,
    build_activitynet,
    build_custom,
    build_didemo,
    build_lsmdc,
    build_msrvtt,
)

from tempme.data.annotations import (
    AnnotationError,
    MissingVideosError,
    VideoItem,
    check_videos_exist,
    load_activitynet,
    load_custom,
    load_dataset,
    load_didemo,
    load_lsmdc,
    load_msrvtt,
    require_videos,
)


@pytest.fixture(scope="module")
def msrvtt_dir(tmp_path_factory):
    return build_msrvtt(tmp_path_factory.mktemp("msrvtt"))


@pytest.fixture(scope="module")
def didemo_dir(tmp_path_factory):
    return build_didemo(tmp_path_factory.mktemp("didemo"))


@pytest.fixture(scope="module")
def activitynet_dir(tmp_path_factory):
    return build_activitynet(tmp_path_factory.mktemp("activitynet"))


@pytest.fixture(scope="module")
def lsmdc_dir(tmp_path_factory):
    return build_lsmdc(tmp_path_factory.mktemp("lsmdc"))


@pytest.fixture(scope="module")
def custom_dir(tmp_path_factory):
    return build_custom(tmp_path_factory.mktemp("custom"))


def _by_id(items):
    return {item.video_id: item for item in items}


class TestMsrvtt:
    def test_train_groups_all_captions_per_video(self, msrvtt_dir):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            items = load_msrvtt(msrvtt_dir.anno_dir, msrvtt_dir.video_dir, "train")
        assert [item.video_id for item in items] == ["video0", "video1", "video2", "video3"]
        assert items[0].captions == [
            "a cartoon animals runs through an ice cave in a video game",
            "a character runs in a game",
        ]
        assert items[1].captions == ["a man talks about cars", "a car review"]
        assert items[0].path == msrvtt_dir.video_dir / "video0.mp4"
        assert (items[0].start, items[0].end) == (None, None)

    def test_train7k(self, msrvtt_dir):
        items = load_msrvtt(msrvtt_dir.anno_dir, msrvtt_dir.video_dir, "train7k")
        assert [item.video_id for item in items] == ["video0", "video1"]

    def test_test_split_is_jsfusion_with_webm_fallback(self, msrvtt_dir):
        items = load_msrvtt(msrvtt_dir.anno_dir, msrvtt_dir.video_dir, "test")
        assert [(i.video_id, i.captions) for i in items] == [
            ("video9770", ["a person is connecting something to system"]),
            ("video9771", ["a little girl does gymnastics"]),
        ]
        assert items[1].path == msrvtt_dir.video_dir / "video9771.webm"

    def test_no_val_split_so_test_is_never_used_for_model_selection(self, msrvtt_dir):
        with pytest.raises(AnnotationError, match="unknown MSRVTT split 'val'"):
            load_msrvtt(msrvtt_dir.anno_dir, msrvtt_dir.video_dir, "val")

    def test_unknown_split(self, msrvtt_dir):
        with pytest.raises(AnnotationError, match="unknown MSRVTT split 'dev'"):
            load_msrvtt(msrvtt_dir.anno_dir, msrvtt_dir.video_dir, "dev")

    def test_missing_column_names_file_and_header(self, tmp_path):
        (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video,sentence\nret0,m,video1,hi\n")
        with pytest.raises(AnnotationError) as info:
            load_msrvtt(tmp_path, tmp_path, "test")
        message = str(info.value)
        assert "MSRVTT_JSFUSION_test.csv" in message and "line 1" in message and "video_id" in message
        assert isinstance(info.value, ValueError)

    def test_empty_value_names_line_and_field(self, tmp_path):
        rows = "key,vid_key,video_id,sentence\nret0,m,video1,ok\nret1,m,video2\n"
        (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(rows)
        with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test.csv: line 3: field 'sentence'"):
            load_msrvtt(tmp_path, tmp_path, "test")

    def test_sentences_of_wrong_shape(self, tmp_path):
        (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\n")
        (tmp_path / "MSRVTT_data.json").write_text(
            json.dumps({"sentences": [{"caption": "x", "video_id": 3}]})
        )
        with pytest.raises(
            AnnotationError, match=r"MSRVTT_data.json: field 'sentences\[0\].video_id'.*got 3"
        ):
            load_msrvtt(tmp_path, tmp_path, "train")

    @pytest.mark.parametrize(
        "entry, field, shown",
        [
            ({"video_id": "video0"}, "sentences[0].caption", "(the field is missing)"),
            ({"video_id": "video0", "caption": None}, "sentences[0].caption", "(got None)"),
            ({"video_id": "video0", "caption": 5}, "sentences[0].caption", "(got 5)"),
            (5, "sentences[0]", "(got 5)"),
        ],
    )
    def test_a_bad_sentence_names_the_field_and_its_value_once(self, tmp_path, entry, field, shown):
        (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\n")
        (tmp_path / "MSRVTT_data.json").write_text(json.dumps({"sentences": [entry]}))
        with pytest.raises(AnnotationError) as info:
            load_msrvtt(tmp_path, tmp_path, "train")
        message = str(info.value)
        assert message.startswith(f"{tmp_path / 'MSRVTT_data.json'}: field '{field}': expected ")
        assert message.endswith(shown) and message.count("(") == 1

    def test_json_without_sentences(self, tmp_path):
        (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\n")
        (tmp_path / "MSRVTT_data.json").write_text(json.dumps([1, 2]))
        with pytest.raises(
            AnnotationError, match="MSRVTT_data.json: expected an object with a 'sentences' list"
        ):
            load_msrvtt(tmp_path, tmp_path, "train")

    def test_invalid_json_reports_line(self, tmp_path):
        (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\n")
        (tmp_path / "MSRVTT_data.json").write_text('{"sentences": [\n  {"caption": }\n]}')
        with pytest.raises(AnnotationError, match="MSRVTT_data.json: line 2: invalid JSON"):
            load_msrvtt(tmp_path, tmp_path, "train")

    def test_train_video_without_captions_warns_and_is_left_out(self, tmp_path):
        (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo8\n")
        sentences = {"sentences": [{"caption": "x", "video_id": "video0"}]}
        (tmp_path / "MSRVTT_data.json").write_text(json.dumps(sentences))
        listed_in, no_captions_in = tmp_path / "MSRVTT_train.9k.csv", tmp_path / "MSRVTT_data.json"
        with pytest.warns(UserWarning, match=rf"1 video\(s\) listed in {listed_in} have no captions in "
                                             rf"{no_captions_in} .*video8"):
            items = load_msrvtt(tmp_path, tmp_path, "train")
        assert [item.video_id for item in items] == ["video0"]

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="MSRVTT_train.9k.csv"):
            load_msrvtt(tmp_path, tmp_path, "train")


# A video, a zip or a Windows-1252 export named as an annotation file: bytes that are not UTF-8.
NOT_UTF8 = b"video_id\nvideo0\nvid\xe9o1\n"


@pytest.mark.parametrize(
    "name, load",
    [
        ("MSRVTT_train.9k.csv", lambda d: load_dataset("msrvtt", d, d, "train")),
        ("val_list.txt", lambda d: load_dataset("didemo", d, d, "val")),
        ("val_ids.json", lambda d: load_dataset("activitynet", d, d, "val")),
        ("LSMDC16_annos_val.csv", lambda d: load_dataset("lsmdc", d, d, "val")),
        ("anno.csv", lambda d: load_dataset("custom", d / "anno.csv", None)),
        ("anno.jsonl", lambda d: load_dataset("custom", d / "anno.jsonl", None)),
    ],
)
def test_a_file_that_is_not_utf8_text_is_named(tmp_path, name, load):
    (tmp_path / name).write_bytes(NOT_UTF8)
    with pytest.raises(AnnotationError) as info:  # not the codec's bare UnicodeDecodeError
        load(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / name}: line 3: not UTF-8 text (byte 0xe9); annotation files must be UTF-8 text"
    )


def test_an_unreadable_file_says_why(tmp_path, monkeypatch):
    path = tmp_path / "anno.csv"
    path.write_text("video,caption\na.mp4,hello\n")
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads any file: make reading it fail as it would for another user
        real_read_bytes = Path.read_bytes

        def refusing_read_bytes(self):
            if self == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", refusing_read_bytes)
    with pytest.raises(AnnotationError) as info:
        load_custom(path)
    assert str(info.value) == f"{path}: cannot read (Permission denied)"


class TestDidemo:
    def test_paragraph_per_video_in_file_order(self, didemo_dir):
        with pytest.warns(UserWarning, match="99999999@N00_1_abc.mp4"):
            items = load_didemo(didemo_dir.anno_dir, didemo_dir.video_dir, "train")
        first, second = DIDEMO_VIDEOS
        assert [item.video_id for item in items] == [first, second]
        assert items[0].captions == ["someone kicks the bug towards some rocks. the bug flips over."]
        assert items[1].captions == ["a dog runs."]
        assert (items[0].start, items[0].end) == (0.0, 31.0)

    def test_files_found_by_exact_name_or_xclip_mp4(self, didemo_dir):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            items = load_didemo(didemo_dir.anno_dir, didemo_dir.video_dir, "train")
        first, second = DIDEMO_VIDEOS
        assert items[0].path == didemo_dir.video_dir / first
        assert items[1].path == didemo_dir.video_dir / "sub" / f"{second}.mp4"
        assert check_videos_exist(items) == []

    def test_test_split(self, didemo_dir):
        items = load_didemo(didemo_dir.anno_dir, didemo_dir.video_dir, "test")
        assert [(i.video_id, i.captions) for i in items] == [(DIDEMO_VIDEOS[0], ["a bug."])]

    def test_data_must_be_a_list(self, tmp_path):
        (tmp_path / "val_list.txt").write_text("a.mp4\n")
        (tmp_path / "val_data.json").write_text(json.dumps({"a.mp4": {"text": ["x"]}}))
        with pytest.raises(AnnotationError, match="val_data.json: expected a JSON list"):
            load_didemo(tmp_path, tmp_path, "val")

    def test_entry_missing_description(self, tmp_path):
        (tmp_path / "val_list.txt").write_text("a.mp4\n")
        (tmp_path / "val_data.json").write_text(json.dumps([{"video": "a.mp4", "times": [[0, 0]]}]))
        with pytest.raises(AnnotationError, match=r"val_data.json: field '\[0\].description'"):
            load_didemo(tmp_path, tmp_path, "val")


class TestActivityNet:
    def test_a_missing_video_is_reported_where_it_was_looked_for(self, activitynet_dir, tmp_path):
        items = load_activitynet(activitynet_dir.anno_dir, tmp_path, "train")  # a folder without the videos
        assert [str(item.path) for item in check_videos_exist(items)] == [
            str(tmp_path / "**" / f"{item.video_id}.*") for item in items]  # any extension, in any subfolder

    def test_val_1_is_the_val_split_by_either_name(self, activitynet_dir):
        val = load_activitynet(activitynet_dir.anno_dir, activitynet_dir.video_dir, "val")
        assert val and load_activitynet(activitynet_dir.anno_dir, activitynet_dir.video_dir, "val_1") == val

    def test_train(self, activitynet_dir):
        items = _by_id(load_activitynet(activitynet_dir.anno_dir, activitynet_dir.video_dir, "train"))
        assert list(items) == ["QOlSCBRmfWY", "ehGHCYKzyZ8"]
        dancing = items["QOlSCBRmfWY"]
        assert dancing.captions == [
            "A young woman is seen standing in a room and leads into her dancing."
            "  The girl dances around the room while the camera captures her movements."
            "  She continues dancing around the room and ends by laying on the floor."
        ]
        assert (dancing.start, dancing.end) == (0.0, 83.0)
        assert dancing.path == activitynet_dir.video_dir / "part1" / "QOlSCBRmfWY.mp4"
        assert items["ehGHCYKzyZ8"].path == activitynet_dir.video_dir / "ehGHCYKzyZ8.mkv"

    def test_val_is_val_1(self, activitynet_dir):
        items = load_activitynet(activitynet_dir.anno_dir, activitynet_dir.video_dir, "val")
        assert [(i.video_id, i.captions) for i in items] == [("AAAAAAAAAAA", ["One.  Two."])]

    def test_unknown_split(self, activitynet_dir):
        with pytest.raises(AnnotationError, match="unknown ActivityNet split 'val_2'"):
            load_activitynet(activitynet_dir.anno_dir, activitynet_dir.video_dir, "val_2")

    def test_sentences_must_be_strings(self, tmp_path):
        (tmp_path / "val_ids.json").write_text(json.dumps(["v_x"]))
        (tmp_path / "val_1.json").write_text(
            json.dumps({"v_x": {"duration": 3, "sentences": "one sentence"}})
        )
        with pytest.raises(AnnotationError, match=r"val_1.json: field 'v_x.sentences'.*'one sentence'"):
            load_activitynet(tmp_path, tmp_path, "val")

    def test_ids_must_be_a_list(self, tmp_path):
        (tmp_path / "val_ids.json").write_text(json.dumps({"v_x": 1}))
        (tmp_path / "val_1.json").write_text("{}")
        with pytest.raises(AnnotationError, match="val_ids.json: expected a JSON list"):
            load_activitynet(tmp_path, tmp_path, "val")


class TestLsmdc:
    def test_train_rows_grouped_and_broken_clip_skipped(self, lsmdc_dir):
        items = load_lsmdc(lsmdc_dir.anno_dir, lsmdc_dir.video_dir, "train")
        assert [item.video_id for item in items] == [LSMDC_CLIP, LSMDC_CLIP_2]
        assert items[0].captions == ["SOMEONE is flying over a neighborhood.", "The neighborhood is quiet."]
        assert LSMDC_BROKEN not in {item.video_id for item in items}
        assert items[0].path == lsmdc_dir.video_dir / "0001_American_Beauty" / f"{LSMDC_CLIP}.avi"
        assert items[1].path.suffix == ".mp4"

    @pytest.mark.parametrize(("split", "clip"), [("val", LSMDC_CLIP_2), ("test", LSMDC_CLIP)])
    def test_val_and_test(self, lsmdc_dir, split, clip):
        items = load_lsmdc(lsmdc_dir.anno_dir, lsmdc_dir.video_dir, split)
        assert [item.video_id for item in items] == [clip]

    def test_wrong_field_count_names_line(self, tmp_path):
        good = "\t".join(["c1", "a", "b", "c", "d", "A sentence."])
        (tmp_path / "LSMDC16_annos_val.csv").write_text(f"{good}\nc2\t1\t2\tonly four\n")
        expected = "LSMDC16_annos_val.csv: line 2: expected 6 tab-separated fields, found 4"
        with pytest.raises(AnnotationError, match=expected):
            load_lsmdc(tmp_path, tmp_path, "val")

    def test_a_long_row_is_shown_with_its_end(self, tmp_path):
        # A tab inside the sentence (7 fields): the row's end, where it is, stays in the message.
        row = "\t".join(["1001_A_Clip_Name_With_A_Long_Title_00.01.02.003-00.01.05.006", "00.01.02.003",
                         "00.01.05.006", "00.01.02.003", "00.01.05.006", "SOMEONE opens the door", "and leaves."])
        (tmp_path / "LSMDC16_annos_val.csv").write_text(row + "\n")
        with pytest.raises(AnnotationError, match="found 7") as info:
            load_lsmdc(tmp_path, tmp_path, "val")
        message = str(info.value)
        assert message.endswith(r"door\tand leaves.')") and "'1001_A_Clip_Name" in message and " ... " in message
        assert len(message) < len(str(tmp_path)) + 200

    def test_comma_separated_file_is_rejected(self, tmp_path):
        (tmp_path / "LSMDC16_annos_val.csv").write_text("c1,a,b,c,d,A sentence.\n")
        with pytest.raises(AnnotationError, match="line 1: expected 6 tab-separated fields, found 1"):
            load_lsmdc(tmp_path, tmp_path, "val")


class TestCustom:
    def test_a_folder_given_as_the_file_is_called_a_folder(self, custom_dir):
        with pytest.raises(AnnotationError, match=f"{custom_dir.anno_dir}: is a folder, not the custom annotation "
                           r"file \(a .csv or .jsonl file\)"):
            load_custom(custom_dir.anno_dir)

    def test_csv_groups_rows_and_resolves_paths(self, custom_dir):
        items = load_custom(custom_dir.anno_dir / "captions.csv")
        assert [(i.video_id, i.captions) for i in items] == [
            ("clips/a.mp4", ["a red car", "a car drives"]),
            ("clips/b.mp4", ["a blue boat"]),
        ]
        assert items[0].path == custom_dir.anno_dir / "clips" / "a.mp4"
        assert check_videos_exist(items) == []

    def test_jsonl_with_caption_and_captions(self, custom_dir):
        items = load_custom(custom_dir.anno_dir / "captions.jsonl")
        assert [(i.video_id, i.captions) for i in items] == [
            ("clips/a.mp4", ["a red car"]),
            ("clips/b.mp4", ["a blue boat", "a boat sails"]),
        ]

    def test_json_list_and_video_root(self, tmp_path):
        path = tmp_path / "anno.json"
        records = [{"video": "x.mp4", "caption": "one"}, {"video": "/abs/y.mp4", "caption": "two"}]
        path.write_text(json.dumps(records))
        items = load_custom(path, video_root=tmp_path / "root")
        assert [item.path for item in items] == [tmp_path / "root" / "x.mp4", Path("/abs/y.mp4")]

    def test_csv_missing_caption_column(self, tmp_path):
        path = tmp_path / "anno.csv"
        path.write_text("video,text\na.mp4,hello\n")
        with pytest.raises(AnnotationError, match=r"anno.csv: line 1: missing column\(s\) \['caption'\]"):
            load_custom(path)

    def test_jsonl_wrong_shape_names_line_and_field(self, tmp_path):
        path = tmp_path / "anno.jsonl"
        path.write_text(
            '{"video": "a.mp4", "caption": "ok"}\n{"video": "b.mp4", "captions": "not a list"}\n'
        )
        with pytest.raises(AnnotationError, match=r"anno.jsonl: line 2: field 'captions'.*'not a list'"):
            load_custom(path)

    def test_jsonl_invalid_json(self, tmp_path):
        path = tmp_path / "anno.jsonl"
        path.write_text('{"video": "a.mp4", "caption": "ok"}\n{"video": \n')
        with pytest.raises(AnnotationError, match="anno.jsonl: line 2: invalid JSON"):
            load_custom(path)

    def test_json_list_record_not_an_object(self, tmp_path):
        path = tmp_path / "anno.json"
        path.write_text(json.dumps([{"video": "a.mp4", "caption": "ok"}, "b.mp4"]))
        with pytest.raises(AnnotationError, match=r"anno.json: field '\[1\]': expected an object"):
            load_custom(path)

    def test_empty_and_unsupported_files(self, tmp_path):
        empty = tmp_path / "anno.jsonl"
        empty.write_text("\n")
        with pytest.raises(AnnotationError, match="no annotations found"):
            load_custom(empty)
        other = tmp_path / "anno.txt"
        other.write_text("a.mp4 hello\n")
        with pytest.raises(AnnotationError, match="unsupported extension"):
            load_custom(other)


class TestDispatchAndVideoChecks:
    def test_load_dataset_dispatches(self, msrvtt_dir, lsmdc_dir, custom_dir):
        expected = load_msrvtt(msrvtt_dir.anno_dir, msrvtt_dir.video_dir, "test")
        assert load_dataset("MSRVTT", msrvtt_dir.anno_dir, msrvtt_dir.video_dir, "test") == expected
        assert len(load_dataset("lsmdc", lsmdc_dir.anno_dir, lsmdc_dir.video_dir, "train")) == 2
        assert len(load_dataset("custom", custom_dir.anno_dir / "captions.csv", None)) == 2

    def test_load_dataset_unknown_name(self, tmp_path):
        with pytest.raises(ValueError, match="unknown dataset 'kinetics'"):
            load_dataset("kinetics", tmp_path, tmp_path, "train")

    def test_missing_videos_are_reported_not_fatal(self, msrvtt_dir):
        items = load_msrvtt(msrvtt_dir.anno_dir, msrvtt_dir.video_dir, "train")
        assert [item.video_id for item in check_videos_exist(items)] == ["video3"]

    def test_require_videos_warns_and_drops(self, msrvtt_dir):
        items = load_msrvtt(msrvtt_dir.anno_dir, msrvtt_dir.video_dir, "train")
        with pytest.warns(UserWarning, match="1 of 4 videos are missing: .*video3.mp4"):
            kept = require_videos(items)
        assert [item.video_id for item in kept] == ["video0", "video1", "video2"]

    def test_require_videos_strict_lists_first_few_with_count(self, tmp_path):
        items = [VideoItem(f"v{i}", tmp_path / f"v{i}.mp4", ["c"]) for i in range(8)]
        with pytest.raises(MissingVideosError) as info:
            require_videos(items, strict=True)
        message = str(info.value)
        assert message.startswith("8 of 8 videos are missing")
        assert "v4.mp4" in message and "v5.mp4" not in message and "and 3 more" in message


# --- CSV rows, captions and durations that used to pass silently ------------------------------


class TestCsvFields:
    def test_an_unquoted_comma_is_refused_with_the_fix(self, tmp_path):
        path = tmp_path / "anno.csv"
        path.write_text("video,caption\nclips/a.mp4,a red car\nclips/a.mp4,a car,extra\n", encoding="utf-8")
        with pytest.raises(AnnotationError) as info:
            load_custom(path)
        message = str(info.value)
        assert message.startswith(f"{path}: line 3: 3 fields but the header has 2 columns")
        assert "must be in double quotes" in message and "'clips/a.mp4,a car,extra'" in message

    def test_a_quoted_comma_is_part_of_the_caption(self, tmp_path):
        path = tmp_path / "anno.csv"
        path.write_text('video,caption\nclips/a.mp4,"a car, a road"\n', encoding="utf-8")
        assert load_custom(path)[0].captions == ["a car, a road"]

    def test_msrvtt_test_rows_with_extra_fields_are_refused(self, tmp_path):
        (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
            "key,vid_key,video_id,sentence\nret0,msr1,video1,a man, a dog\n", encoding="utf-8"
        )
        with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test.csv: line 2: 5 fields but the header has 4"):
            load_msrvtt(tmp_path, tmp_path, "test")

    @pytest.mark.parametrize("closed", [True, False])
    def test_an_overlong_field_names_the_file_and_line(self, tmp_path, closed):
        long = '"' + "x" * 140_000 + ('"' if closed else "")
        path = tmp_path / "anno.csv"
        path.write_text(f"video,caption\nclips/a.mp4,a car\nclips/b.mp4,{long}\nclips/c.mp4,c\n", encoding="utf-8")
        with pytest.raises(AnnotationError) as info:  # not the csv module's bare _csv.Error
            load_custom(path)
        assert str(info.value).startswith(f"{path}: line 3: malformed CSV (a field longer than")

    def test_a_byte_order_mark_is_not_part_of_the_first_column(self, tmp_path):
        path = tmp_path / "anno.csv"
        path.write_bytes(b"\xef\xbb\xbfvideo,caption\r\nclips/a.mp4,a red car\r\n")  # Excel's "CSV UTF-8"
        items = load_custom(path)
        assert [(i.video_id, i.captions) for i in items] == [("clips/a.mp4", ["a red car"])]

    def test_a_byte_order_mark_does_not_shift_the_bad_byte_reported(self, tmp_path):
        path = tmp_path / "anno.csv"
        path.write_bytes(b"\xef\xbb\xbfvideo,caption\nclips/a.mp4,caf\xe9\n")  # Latin-1, not UTF-8
        with pytest.raises(AnnotationError, match=r"line 2: not UTF-8 text \(byte 0xe9\)"):
            load_custom(path)

    def test_one_file_written_three_ways_is_one_video(self, tmp_path):
        path = tmp_path / "anno.csv"
        absolute = tmp_path / "clips" / "a.mp4"
        path.write_text(
            f"video,caption\nclips/a.mp4,one\n./clips/a.mp4,two\n{absolute},three\nclips/b.mp4,four\n",
            encoding="utf-8",
        )
        items = load_custom(path)
        assert [(i.video_id, i.captions) for i in items] == [
            ("clips/a.mp4", ["one", "two", "three"]),
            ("clips/b.mp4", ["four"]),
        ]


class TestEmptyAndImpossibleValues:
    @pytest.mark.parametrize("duration", ["NaN", "Infinity", "-Infinity", "-5", "0"])
    def test_activitynet_duration_must_be_positive_and_finite(self, tmp_path, duration):
        (tmp_path / "val_ids.json").write_text(json.dumps(["v_x"]))
        # Written by hand: NaN and Infinity are what Python's json accepts though JSON has neither.
        (tmp_path / "val_1.json").write_text(f'{{"v_x": {{"duration": {duration}, "sentences": ["One."]}}}}')
        with pytest.raises(AnnotationError) as info:
            load_activitynet(tmp_path, tmp_path, "val")
        assert str(info.value).startswith(
            f"{tmp_path / 'val_1.json'}: field 'v_x.duration': expected a positive, finite number of seconds"
        )

    def test_activitynet_sentences_that_are_all_empty(self, tmp_path):
        (tmp_path / "val_ids.json").write_text(json.dumps(["v_x"]))
        (tmp_path / "val_1.json").write_text(json.dumps({"v_x": {"duration": 3, "sentences": ["", " "]}}))
        with pytest.raises(AnnotationError, match=r"val_1.json: field 'v_x.sentences': the sentences are all empty"):
            load_activitynet(tmp_path, tmp_path, "val")

    @pytest.mark.parametrize("description", ["", "   "])
    def test_didemo_empty_description(self, tmp_path, description):
        (tmp_path / "val_list.txt").write_text("a.mp4\n")
        (tmp_path / "val_data.json").write_text(
            json.dumps([{"video": "a.mp4", "description": "fine"}, {"video": "a.mp4", "description": description}])
        )
        with pytest.raises(AnnotationError, match=r"val_data.json: field '\[1\].description': expected a non-empty"):
            load_didemo(tmp_path, tmp_path, "val")

    def test_msrvtt_empty_caption(self, tmp_path):
        (tmp_path / "MSRVTT_train.7k.csv").write_text("video_id\nvideo0\n")
        (tmp_path / "MSRVTT_data.json").write_text(
            json.dumps({"sentences": [{"video_id": "video0", "caption": " "}]})
        )
        with pytest.raises(AnnotationError, match=r"field 'sentences\[0\].caption': expected a non-empty string"):
            load_msrvtt(tmp_path, tmp_path, "train7k")

    @pytest.mark.parametrize("sentence", ["", "   ", "\u3000"])
    def test_lsmdc_blank_sentence_is_called_empty(self, tmp_path, sentence):
        rows = [f"{LSMDC_CLIP}\t0\t1\t0\t1\tSOMEONE flies.", f"{LSMDC_CLIP_2}\t0\t1\t0\t1\t{sentence}"]
        (tmp_path / "LSMDC16_annos_val.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        with pytest.raises(AnnotationError, match=r"LSMDC16_annos_val.csv: line 2: field 'SENTENCE': empty sentence"):
            load_lsmdc(tmp_path, tmp_path, "val")

    def test_lsmdc_trailing_tabs_are_not_fields(self, tmp_path):
        (tmp_path / "LSMDC16_annos_val.csv").write_text(f"{LSMDC_CLIP}\t0\t1\t0\t1\tSOMEONE flies. \t\n")
        assert load_lsmdc(tmp_path, tmp_path, "val")[0].captions == ["SOMEONE flies."]

    @pytest.mark.parametrize(
        ("files", "load", "named"),
        [
            ({"test_list.txt": "\n", "test_data.json": "[]"}, lambda d: load_didemo(d, d, "test"), "test_list.txt"),
            ({"val_ids.json": "[]", "val_1.json": "{}"}, lambda d: load_activitynet(d, d, "val"), "val_ids.json"),
            ({"MSRVTT_JSFUSION_test.csv": "key,vid_key,video_id,sentence\n"}, lambda d: load_msrvtt(d, d, "test"),
             "MSRVTT_JSFUSION_test.csv"),
            ({"MSRVTT_train.7k.csv": "video_id\n"}, lambda d: load_msrvtt(d, d, "train7k"), "MSRVTT_train.7k.csv"),
            ({"LSMDC16_annos_val.csv": ""}, lambda d: load_lsmdc(d, d, "val"), "LSMDC16_annos_val.csv"),
        ],
    )
    def test_an_empty_split_file_is_named(self, tmp_path, files, load, named):
        for name, text in files.items():
            (tmp_path / name).write_text(text)
        with pytest.raises(AnnotationError) as info:
            load(tmp_path)
        assert str(info.value).startswith(f"{tmp_path / named}: no ")
