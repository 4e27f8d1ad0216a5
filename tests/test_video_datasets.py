import csv
import json
import logging
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from nanoi2v_diffusers.data import (
    HFVideoDataset,
    ShapesConfig,
    ShapesDataset,
    VideoFolderDataset,
    collate_videos,
    frames_to_tensor,
    generate_shapes_clip,
    write_shapes_folder,
    write_video,
)

CONFIG = ShapesConfig(canvas_size=32, num_frames=5)
NUM_CLIPS = 4
SIZE = dict(num_frames=5, height=32, width=32)


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    return write_shapes_folder(tmp_path_factory.mktemp("shapes"), NUM_CLIPS, config=CONFIG)


@pytest.fixture
def folder_copy(tmp_path, shapes_folder):
    return shutil.copytree(shapes_folder, tmp_path / "copy")


def records(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def break_file(path, how):
    if how == "garbage":
        path.write_bytes(b"definitely not a video" * 50)
    elif how == "zero_byte":
        path.write_bytes(b"")
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def test_jsonl_folder_matches_shapes_dataset(shapes_folder):
    dataset = VideoFolderDataset(shapes_folder, **SIZE)
    reference = ShapesDataset(NUM_CLIPS, config=CONFIG)
    assert len(dataset) == NUM_CLIPS
    for index in range(NUM_CLIPS):
        item, expected = dataset[index], reference[index]
        assert torch.equal(item["pixel_values"], expected["pixel_values"])  # lossless mp4
        assert item["caption"] == expected["caption"]
        assert item["file_name"] == f"clip_{index:05d}.mp4"


def test_csv_metadata(folder_copy):
    rows = records(folder_copy)
    (folder_copy / "metadata.jsonl").unlink()
    with open(folder_copy / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows({"file_name": r["file_name"], "text": r["text"]} for r in rows)
    dataset = VideoFolderDataset(folder_copy, **SIZE)
    assert [dataset[i]["caption"] for i in range(len(dataset))] == [r["text"] for r in rows]


def test_gif_folder_with_txt_captions(tmp_path):
    for seed in range(3):
        write_video(tmp_path / f"{seed}.gif", generate_shapes_clip(seed, CONFIG).video, lossless=True)
    (tmp_path / "0.txt").write_text("  a caption from a text file\n")
    (tmp_path / "1.txt").write_text(generate_shapes_clip(1, CONFIG).caption)
    dataset = VideoFolderDataset(tmp_path, **SIZE)
    assert [dataset[i]["file_name"] for i in range(3)] == ["0.gif", "1.gif", "2.gif"]
    assert dataset[0]["caption"] == "a caption from a text file"
    assert dataset[1]["caption"] == generate_shapes_clip(1, CONFIG).caption
    assert dataset[2]["caption"] == ""  # no 2.txt
    assert torch.equal(dataset[1]["pixel_values"], frames_to_tensor(generate_shapes_clip(1, CONFIG).video))


@pytest.mark.parametrize("how", ["garbage", "zero_byte", "truncated"])
def test_bad_file_is_skipped_counted_and_logged_once(folder_copy, caplog, how):
    break_file(folder_copy / "clip_00001.mp4", how)
    dataset = VideoFolderDataset(folder_copy, **SIZE)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            names = [dataset[i]["file_name"] for i in range(len(dataset))]
    assert names == ["clip_00000.mp4", "clip_00002.mp4", "clip_00002.mp4", "clip_00003.mp4"]
    assert dataset.num_bad_files == 1 and dataset.bad_files == ["clip_00001.mp4"]
    warnings = [r for r in caplog.records if "clip_00001.mp4" in r.getMessage()]
    assert len(warnings) == 1


def test_too_short_file_is_skipped(folder_copy):
    short = generate_shapes_clip(0, ShapesConfig(canvas_size=32, num_frames=3)).video
    write_video(folder_copy / "clip_00003.mp4", short, lossless=True)
    dataset = VideoFolderDataset(folder_copy, **SIZE)
    assert dataset[3]["file_name"] == "clip_00000.mp4"  # wraps around to the next good index
    assert dataset.bad_files == ["clip_00003.mp4"]


def test_aborts_past_max_bad_fraction(folder_copy):
    for index in (0, 1, 2):
        break_file(folder_copy / f"clip_{index:05d}.mp4", "garbage")
    dataset = VideoFolderDataset(folder_copy, max_bad_fraction=0.5, **SIZE)
    with pytest.raises(RuntimeError, match=r"3 of 3 video files tried .* max_bad_fraction=0.5"):
        dataset[0]
    tolerant = VideoFolderDataset(folder_copy, max_bad_fraction=0.8, **SIZE)
    assert tolerant[0]["file_name"] == "clip_00003.mp4" and tolerant.num_bad_files == 3


def test_scan_lists_bad_files_without_raising(folder_copy):
    for index in (1, 2, 3):
        break_file(folder_copy / f"clip_{index:05d}.mp4", "garbage")
    dataset = VideoFolderDataset(folder_copy, max_bad_fraction=0.1, **SIZE)
    assert dataset.scan() == ["clip_00001.mp4", "clip_00002.mp4", "clip_00003.mp4"]
    assert dataset[2]["file_name"] == "clip_00000.mp4"


@pytest.mark.parametrize("file_name", ["../outside.mp4", "sub/../../outside.mp4", "/etc/passwd", "C:\\videos\\a.mp4"])
def test_metadata_cannot_point_outside_the_folder(tmp_path, file_name):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": file_name, "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1") as info:
        VideoFolderDataset(tmp_path, **SIZE)
    assert repr(file_name) in str(info.value)


def test_metadata_errors_name_file_and_column(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.mp4", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="missing the 'text' column"):
        VideoFolderDataset(tmp_path, **SIZE)
    (tmp_path / "metadata.csv").write_text("file_name,text\na.mp4,x\n")
    with pytest.raises(ValueError, match="keep one metadata file"):
        VideoFolderDataset(tmp_path, **SIZE)


def test_random_flip_is_horizontal_and_deterministic(shapes_folder):
    plain = VideoFolderDataset(shapes_folder, **SIZE)
    flipping = VideoFolderDataset(shapes_folder, random_flip=True, seed=3, **SIZE)
    flipped = []
    for epoch in range(3):
        flipping.set_epoch(epoch)
        for index in range(NUM_CLIPS):
            video, reference = flipping[index]["pixel_values"], plain[index]["pixel_values"]
            was_flipped = torch.equal(video, reference.flip(-1)) and not torch.equal(video, reference)
            assert was_flipped or torch.equal(video, reference)
            flipped.append(was_flipped)
    assert any(flipped) and not all(flipped)
    again = VideoFolderDataset(shapes_folder, random_flip=True, seed=3, **SIZE)
    again.set_epoch(2)
    assert torch.equal(again[1]["pixel_values"], flipping[1]["pixel_values"])


def test_hf_dataset_from_paths_and_bytes(tmp_path, shapes_folder):
    import datasets

    rows = records(shapes_folder)
    paths = [str(shapes_folder / r["file_name"]) for r in rows]
    blobs = [open(p, "rb").read() for p in paths]
    blobs[2] = b"corrupt" * 100
    table = datasets.Dataset.from_dict(
        {"video": [{"path": None, "bytes": b} for b in blobs], "caption": [r["text"] for r in rows]},
        features=datasets.Features({"video": datasets.Video(), "caption": datasets.Value("string")}),
    )
    table.save_to_disk(str(tmp_path / "bytes"))
    datasets.Dataset.from_dict({"clip": paths, "caption": [r["text"] for r in rows]}).save_to_disk(
        str(tmp_path / "paths")
    )
    reference = ShapesDataset(NUM_CLIPS, config=CONFIG)

    by_path = HFVideoDataset(tmp_path / "paths", video_column="clip", caption_column="caption", **SIZE)
    for index in range(NUM_CLIPS):
        assert torch.equal(by_path[index]["pixel_values"], reference[index]["pixel_values"])
        assert by_path[index]["caption"] == reference[index]["caption"]

    by_bytes = HFVideoDataset(str(tmp_path / "bytes"), caption_column="caption", **SIZE)
    assert torch.equal(by_bytes[1]["pixel_values"], reference[1]["pixel_values"])
    assert torch.equal(by_bytes[2]["pixel_values"], reference[3]["pixel_values"])  # row 2 skipped
    assert by_bytes.num_bad_files == 1 and by_bytes.bad_files == ["row 2"]


def test_hf_dataset_from_a_videofolder_directory(shapes_folder, tmp_path):
    dataset = HFVideoDataset(shapes_folder, cache_dir=str(tmp_path / "cache"), **SIZE)
    captions = sorted(dataset[i]["caption"] for i in range(len(dataset)))
    assert captions == sorted(r["text"] for r in records(shapes_folder))


def test_hf_dataset_missing_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"video": ["a.mp4"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['text'\]"):
        HFVideoDataset(tmp_path / "ds", **SIZE)


def test_collate_with_dataloader(shapes_folder):
    loader = DataLoader(VideoFolderDataset(shapes_folder, **SIZE), batch_size=3, collate_fn=collate_videos)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (3, 3, 5, 32, 32)
    assert batch["captions"] == [r["text"] for r in records(shapes_folder)[:3]]
    mismatched = [
        {"pixel_values": torch.zeros(3, 5, 32, 32), "caption": ""},
        {"pixel_values": torch.zeros(3, 5, 16, 16), "caption": ""},
    ]
    with pytest.raises(ValueError, match="share one"):
        collate_videos(mismatched)
