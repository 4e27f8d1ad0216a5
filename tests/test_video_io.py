import av
import numpy as np
import pytest
import torch
from PIL import Image

from nanoi2v_diffusers.data import (
    VideoDecodeError,
    frames_to_tensor,
    load_video,
    read_video_frames,
    resize_center_crop,
    tensor_to_frames,
    write_video,
)

NUM_FRAMES = 17


@pytest.fixture(scope="module")
def noise_frames():
    return np.random.default_rng(0).integers(0, 256, (NUM_FRAMES, 33, 35, 3), dtype=np.uint8)  # odd sizes on purpose


@pytest.fixture(scope="module")
def lossless_mp4(tmp_path_factory, noise_frames):
    return write_video(tmp_path_factory.mktemp("io") / "noise.mp4", noise_frames, fps=8, lossless=True)


def few_colour_frames(num_frames=NUM_FRAMES, size=32):
    """A moving bar over two fixed blocks, with identical consecutive frames at the end."""
    frames = np.zeros((num_frames, size, size, 3), dtype=np.uint8)
    frames[:, :8] = (255, 0, 0)
    frames[:, 20:, 4:10] = (0, 255, 255)
    for t in range(num_frames):
        frames[t, 10:14, min(t, 10) : min(t, 10) + 3] = (255, 255, 255)
    return frames


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".webm"])
def test_lossless_round_trip_is_exact(tmp_path, noise_frames, suffix):
    path = write_video(tmp_path / f"clip{suffix}", noise_frames, lossless=True)
    assert np.array_equal(read_video_frames(path), noise_frames)


@pytest.mark.parametrize("size", [(32, 48), (33, 35)])
def test_lossy_mp4_keeps_size_even_when_odd(tmp_path, size):
    ramp = np.linspace(0, 255, size[1], dtype=np.float64)
    frames = np.broadcast_to(ramp[None, None, :, None], (5, *size, 3)).astype(np.uint8).copy()
    decoded = read_video_frames(write_video(tmp_path / "ramp.mp4", frames))
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3  # visually lossless on a smooth ramp


def test_gif_is_readable_keeps_repeated_frames_and_few_colours_exactly(tmp_path):
    frames = few_colour_frames()
    path = write_video(tmp_path / "clip.gif", frames, fps=8, lossless=True)
    assert np.array_equal(read_video_frames(path), frames)


def test_gif_lossless_refuses_more_than_256_colours(tmp_path, noise_frames):
    with pytest.raises(ValueError, match="at most 256 colours"):
        write_video(tmp_path / "noise.gif", noise_frames, lossless=True)
    assert not list(tmp_path.iterdir())  # no half-written file left behind


def test_write_accepts_pil_images_and_float_tensors(tmp_path, noise_frames):
    images = [Image.fromarray(f) for f in noise_frames[:3]]
    from_pil = write_video(tmp_path / "pil.mp4", images, lossless=True)
    assert np.array_equal(read_video_frames(from_pil), noise_frames[:3])
    from_tensor = write_video(tmp_path / "tensor.mp4", frames_to_tensor(noise_frames[:3]), lossless=True)
    assert np.array_equal(read_video_frames(from_tensor), noise_frames[:3])


def test_write_rejects_unknown_suffix_and_bad_layout(tmp_path, noise_frames):
    with pytest.raises(ValueError, match="suffix must be one of"):
        write_video(tmp_path / "clip.avi", noise_frames)
    with pytest.raises(ValueError, match=r"\(C=3, T, H, W\)"):
        write_video(tmp_path / "clip.mp4", noise_frames.astype(np.float32) / 255)


def test_stride_and_start_frame(lossless_mp4, noise_frames):
    assert np.array_equal(read_video_frames(lossless_mp4, stride=2), noise_frames[::2])
    assert np.array_equal(read_video_frames(lossless_mp4, num_frames=4, stride=3, start_frame=2), noise_frames[2:14:3])


