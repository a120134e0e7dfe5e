"""The zoo trusts nothing but its manifest: every file of every entry is listed and hashed, and an
entry whose folder holds a file the manifest does not list, or whose list lacks a file its recipe
produces, is refused by ``zoo verify`` and ``zoo.load`` (with or without hashing)."""
import json
import shutil

import pytest

from labkit import zoo
from labkit.cli import main

NAME = "digits/mlp-s1"


def test_manifest_lists_exactly_the_files_on_disk_for_every_entry():
    entries = zoo.read_manifest()["entries"]
    assert entries
    for name, entry in entries.items():
        on_disk = sorted(p.name for p in zoo.path(name).iterdir())
        assert sorted(entry["files"]) == on_disk, name
        assert set(zoo.RECIPE_FILES[entry["kind"]]) <= set(entry["files"]), name
        zoo.check_files(name)


@pytest.fixture
def private_zoo(tmp_path, monkeypatch):
    """A copy of one entry and its manifest line under $LABKIT_DATA, safe to damage."""
    shutil.copytree(zoo.path(NAME), tmp_path / "zoo" / NAME)
    entry = zoo.read_manifest()["entries"][NAME]
    manifest = tmp_path / "zoo" / "manifest.json"
    manifest.write_text(json.dumps({"version": 1, "entries": {NAME: entry}}))
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path))

    def edit(fn):
        data = json.loads(manifest.read_text())
        fn(data["entries"][NAME])
        manifest.write_text(json.dumps(data))

    return tmp_path / "zoo" / NAME, edit


def _refused(message):
    with pytest.raises(zoo.ZooError, match=message):
        zoo.verify(NAME)
    with pytest.raises(zoo.ZooError, match=message):
        zoo.load(NAME, device="cpu")
    with pytest.raises(zoo.ZooError, match=message):
        zoo.load(NAME, device="cpu", verify_hash=False)


def test_the_intact_copy_loads(private_zoo):
    zoo.verify(NAME)
    assert zoo.load(NAME, device="cpu") is not None


def test_a_file_the_manifest_does_not_list_is_refused(private_zoo):
    folder, _ = private_zoo
    (folder / "extra.bin").write_bytes(b"\0" * 16)
    _refused(r"extra.bin is not in the manifest")


def test_a_subfolder_is_refused_too(private_zoo):
    folder, _ = private_zoo
    (folder / ".ipynb_checkpoints").mkdir()
    _refused(r"\.ipynb_checkpoints is not in the manifest")


def test_a_file_removed_from_the_list_is_refused(private_zoo):
    _, edit = private_zoo
    edit(lambda e: e["files"].pop("model.safetensors"))
    _refused("does not list model.safetensors, which its recipe produces")


def test_an_emptied_list_and_a_deleted_folder_are_refused(private_zoo):
    folder, edit = private_zoo
    edit(lambda e: e["files"].clear())
    shutil.rmtree(folder)
    _refused("does not list classifier.json, which its recipe produces")


def test_a_deleted_folder_is_named(private_zoo):
    folder, _ = private_zoo
    shutil.rmtree(folder)
    _refused(r"folder .*mlp-s1 is missing")


def test_cli_verify_fails_with_exit_2_and_one_line(private_zoo, capsys):
    folder, _ = private_zoo
    assert main(["zoo", "verify"]) == 0
    (folder / "stray.txt").write_text("x")
    assert main(["zoo", "verify"]) == 2
    captured = capsys.readouterr()
    assert "FAIL  zoo entry 'digits/mlp-s1'" in captured.out and "stray.txt" in captured.out
    assert captured.err == "labkit zoo: error: 1 entry failed verification: digits/mlp-s1 (see the FAIL lines above)\n"
