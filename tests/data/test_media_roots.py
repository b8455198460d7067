"""The media opener: paths resolve under the roots, everything else is a named MediaError."""

from __future__ import annotations

import io
import os
import pickle

import pytest

from omnicore.data.media import MediaError, MediaLimits, MediaRoots, Reason, decoding, media_source


@pytest.fixture
def tree(tmp_path):
    """data/ (dataset dir) with data/sub/ (the dataset file's folder) and a secret file outside both."""
    data, sub = tmp_path / "data", tmp_path / "data" / "sub"
    sub.mkdir(parents=True)
    (sub / "train.json").write_text("[]")
    (sub / "a.bin").write_bytes(b"in sub")
    (data / "a.bin").write_bytes(b"in data")
    (data / "b.bin").write_bytes(b"only in data")
    (tmp_path / "secret.txt").write_bytes(b"secret")
    return tmp_path


def _roots(tree, **kwargs):
    return MediaRoots.for_dataset(tree / "data" / "sub" / "train.json", tree / "data", **kwargs)


def _refused(roots, path, reason):
    with pytest.raises(MediaError) as info:
        with roots.open(path):
            pass
    assert info.value.reason == reason, str(info.value)
    assert repr(os.fspath(path)) in str(info.value) and reason.value in str(info.value)
    return info.value


def test_default_roots_are_dataset_folder_then_dataset_dir(tree):
    roots = _roots(tree)
    assert roots.roots == ((tree / "data" / "sub").resolve(), (tree / "data").resolve())
    with roots.open("a.bin") as f:
        assert f.read() == b"in sub"  # first root wins
    with roots.open("b.bin") as f:
        assert f.read() == b"only in data"
    with roots.open(str(tree / "data" / "b.bin")) as f:  # an absolute path inside a root is fine
        assert f.read() == b"only in data"
    with roots.open("../a.bin") as f:  # leaves the first root but lands in the second: allowed
        assert f.read() == b"in data"


def test_escaping_paths_are_refused(tree):
    roots = _roots(tree)
    err = _refused(roots, "../../secret.txt", Reason.OUTSIDE_ROOTS)
    assert "secret.txt" in err.detail
    _refused(roots, "../../../../../../../etc/passwd", Reason.OUTSIDE_ROOTS)
    _refused(roots, str(tree / "secret.txt"), Reason.OUTSIDE_ROOTS)
    _refused(roots, "/etc/passwd", Reason.OUTSIDE_ROOTS)
    _refused(roots, "../../does-not-exist.png", Reason.OUTSIDE_ROOTS)  # refused before existence matters


def test_symlinks_out_of_the_roots_are_refused(tree):
    roots = _roots(tree)
    (tree / "data" / "link_out").symlink_to(tree / "secret.txt")
    (tree / "data" / "dir_out").symlink_to(tree, target_is_directory=True)
    (tree / "data" / "link_in").symlink_to(tree / "data" / "b.bin")
    _refused(roots, "link_out", Reason.OUTSIDE_ROOTS)
    _refused(roots, "dir_out/secret.txt", Reason.OUTSIDE_ROOTS)
    with roots.open("link_in") as f:
        assert f.read() == b"only in data"


@pytest.mark.parametrize("url", ["http://example.com/a.png", "https://x/y.wav", "file:///etc/passwd", "s3://b/k.mp4"])
def test_urls_are_refused_unless_a_fetch_hook_is_given(tree, url):
    _refused(_roots(tree), url, Reason.URL)
    fetched = []
    hooked = _roots(tree, fetch_url=lambda u: fetched.append(u) or io.BytesIO(b"fetched"))
    with hooked.open(url) as f:
        assert f.read() == b"fetched"
    assert fetched == [url]


def test_missing_empty_directory_fifo_and_oversized_files(tree):
    roots = _roots(tree)
    err = _refused(roots, "nope.png", Reason.MISSING)
    assert str(tree / "data") in err.detail  # says where it looked
    _refused(roots, "", Reason.MISSING)
    (tree / "data" / "empty.wav").write_bytes(b"")
    _refused(roots, "empty.wav", Reason.EMPTY)
    (tree / "data" / "folder").mkdir()
    _refused(roots, "folder", Reason.NOT_A_FILE)
    os.mkfifo(tree / "data" / "pipe")  # opening a FIFO would block forever
    _refused(roots, "pipe", Reason.NOT_A_FILE)
    small = _roots(tree, limits=MediaLimits(max_file_bytes=4))
    _refused(small, "b.bin", Reason.TOO_LARGE)


def test_media_error_pickles_and_names_file_and_reason():
    err = MediaError("pics/cat.jpg", Reason.CORRUPT, "truncated")
    back = pickle.loads(pickle.dumps(err))  # test-only: errors cross data-loader worker processes
    assert (back.name, back.reason, back.detail) == ("pics/cat.jpg", Reason.CORRUPT, "truncated")
    assert str(back) == "media 'pics/cat.jpg': corrupt (truncated)"
    assert isinstance(back, ValueError)


def test_decoding_turns_any_library_failure_into_a_corrupt_media_error():
    with pytest.raises(MediaError) as info:
        with decoding("x.png", "image"):
            raise SyntaxError("broken PNG file")  # what Pillow really raises on some bad PNGs
    assert info.value.reason == Reason.CORRUPT and "SyntaxError" in info.value.detail
    stream, name = media_source(b"abc")
    assert stream.read() == b"abc" and name == "<bytes>"
    with pytest.raises(TypeError, match="MediaRoots.open"):  # a path would bypass the roots
        media_source("/etc/passwd")