def test_fps_resampling(lossless_mp4, noise_frames):
    assert np.array_equal(read_video_frames(lossless_mp4, fps=4), noise_frames[::2])
    assert np.array_equal(read_video_frames(lossless_mp4, fps=8), noise_frames)
    doubled = read_video_frames(lossless_mp4, fps=16)
    assert len(doubled) == 2 * NUM_FRAMES - 1
    assert np.array_equal(doubled[::2], noise_frames)
    # 8 -> 3 fps: target k/3 s takes the frame nearest in time, index round(k * 8 / 3).
    nearest = np.round(np.arange(7) * 8 / 3).astype(int)
    assert np.array_equal(read_video_frames(lossless_mp4, fps=3), noise_frames[nearest])


def test_fps_resampling_of_a_gif_survives_its_centisecond_timestamps(tmp_path):
    frames = few_colour_frames()
    path = write_video(tmp_path / "clip.gif", frames, fps=8)  # 12.5 ms frames round to 12 / 13 cs
    assert np.array_equal(read_video_frames(path, fps=8), frames)
    assert np.array_equal(read_video_frames(path, fps=4), frames[::2])


def test_sampling_argument_errors(lossless_mp4):
    with pytest.raises(ValueError, match="either fps or stride"):
        read_video_frames(lossless_mp4, stride=2, fps=4)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        read_video_frames(lossless_mp4, stride=0)


def test_too_short_names_counts(lossless_mp4):
    with pytest.raises(VideoDecodeError, match="too short: has 9 frames, needs 10") as info:
        read_video_frames(lossless_mp4, num_frames=10, stride=2)
    assert "noise.mp4" in str(info.value)


def test_reads_from_bytes(lossless_mp4, noise_frames):
    assert np.array_equal(read_video_frames(lossless_mp4.read_bytes(), num_frames=3), noise_frames[:3])


def write_audio_only(path):
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        silence = np.zeros((2, 1024), dtype=np.float32)
        for index in range(4):
            frame = av.AudioFrame.from_ndarray(silence, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = 16000, index * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("zero_byte", "empty"),
        ("truncated", "cannot be decoded"),
        ("garbage", "cannot be decoded"),
        ("audio_only", "no video stream"),
        ("missing", "not found"),
    ],
)
def test_undecodable_files_raise_video_decode_error(tmp_path, lossless_mp4, kind, reason):
    path = tmp_path / f"{kind}.mp4"
    if kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = lossless_mp4.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "audio_only":
        write_audio_only(path)
    with pytest.raises(VideoDecodeError, match=reason) as info:
        read_video_frames(path, num_frames=4)
    assert str(path) in str(info.value)


def test_resize_center_crop():
    frames = np.zeros((2, 32, 48, 3), dtype=np.uint8)
    frames[..., 0] = np.arange(48, dtype=np.uint8)  # red encodes the column
    cropped = resize_center_crop(frames, 32, 32)  # same short side: a pure crop
    assert np.array_equal(cropped, frames[:, :, 8:40])
    resized = resize_center_crop(frames, 16, 24)  # half size, same aspect
    assert resized.shape == (2, 16, 24, 3)
    tall = resize_center_crop(frames, 40, 20)  # short side (height) scaled up to 40, then cropped
    assert tall.shape == (2, 40, 20, 3)
    assert abs(int(tall[0, 0, 10, 0]) - 24) <= 1  # the crop is centred on column 24


def test_tensor_layout_and_round_trip(noise_frames):
    video = frames_to_tensor(noise_frames)
    assert video.shape == (3, NUM_FRAMES, 33, 35) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert video[0, 3, 5, 7] == pytest.approx(noise_frames[3, 5, 7, 0] / 127.5 - 1)
    assert np.array_equal(tensor_to_frames(video), noise_frames)
    clamped = tensor_to_frames(torch.full((3, 1, 2, 2), 3.0) * torch.tensor([1.0, -1.0, 0.0]).view(3, 1, 1, 1))
    assert clamped[0, 0, 0].tolist() == [255, 0, 128]


def test_load_video(lossless_mp4):
    video = load_video(lossless_mp4, num_frames=5, height=16, width=16, stride=2)
    assert video.shape == (3, 5, 16, 16)
    assert video.min() >= -1 and video.max() <= 1
