import pytest

from diffusers_gac.api import write_folder_atomically


def test_interrupted_write_leaves_no_folder(tmp_path):
    out = tmp_path / "model"

    def write(folder):
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt  # e.g. Ctrl-C halfway through saving

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(out, write)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_write_lands_complete_and_never_overwrites(tmp_path):
    out = tmp_path / "model"
    write_folder_atomically(out, lambda folder: (folder / "a.txt").write_text("a"))
    assert (out / "a.txt").read_text() == "a"
    with pytest.raises(FileExistsError):
        write_folder_atomically(out, lambda folder: None)
