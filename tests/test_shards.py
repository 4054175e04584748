"""Shard format: .npy payloads, the tar reader, atomic writes, resume, manifest, rank split."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterator, List, Sequence

import numpy as np
import pytest
import webdataset as wds

from bafm.data.manifest import MANIFEST, ShardError, latent_scaling_factor, read_manifest, update_manifest
from bafm.data.npy_codec import decode_npy, encode_npy, parse_npy_header
from bafm.data.shard_job import SplitJob, write_split
from bafm.data.shard_reader import check_sample, iter_samples, iter_tar_members, open_shard
from bafm.data.shard_writer import ShardWriter, sha256_file

SHAPE = (2, 4, 4)


def _moments(i: int) -> np.ndarray:
    return (np.arange(np.prod(SHAPE)).reshape(SHAPE) + 100 * i).astype(np.float16)


def _job(folder: Path, n: int = 10, per_shard: int = 4) -> SplitJob:
    common = {"dataset": "t", "num_classes": 3, "moments_shape": list(SHAPE), "latent_shape": [1, 4, 4],
              "dtype": "float16", "scaling_factor": 1.0, "has_flip": True}
    return SplitJob(folder, "train", [f"{i:05d}" for i in range(n)], [i % 3 for i in range(n)], per_shard, common)


def _encoder(log: List[int]):
    def encode(indices: Sequence[int]) -> Iterator:
        for start in range(0, len(indices), 3):
            idx = np.asarray(indices[start : start + 3])
            log.extend(idx.tolist())
            moments = np.stack([_moments(i) for i in idx])
            yield idx, moments, moments[..., ::-1]
    return encode


def test_npy_roundtrip_and_header_checks() -> None:
    arr = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float16)
    data = encode_npy(arr)
    np.testing.assert_array_equal(decode_npy(data), arr)
    np.testing.assert_array_equal(np.load(io.BytesIO(data)), arr)
    head = parse_npy_header(memoryview(data))
    assert (head.dtype, head.shape, head.nbytes) == (np.dtype(np.float16), SHAPE, arr.nbytes)
    with pytest.raises(ValueError, match="bad magic"):
        parse_npy_header(b"NOTNUMPY" + data[8:])
    with pytest.raises(ValueError, match="data bytes"):
        parse_npy_header(data[:-2])


def test_writer_roundtrip_matches_webdataset(tmp_path: Path) -> None:
    path = tmp_path / "train-000000.tar"
    with ShardWriter(path) as writer:
        for i in range(5):
            writer.write(f"{i:04d}", _moments(i), i % 3, _moments(i)[..., ::-1] if i % 2 else None)
        record = writer.commit()
    assert record.count == 5 and record.sha256 == sha256_file(path) and not list(tmp_path.glob("*.tmp"))
    samples = [check_sample(s, SHAPE, 3) for s in iter_samples(open_shard(str(path)), str(path))]
    assert [s.key for s in samples] == [f"{i:04d}" for i in range(5)]
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(decode_npy(s.moments), _moments(i))
        assert s.cls == i % 3 and (s.moments_flip is None) == (i % 2 == 0)
    # The same bytes through webdataset's own tar reader.
    ref = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [r["__key__"] for r in ref] == [s.key for s in samples]
    for r, s in zip(ref, samples):
        assert r["moments.npy"] == bytes(s.moments) and int(r["cls"]) == s.cls


def test_writer_is_reproducible_and_abort_leaves_nothing(tmp_path: Path) -> None:
    digests = []
    for name in ("a-000000.tar", "b-000000.tar"):
        with ShardWriter(tmp_path / name) as writer:
            writer.write("0000", _moments(0), 1)
            digests.append(writer.commit().sha256)
    assert digests[0] == digests[1]  # mtime fixed: same samples, same bytes
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "c-000000.tar") as writer:
        writer.write("0000", _moments(0), 1)
        raise RuntimeError("interrupted")
    assert not (tmp_path / "c-000000.tar").exists() and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="must not contain"), ShardWriter(tmp_path / "d-000000.tar") as writer:
        writer.write("a.b", _moments(0), 1)


def test_reader_long_names_and_pax(tmp_path: Path) -> None:
    payload = encode_npy(_moments(0))
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, data in ((f"{'d' * 120}/k1.moments.npy", payload), (f"{'d' * 120}/k1.cls", b"2")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        members = list(iter_tar_members(buf.getvalue(), "mem.tar"))
        assert [m[0] for m in members] == [f"{'d' * 120}/k1.moments.npy", f"{'d' * 120}/k1.cls"]
        assert bytes(members[0][1]) == payload


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "train-000000.tar"
    with ShardWriter(path) as writer:
        for i in range(4):
            writer.write(f"{i:04d}", _moments(i), 0, _moments(i))
        writer.commit()
    return path


@pytest.mark.parametrize("cut", [0.5, "boundary", "no_end"])
def test_truncated_shard_names_shard(shard: Path, cut: object) -> None:
    data = shard.read_bytes()
    if cut == 0.5:
        data = data[: len(data) // 2 + 100]  # inside a member
    else:
        members = list(tarfile.open(shard))
        # At a member boundary (two full samples kept), or just without the end-of-archive blocks.
        end = members[-1].offset_data + 512 if cut == "no_end" else members[6].offset
        data = data[:end]
    shard.write_bytes(data)
    with pytest.raises(ShardError, match=r"train-000000\.tar.*truncated"):
        list(iter_samples(open_shard(str(shard)), str(shard)))


def test_corrupt_header_and_bad_samples(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[1024 + 5] ^= 0xFF  # the name field of the second member's header (cls at 0, its data at 512)
    bad = shard.with_name("bad.tar")
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="bad.tar.*checksum"):
        list(iter_samples(open_shard(str(bad)), str(bad)))
    good = next(iter_samples(open_shard(str(shard)), str(shard)))
    with pytest.raises(ShardError, match=r"train-000000\.tar: sample '0000': missing 'cls'"):
        check_sample({k: v for k, v in good.items() if k != "cls"}, SHAPE, 3)
    f32 = dict(good, **{"moments.npy": memoryview(encode_npy(_moments(0).astype(np.float32)))})
    with pytest.raises(ShardError, match=r"sample '0000': 'moments.npy' is float32 \(2, 4, 4\), expected float16"):
        check_sample(f32, SHAPE, 3)
    wrong_flip = dict(good, **{"moments_flip.npy": memoryview(encode_npy(_moments(0).reshape(2, 8, 2)))})
    with pytest.raises(ShardError, match=r"'moments_flip.npy' is float16 \(2, 8, 2\), expected float16 \(2, 4, 4\)"):
        check_sample(wrong_flip, SHAPE, 3)
    with pytest.raises(ShardError, match=r"class id 7 outside \[0, 3\)"):
        check_sample(dict(good, cls=memoryview(b"7")), SHAPE, 3)


def test_write_split_resumes_after_interruption(tmp_path: Path) -> None:
    clean = write_split(_job(tmp_path / "clean"), _encoder([]), progress=False)
    assert clean is not None and clean["splits"]["train"]["count"] == 10
    assert [s["count"] for s in clean["splits"]["train"]["shards"]] == [3, 3, 4]  # balanced sizes

    folder = tmp_path / "resumed"
    seen: List[int] = []

    def crash(indices: Sequence[int]) -> Iterator:
        for i, batch in enumerate(_encoder(seen)(indices)):
            if i == 2:  # after 6 samples: shards 0 and 1 done, shard 2 not started
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(KeyboardInterrupt):
        write_split(_job(folder), crash, progress=False)
    assert sorted(p.name for p in folder.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not (folder / MANIFEST).exists()  # readers see no dataset until it is complete
    with pytest.raises(FileNotFoundError, match="make data"):
        read_manifest(folder)
    stale = folder / "train-000002.tar.12345.tmp"  # as left by a killed process
    stale.write_bytes(b"half a shard")

    seen.clear()
    manifest = write_split(_job(folder), _encoder(seen), progress=False)
    assert seen == [6, 7, 8, 9]  # finished shards skipped
    assert not stale.exists()
    assert manifest == json.loads((folder / MANIFEST).read_text())
    assert manifest["splits"] == clean["splits"]  # same bytes, same checksums
    for rec in manifest["splits"]["train"]["shards"]:
        assert sha256_file(folder / rec["name"]) == rec["sha256"]
    with pytest.raises(ValueError, match="other settings.*samples_per_shard"):
        write_split(_job(folder, per_shard=5), _encoder([]), progress=False)


def test_ranks_write_disjoint_shards(tmp_path: Path) -> None:
    logs: List[List[int]] = [[], []]
    first = write_split(_job(tmp_path, n=10, per_shard=2), _encoder(logs[1]), rank=1, world_size=2, progress=False)
    assert first is None  # rank 0's shards are still missing
    last = write_split(_job(tmp_path, n=10, per_shard=2), _encoder(logs[0]), rank=0, world_size=2, progress=False)
    assert logs == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7]]  # shard i belongs to rank i % 2
    clean = write_split(_job(tmp_path / "one", n=10, per_shard=2), _encoder([]), progress=False)
    assert last is not None and last["splits"] == clean["splits"]


def test_manifest_merges_splits_and_rejects_mixed_settings(tmp_path: Path) -> None:
    common = {"scaling_factor": 0.18215, "moments_shape": (8, 4, 4)}
    update_manifest(tmp_path, common, "train", {"count": 3})
    merged = update_manifest(tmp_path, common, "val", {"count": 1})
    assert merged["splits"] == {"train": {"count": 3}, "val": {"count": 1}}
    assert merged["moments_shape"] == [8, 4, 4]
    with pytest.raises(ValueError, match="scaling_factor"):
        update_manifest(tmp_path, dict(common, scaling_factor=1.0), "val", {"count": 1})


def test_latent_scaling_factor_prefers_the_manifest(tmp_path):
    from factories import synthetic_shards

    assert latent_scaling_factor(tmp_path / "none", 0.18215) == 0.18215  # images encoded on the fly
    folder = synthetic_shards(tmp_path / "syn", scaling_factor=0.5)
    assert latent_scaling_factor(folder, 0.18215) == 0.5
    (folder / MANIFEST).write_text(json.dumps({"format": "other", "scaling_factor": 0.5}))
    with pytest.raises(ValueError, match=r"manifest\.json: format 'other', expected 'bafm-latents-1'"):
        latent_scaling_factor(folder, 0.18215)
