"""regnet_zoo.data.download on locally made archives served from file:// URLs (no network)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile

import pytest
import torch

from regnet_zoo.data.download import LEARN2REG_TASKS, download_file, download_learn2reg, extract_archive
from regnet_zoo.data.learn2reg import Learn2RegDataset, write_learn2reg_dataset
from regnet_zoo.errors import RegistrationInputError


@pytest.fixture
def tiny_archive(tmp_path):
    """A zip holding a tiny Learn2Reg task folder ``Tiny/`` (2 subjects, 1 val pair)."""
    src = tmp_path / "src" / "Tiny"
    subjects = [
        {"image": torch.rand(1, 6, 5, 4), "label": torch.randint(0, 3, (1, 6, 5, 4))} for _ in range(2)
    ]
    write_learn2reg_dataset(src, subjects, name="tiny", prefix="TINY", registration_val=[(0, 1)])
    archive = tmp_path / "Tiny.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in src.rglob("*"):
            z.write(path, path.relative_to(src.parent))
        z.writestr("__MACOSX/._junk", b"")
    return archive


def test_download_learn2reg_from_file_url(tmp_path, tiny_archive):
    digest = hashlib.sha256(tiny_archive.read_bytes()).hexdigest()
    dest = tmp_path / "data"
    root = download_learn2reg("Tiny", dest, url=tiny_archive.as_uri(), sha256=digest, progress=False)
    assert root == dest / "Tiny" and not (dest / "__MACOSX").exists()
    assert not list(dest.glob("*.zip")) and not list(dest.glob(".*part"))  # archive removed, no partial file
    ds = Learn2RegDataset(root)
    (pair,) = ds.pairs("val")
    assert set(pair) == {"fixed", "moving", "fixed_label", "moving_label"}
    # done once: a second call neither downloads nor unpacks (the URL is gone now)
    tiny_archive.unlink()
    assert download_learn2reg("Tiny", dest, url=tiny_archive.as_uri(), progress=False) == root


def test_checksum_mismatch_and_no_overwrite(tmp_path, tiny_archive):
    with pytest.raises(RegistrationInputError, match="sha256 checksum mismatch"):
        download_file(tiny_archive.as_uri(), tmp_path / "a.zip", sha256="0" * 64, progress=False)
    assert not (tmp_path / "a.zip").exists() and not list(tmp_path.glob(".a.zip*"))
    path = download_file(tiny_archive.as_uri(), tmp_path / "a.zip", progress=False)
    path.write_bytes(b"local copy")
    assert download_file(tiny_archive.as_uri(), path, progress=False).read_bytes() == b"local copy"
    download_file(tiny_archive.as_uri(), path, overwrite=True, progress=False)
    assert path.read_bytes() == tiny_archive.read_bytes()
    extract_archive(path, tmp_path / "x")
    with pytest.raises(RegistrationInputError, match="exists"):
        extract_archive(path, tmp_path / "x")
    extract_archive(path, tmp_path / "x", overwrite=True)
    with pytest.raises(RegistrationInputError, match="download failed"):
        download_file((tmp_path / "missing.zip").as_uri(), tmp_path / "m.zip", progress=False)


def test_tar_archives_and_unsafe_members(tmp_path):
    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as t:
        info = tarfile.TarInfo("folder/file.txt")
        info.size = 5
        t.addfile(info, io.BytesIO(b"hello"))
    placed = extract_archive(good, tmp_path / "out")
    assert placed == [tmp_path / "out" / "folder"] and (placed[0] / "file.txt").read_text() == "hello"
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../escape.txt", b"x")
    with pytest.raises(RegistrationInputError, match="outside"):
        extract_archive(evil, tmp_path / "out2")
    assert not (tmp_path / "escape.txt").exists()
    not_archive = tmp_path / "plain.bin"
    not_archive.write_bytes(b"plain")
    with pytest.raises(RegistrationInputError, match="not a zip or tar"):
        extract_archive(not_archive, tmp_path / "out3")


def test_registry_has_real_learn2reg_addresses():
    assert {"AbdomenCTCT", "NLST", "LungCT", "AbdomenMRCT", "OASIS"} <= set(LEARN2REG_TASKS)
    for task in LEARN2REG_TASKS.values():
        assert task.url.startswith("https://") and task.filename
    with pytest.raises(ValueError, match="unknown Learn2Reg task"):
        download_learn2reg("NoSuchTask", "unused")
