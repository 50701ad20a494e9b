"""Image-text pair sources that are not what they seem: truncated, corrupt or concatenated tar shards,
empty captions, captions that are not UTF-8 text; each is an error naming the file or a skip that is
counted and reported once."""

from __future__ import annotations

import io
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vlprompt.data import ImageTextPairs, ImageTextPairsDataModule
from vlprompt.meta import cluster_pairs

N_PAIRS, N_EMPTY = 600, 40


@pytest.fixture(scope="module")
def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _captions(n=N_PAIRS, empty=N_EMPTY) -> list[bytes]:
    """``n`` captions, every 15th of the first ``15 * empty`` empty or whitespace only."""
    return [(b"" if i % 2 else b" \n\t ") if i % 15 == 3 and i < 15 * empty else f"a grey square {i}".encode()
            for i in range(n)]


def _tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _pair_members(png, captions) -> list[tuple[str, bytes]]:
    return [m for i, c in enumerate(captions) for m in ((f"{i:04d}.png", png), (f"{i:04d}.txt", c))]


def _end_of(path, member: str) -> int:
    """The byte just past ``member``'s (block-padded) data: a cut there leaves whole members only."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    return info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _source(kind, tmp_path, png, captions: list[bytes]):
    """The pairs as a folder, a CSV table or one tar shard."""
    if kind == "shard":
        return _tar(tmp_path / "cc-000.tar", _pair_members(png, captions))
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i, caption in enumerate(captions):
        (folder / f"{i:04d}.png").write_bytes(png)
        (folder / f"{i:04d}.txt").write_bytes(caption)
    if kind == "folder":
        return folder
    table = tmp_path / "pairs.csv"
    table.write_bytes(b"image,caption\n" + b"".join(b'pairs/%04d.png,"%s"\n' % (i, c) for i, c in enumerate(captions)))
    return table


# -- damaged shards ------------------------------------------------------------------------------------
def test_shard_cut_at_a_member_boundary_is_refused_naming_it(png, tmp_path):
    shard = _tar(tmp_path / "cc-000.tar", _pair_members(png, _captions(10, 0)))
    data = shard.read_bytes()
    shard.write_bytes(data[:_end_of(shard, "0005.txt")])  # tarfile reads the first 6 pairs without complaint
    with pytest.raises(OSError, match=r"cc-000\.tar does not end in a tar end-of-archive marker"):
        list(ImageTextPairs(shard))
    # a last member whose data ends in zeros passes the cheap check; the pass finds the cut
    zeros = _tar(tmp_path / "cc-001.tar", _pair_members(png, _captions(6, 0)) + [("0005.bin", bytes(1024))])
    zeros.write_bytes(zeros.read_bytes()[:_end_of(zeros, "0005.bin")])
    pairs = ImageTextPairs(zeros)
    with pytest.raises(OSError, match=r"cc-001\.tar is truncated: .* after member 0005\.bin \(6 pairs read from it\), "
                                      r"with no end-of-archive marker"):
        list(pairs)


def test_shard_with_garbage_where_a_header_should_be_is_refused(png, tmp_path):
    shard = _tar(tmp_path / "cc-000.tar", _pair_members(png, _captions(10, 0)))
    data = bytearray(shard.read_bytes())
    at = _end_of(shard, "0003.txt")
    data[at:at + tarfile.BLOCKSIZE] = b"\x7fgarbage" * (tarfile.BLOCKSIZE // 8)  # tarfile stops here, quietly
    shard.write_bytes(bytes(data))
    with pytest.raises(OSError, match=rf"cc-000\.tar is corrupt: byte {at}, after member 0003\.txt \(4 pairs read"):
        list(ImageTextPairs(shard))


def test_concatenated_shards_are_refused(png, tmp_path):
    a = _tar(tmp_path / "a.tar", _pair_members(png, _captions(3, 0)))
    b = _tar(tmp_path / "b.tar", _pair_members(png, _captions(3, 0)))
    both = tmp_path / "cc-000.tar"
    both.write_bytes(a.read_bytes() + b.read_bytes())  # tarfile stops at the first archive's end marker
    with pytest.raises(OSError, match=r"cc-000\.tar has data after its end-of-archive marker"):
        list(ImageTextPairs(both))


def test_corrupt_or_cut_shards_are_errors_naming_the_file_and_member(png, tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(OSError, match=r"garbage\.tar does not end in a tar end-of-archive marker"):
        ImageTextPairs(garbage)
    garbage.write_bytes(garbage.read_bytes()[:1024] + bytes(10240))  # ends in zeros: tarfile's own error, named
    with pytest.raises(OSError, match=r"garbage\.tar is not a readable tar file at its start: .*re-download"):
        list(ImageTextPairs(garbage))
    for member in ("0002.txt", "0002.png"):  # cut inside a caption, then inside an image
        shard = _tar(tmp_path / f"cut-{member}.tar", _pair_members(png, _captions(2, 0)) + [(member, bytes(4096))])
        shard.write_bytes(shard.read_bytes()[:_end_of(shard, member) - 2048])
        with pytest.raises(OSError, match=rf"cut-{member}\.tar is truncated inside member {member} .*2 pairs read"):
            list(ImageTextPairs(shard))


# -- captions -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["folder", "table", "shard"])
def test_empty_captions_are_skipped_and_counted_in_one_line(kind, png, tmp_path, caplog):
    source = _source(kind, tmp_path, png, _captions())
    with caplog.at_level(logging.DEBUG, logger="vlprompt.data.pairs"):
        pairs = ImageTextPairs(source)
        kept = list(pairs)
    assert len(kept) == N_PAIRS - N_EMPTY and all(p.caption for p in kept)
    assert pairs.skipped == N_EMPTY and pairs.skipped_by == {"empty captions": N_EMPTY}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    example = {"folder": "0003.txt", "table": "pairs.csv line 5", "shard": "member 0003.txt"}[kind]
    assert len(warnings) == 1, warnings
    assert f"skipped {N_EMPTY} of {N_PAIRS} pairs: {N_EMPTY} empty captions (e.g. " in warnings[0]
    assert example in warnings[0]


@pytest.mark.parametrize("kind", ["folder", "table", "shard"])
def test_no_caption_at_all_is_a_clear_error(kind, png, tmp_path):
    source = _source(kind, tmp_path, png, [b"", b"  ", b"\n"] * 4)
    with pytest.raises(ValueError, match=rf"{source.name}: no pair has a caption: 12 empty captions"):
        list(ImageTextPairs(source))
    image, text = torch.randn(12, 8), torch.randn(12, 8)  # straight to the clustering: named there too
    with pytest.raises(ValueError, match="no pair has a caption"):
        cluster_pairs(image, text, [""] * 12, n_domains=2, classes_per_domain=2)


@pytest.mark.parametrize("kind", ["folder", "table", "shard"])
def test_captions_that_are_not_utf8_are_skipped_naming_the_file(kind, png, tmp_path, caplog):
    captions = _captions(6, 0)
    captions[2] = "un caf\u00e9 gris".encode("latin-1")
    source = _source(kind, tmp_path, png, captions)
    with caplog.at_level(logging.WARNING, logger="vlprompt.data.pairs"):
        pairs = ImageTextPairs(source)
        kept = list(pairs)
    assert [p.key for p in kept] == [f"{i:04d}" if kind != "table" else f"pairs/{i:04d}.png" for i in (0, 1, 3, 4, 5)]
    assert pairs.skipped_by == {"captions that are not UTF-8 text": 1}
    [warning] = [r.getMessage() for r in caplog.records]
    where = {"folder": "0002.txt", "table": "pairs.csv line 4", "shard": "cc-000.tar member 0002.txt"}[kind]
    assert where in warning and "can't decode byte 0xe9" in warning and "re-save the captions as UTF-8" in warning
    # every caption in another encoding: the cause is named, not "fewer clusters than ways" later
    (tmp_path / "all").mkdir()
    source = _source(kind, tmp_path / "all", png, [c.encode("latin-1") for c in ("café", "thé", "crème")])
    with pytest.raises(ValueError, match="no pair has a caption: 3 captions that are not UTF-8 text .*re-save"):
        list(ImageTextPairs(source))


def test_the_data_module_embeds_only_pairs_with_captions(png, tmp_path):
    source = _source("folder", tmp_path, png, _captions(30, 2))
    dm = ImageTextPairsDataModule(str(source), num_workers=0)
    dm.set_preprocess({"size": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    batches = list(dm.embedding_loader())
    assert sum(len(c) for _, c in batches) == 28 and all(dm.captions) and len(dm.refs) == 28
