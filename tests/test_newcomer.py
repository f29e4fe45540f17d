"""What a first session with the library meets: downloads that cannot hang,
save files that match their suffix and the umask, corrupt images found before
a long run, no empty progress bars."""

from __future__ import annotations

import functools
import os
import socket
import stat
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image
from tiny_cnn import make_tiny_cnn

from sklearn_cnn import (
    CNNFeatureTransformer,
    _models,
    _persistence,
    load,
    load_image_folder,
)
from sklearn_cnn._runtime import progress

TRUSTED = ["tiny_cnn:make_tiny_cnn"]


def tiny(**params) -> CNNFeatureTransformer:
    return CNNFeatureTransformer(
        model=functools.partial(make_tiny_cnn, 0), precision="fp32", device="cpu",
        **params,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Downloads: a server that accepts and never answers
# ---------------------------------------------------------------------------


@pytest.fixture
def silent_server():
    """A local server that accepts connections and never says a word: what a
    stalled proxy or firewall looks like to a client."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    server.close()
    for connection in accepted:
        connection.close()


@pytest.mark.slow
def test_torchvision_download_fails_in_bounded_time_naming_url_and_offline_way(
    silent_server, tmp_path, monkeypatch
):
    from torchvision.models import ResNet18_Weights

    address, accepted = silent_server
    url = f"{address}/models/resnet18-f37072fd.pth"
    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.value, "url", url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached
    monkeypatch.setenv(_models.DOWNLOAD_TIMEOUT_ENV, "2")
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        CNNFeatureTransformer("resnet18", weights="DEFAULT").fit(
            np.zeros((1, 32, 32, 3), np.uint8)
        )
    took = time.perf_counter() - start
    assert accepted, "the download never reached the silent server"
    message = str(info.value)
    assert message.startswith("Could not download the weights")
    assert url in message
    assert "no answer within 2 s" in message
    assert _models.DOWNLOAD_TIMEOUT_ENV in message
    assert "pass its path as weights=" in message
    assert took < 60  # without the timeout it never ends
    assert socket.getdefaulttimeout() is None  # left as it was


@pytest.mark.slow
def test_timm_hub_download_fails_in_bounded_time_naming_url_and_offline_way(
    silent_server, tmp_path, monkeypatch
):
    pytest.importorskip("timm")
    constants = pytest.importorskip("huggingface_hub.constants")
    address, accepted = silent_server
    monkeypatch.setattr(constants, "ENDPOINT", address)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv(_models.DOWNLOAD_TIMEOUT_ENV, "2")
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        _models.build_model("timm/resnet18", "DEFAULT")
    took = time.perf_counter() - start
    assert accepted, "the download never reached the silent server"
    message = str(info.value)
    assert "https://huggingface.co/timm/resnet18." in message
    assert "no answer within 2 s" in message
    assert "pass its path as weights=" in message
    assert took < 60  # huggingface_hub alone retries for minutes


@pytest.mark.parametrize(
    ("value", "expected"), [("", 30.0), ("5", 5.0), (" 0.5 ", 0.5), ("0", None)]
)
def test_download_timeout_comes_from_the_environment(value, expected, monkeypatch):
    monkeypatch.setenv(_models.DOWNLOAD_TIMEOUT_ENV, value)
    assert _models.download_timeout() == expected


def test_bad_download_timeout_says_what_it_expects(monkeypatch):
    monkeypatch.setenv(_models.DOWNLOAD_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="not a number of seconds"):
        _models.download_timeout()


def test_bounded_downloads_restores_and_respects_the_socket_default(monkeypatch):
    monkeypatch.setenv(_models.DOWNLOAD_TIMEOUT_ENV, "7")
    assert socket.getdefaulttimeout() is None
    with _models.bounded_downloads() as timeout:
        assert timeout == socket.getdefaulttimeout() == 7
    assert socket.getdefaulttimeout() is None
    socket.setdefaulttimeout(3)  # the program's own choice wins
    try:
        with _models.bounded_downloads() as timeout:
            assert timeout == socket.getdefaulttimeout() == 3
        assert socket.getdefaulttimeout() == 3
    finally:
        socket.setdefaulttimeout(None)


def test_timm_download_failure_names_the_url_and_offline_way(monkeypatch):
    timm = pytest.importorskip("timm")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(_models, "_check_hub_answers", lambda name, timeout: None)
    with pytest.raises(RuntimeError) as info:
        _models.build_model("timm/resnet18", "DEFAULT")
    message = str(info.value)
    assert "https://huggingface.co/timm/resnet18" in message
    assert "pass its path as weights=" in message


# ---------------------------------------------------------------------------
# save: the suffix tells the format; the umask sets the permissions
# ---------------------------------------------------------------------------


@pytest.fixture
def fitted(images):
    return tiny(layer="stage1").fit(images)


def test_safetensors_suffix_without_safetensors_is_refused(
    fitted, tmp_path, monkeypatch
):
    monkeypatch.setattr(_persistence, "_safetensors", lambda: None)
    path = tmp_path / "model.safetensors"
    with pytest.raises(ImportError, match=r"needs the safetensors package.*\.pt"):
        fitted.save(path)
    assert os.listdir(tmp_path) == []  # not even a temporary file
    fitted.save(tmp_path / "model.pt")  # another suffix: torch's format
    assert (tmp_path / "model.pt").read_bytes()[:4] == b"PK\x03\x04"


def test_safetensors_suffix_with_safetensors_writes_safetensors(fitted, tmp_path):
    pytest.importorskip("safetensors")
    path = tmp_path / "model.safetensors"
    fitted.save(path)
    assert path.read_bytes()[:4] != b"PK\x03\x04"
    safetensors = pytest.importorskip("safetensors.torch")
    assert safetensors.load_file(path)  # any safetensors reader reads it


@pytest.mark.parametrize("backend", ["safetensors", "torch"])
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_file_follows_the_umask(
    backend, umask, fitted, images, tmp_path, monkeypatch
):
    if backend == "torch":
        monkeypatch.setattr(_persistence, "_safetensors", lambda: None)
    elif _persistence._safetensors() is None:
        pytest.skip("safetensors is not installed")
    previous = os.umask(umask)
    try:
        fitted.save(tmp_path / "model.bin")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(os.stat(tmp_path / "model.bin").st_mode)
    assert mode == 0o666 & ~umask
    loaded = load(tmp_path / "model.bin", trusted=TRUSTED)
    np.testing.assert_array_equal(loaded.transform(images), fitted.transform(images))


# ---------------------------------------------------------------------------
# load_image_folder(verify=True): corrupt files found before a long run
# ---------------------------------------------------------------------------


@pytest.fixture
def folder_with_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.jpg", quality=90)
    whole = (tmp_path / "dog" / "1.jpg").read_bytes()
    (tmp_path / "dog" / "1.jpg").write_bytes(whole[: len(whole) // 2])
    return tmp_path


def test_truncated_jpeg_is_listed_without_verify_and_fails_transform(
    folder_with_truncated_jpeg,
):
    paths, _ = load_image_folder(folder_with_truncated_jpeg)
    assert len(paths) == 6  # listing decodes nothing
    with pytest.raises(ValueError, match=r"1\.jpg.*truncated"):
        tiny().fit(paths).transform(paths)


def test_verify_drops_and_names_the_truncated_jpeg(folder_with_truncated_jpeg, capsys):
    with pytest.warns(
        UserWarning,
        match=r"(?s)1 of 6 image files.*dog.1\.jpg: OSError: image file is truncated",
    ):
        paths, labels = load_image_folder(
            folder_with_truncated_jpeg, verify=True, verbose=1
        )
    assert len(paths) == 5
    assert not any(p.endswith(os.path.join("dog", "1.jpg")) for p in paths)
    assert labels.tolist() == ["cat"] * 3 + ["dog"] * 2
    assert "unreadable (1)" in capsys.readouterr().err
    tiny().fit(paths).transform(paths)  # the rest decodes


def test_verify_keeps_a_clean_folder_without_warning(folder_with_truncated_jpeg):
    (folder_with_truncated_jpeg / "dog" / "1.jpg").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths, _ = load_image_folder(folder_with_truncated_jpeg, verify=True)
    assert len(paths) == 5


def test_verify_with_nothing_readable_says_so(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with (
        pytest.warns(UserWarning, match="do not decode"),
        pytest.raises(ValueError, match="None of the image files"),
    ):
        load_image_folder(tmp_path, verify=True)


# ---------------------------------------------------------------------------
# Progress bars
# ---------------------------------------------------------------------------


def test_no_progress_bar_for_no_images(capsys):
    with progress(0, "calibrate", enabled=True) as bar:
        bar.update(0)
    with progress(3, "transform", enabled=True) as bar:
        bar.update(3)
    err = capsys.readouterr().err
    assert "calibrate" not in err
    assert "transform" in err
