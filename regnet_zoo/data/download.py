"""Download and unpack public Learn2Reg datasets.

The archives are the ones the Learn2Reg organisers publish (University of Lübeck cloud shares linked from
https://learn2reg.grand-challenge.org/Datasets/); by downloading you accept each dataset's terms there.
Each unpacks into a Learn2Reg folder (``imagesTr/``, ..., ``<TASK>_dataset.json``) readable by
:class:`regnet_zoo.data.learn2reg.Learn2RegDataset`. The organisers publish no checksums, so none is
checked unless you pass ``sha256``/``md5``. Any URL urllib can open works, ``file://`` included.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from regnet_zoo.errors import RegistrationInputError

__all__ = ["Learn2RegTask", "LEARN2REG_TASKS", "download_learn2reg", "download_file", "extract_archive"]


@dataclass(frozen=True)
class Learn2RegTask:
    url: str
    filename: str
    description: str
    sha256: str | None = None


LEARN2REG_TASKS: dict[str, Learn2RegTask] = {
    "AbdomenCTCT": Learn2RegTask(
        "https://cloud.imi.uni-luebeck.de/s/32WaSRaTnFk2JeT/download/AbdomenCTCT.zip",
        "AbdomenCTCT.zip",
        "inter-patient abdominal CT, 13 organ labels (Learn2Reg 2022/23)",
    ),
    "AbdomenMRCT": Learn2RegTask(
        "https://cloud.imi.uni-luebeck.de/s/yiQZfo43YBBg7zL/download/AbdomenMRCT.zip",
        "AbdomenMRCT.zip",
        "intra-patient multimodal abdominal MR-CT, organ labels (Learn2Reg 2021/22)",
    ),
    "NLST": Learn2RegTask(
        "https://cloud.imi.uni-luebeck.de/s/pERQBNyEFNLY8gR/download/NLST2023.zip",
        "NLST2023.zip",
        "intra-patient lung CT (NLST), masks and keypoints (Learn2Reg 2022/23)",
    ),
    "LungCT": Learn2RegTask(
        "https://cloud.imi.uni-luebeck.de/s/o7LyCbJCie8fQ3B/download",
        "LungCT.zip",
        "intra-patient inspiration/expiration lung CT, masks and keypoints (Learn2Reg 2021/22)",
    ),
    "ThoraxCBCT": Learn2RegTask(
        "https://cloud.imi.uni-luebeck.de/s/xQPEy4sDDnHsmNg/download/ThoraxCBCT_OncoRegRelease_06_12_23.zip",
        "ThoraxCBCT_OncoRegRelease_06_12_23.zip",
        "intra-patient thorax CT/CBCT, masks and keypoints (Learn2Reg 2023 / OncoReg)",
    ),
    "OASIS": Learn2RegTask(
        "https://surfer.nmr.mgh.harvard.edu/ftp/data/neurite/data/neurite-oasis.v1.0.tar",
        "neurite-oasis.v1.0.tar",
        "OASIS-1 brain MRI with FreeSurfer labels, neurite release used by Learn2Reg (its own folder layout, "
        "not dataset.json)",
    ),
}


def _progress(total: int | None, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None


def _check_hash(path: Path, sha256: str | None, md5: str | None) -> None:
    for name, expected in (("sha256", sha256), ("md5", md5)):
        if expected:
            digest = hashlib.new(name)
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest().lower() != expected.lower():
                raise RegistrationInputError(
                    f"{path}: {name} checksum mismatch (got {digest.hexdigest()}, expected {expected})"
                )


def download_file(
    url: str,
    path: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``path`` (through a temporary file, renamed when complete and verified).

    An existing ``path`` is kept (and verified) unless ``overwrite=True``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        _check_hash(path, sha256, md5)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "regnet_zoo"})
        with urllib.request.urlopen(request) as response, open(tmp, "wb") as out:
            total = response.headers.get("Content-Length")
            bar = _progress(int(total) if total else None, path.name) if progress else None
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                if bar is not None:
                    bar.update(len(block))
            if bar is not None:
                bar.close()
        _check_hash(tmp, sha256, md5)
        os.replace(tmp, path)
    except OSError as err:
        raise RegistrationInputError(f"{url}: download failed ({err})") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _safe_members_zip(archive: zipfile.ZipFile, dest: Path) -> None:
    for name in archive.namelist():
        if not (dest / name).resolve().is_relative_to(dest.resolve()):
            raise RegistrationInputError(f"{archive.filename}: member {name!r} would unpack outside {dest}")


def extract_archive(
    archive: str | os.PathLike, dest: str | os.PathLike, overwrite: bool = False
) -> list[Path]:
    """Unpack a zip / tar(.gz/.bz2/.xz) archive into ``dest`` (into a temporary folder first, then moved);
    return the top-level items placed in ``dest``.

    Refuses members that would land outside ``dest``; existing files are replaced only with ``overwrite``.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / f".extract-{uuid.uuid4().hex}"
    placed: list[Path] = []
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                _safe_members_zip(z, staging)
                z.extractall(staging)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                for member in t.getmembers():
                    if not (staging / member.name).resolve().is_relative_to(staging.resolve()):
                        raise RegistrationInputError(
                            f"{archive}: member {member.name!r} would unpack outside"
                        )
                if hasattr(tarfile, "data_filter"):  # also rejects links leaving the folder
                    t.extractall(staging, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    t.extractall(staging)
        else:
            raise RegistrationInputError(f"{archive}: not a zip or tar archive")
        for item in sorted(staging.iterdir()):
            if item.name == "__MACOSX":  # resource forks in archives made on macOS
                continue
            target = dest / item.name
            if target.exists():
                if not overwrite:
                    raise RegistrationInputError(f"{target}: exists; pass overwrite=True to replace it")
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(item, target)
            placed.append(target)
    except (tarfile.TarError, zipfile.BadZipFile) as err:
        raise RegistrationInputError(f"{archive}: cannot unpack ({err})") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return placed


def download_learn2reg(
    task: str,
    dest: str | os.PathLike,
    *,
    url: str | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    overwrite: bool = False,
    keep_archive: bool = False,
    progress: bool = True,
) -> Path:
    """Download and unpack the Learn2Reg dataset ``task`` (a key of :data:`LEARN2REG_TASKS`) into ``dest``.

    ``url`` overrides the registered address (a mirror, or ``file://`` for a local archive). Returns the
    dataset folder: the single top-level folder of the archive when there is one, else ``dest``. An already
    unpacked dataset is not downloaded again unless ``overwrite=True``.
    """
    if task not in LEARN2REG_TASKS and url is None:
        raise ValueError(
            f"unknown Learn2Reg task {task!r}; known: {', '.join(LEARN2REG_TASKS)} (or pass url=)"
        )
    entry = LEARN2REG_TASKS.get(task)
    url = url or entry.url
    sha256 = sha256 or (entry.sha256 if entry else None)
    filename = entry.filename if entry else Path(urllib.request.url2pathname(url.split("?")[0])).name
    dest = Path(dest)
    marker = dest / f".{task}.complete"
    if marker.exists() and not overwrite:
        return Path(marker.read_text().strip() or dest)
    archive = download_file(
        url, dest / filename, sha256=sha256, md5=md5, overwrite=overwrite, progress=progress
    )
    placed = extract_archive(archive, dest, overwrite=overwrite)
    if not keep_archive:
        archive.unlink(missing_ok=True)
    root = placed[0] if len(placed) == 1 and placed[0].is_dir() else dest
    marker.write_text(str(root))
    return root
