"""Sharded image data for large and remote data sets, on litdata (Lightning's streaming
format: ``optimize`` writes chunks, ``StreamingDataset`` reads them, from a local path or an
object store).

``python -m ddpm.data.shards SRC DST`` writes SRC (an image folder, or a data set name with
``--root``) as chunks of items ``{"image": encoded bytes, "label": int, "index": int}`` plus
``ddpm_shards.json`` (format, version, labels, chunk sizes). ``data=shards data.root=DST``
trains from them: ``ShardImages`` decodes items by index, so the batch order stays this
project's (``ddpm.data.batches``, a function of the step: exact resume mid-epoch, with
workers, under DDP), grouped by chunk so that each rank reads its own chunks.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ddpm.data.datasets import BUILDERS, decode_image, keep_readable, verify_image

FORMAT, VERSION = "ddpm-shards", 1
MANIFEST = "ddpm_shards.json"
NATIVE_CHANNELS = {"digits": 1, "mnist5k": 1, "mnist": 1, "fashion_mnist": 1, "cifar10": 3}
REMOTE = ("s3://", "gs://", "gcs://", "azure://", "az://", "r2://", "hf://")


def is_remote(root: str) -> bool:
    return str(root).startswith(REMOTE)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, C] -> PNG bytes (lossless)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return buffer.getvalue()


# ---- writing ------------------------------------------------------------------------


def _folder_item(job: tuple[int, str, int, int | None, int]) -> dict[str, Any]:
    """One input of ``optimize``: (index, path, label, image_size, channels) -> the item:
    the file's own bytes, or, with an image size, the resized crop as PNG."""
    index, path, label, image_size, channels = job
    if image_size is None:
        data = Path(path).read_bytes()
    else:
        pixels = decode_image(Path(path).read_bytes(), image_size, channels)  # [C, S, S]
        data = encode_png(pixels.permute(1, 2, 0).numpy())
    return {"image": data, "label": int(label), "index": int(index)}


def _array_item(job: tuple[int, np.ndarray, int]) -> dict[str, Any]:
    """(index, uint8 [C, H, W], label) -> the item, its pixels as PNG."""
    index, pixels, label = job
    return {"image": encode_png(np.moveaxis(pixels, 0, -1)), "label": int(label), "index": index}


def write_shards(
    src: str,
    dst: str,
    root: str | None = None,
    image_size: int | None = None,
    channels: int = 3,
    chunk_bytes: str = "64MB",
    workers: int | None = None,
    skip_bad_files: bool = False,
) -> dict[str, Any]:
    """Write the data set ``src`` (a folder of images, or a name of ``BUILDERS`` whose files
    are under ``root``) into ``dst`` as shards; returns the manifest. A ``dst`` that holds
    files already is refused: nothing written before is overwritten."""
    import litdata

    out = Path(dst)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{dst} is not empty: write the shards to a new folder")
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if Path(src).is_dir():
        source = BUILDERS["folder"](Path(src), False, channels)
        kept, _ = keep_readable(source.files, verify_image, skip_bad_files)  # headers, once
        files, labels = [source.files[i] for i in kept], source.labels[kept].tolist()
        inputs: list[Any] = [
            (i, str(f), y, image_size, channels)
            for i, (f, y) in enumerate(zip(files, labels, strict=True))
        ]
        fn, origin = _folder_item, str(Path(src).resolve())
    elif src in NATIVE_CHANNELS:
        source = BUILDERS[src](Path(root or "data"), False, NATIVE_CHANNELS[src])
        images, labels = source.images.numpy(), source.labels.tolist()  # [N, C, H, W]
        inputs = [(i, images[i], y) for i, y in enumerate(labels)]
        fn, origin = _array_item, src
    else:
        raise ValueError(
            f"{src} is neither an image folder nor a data set name; give a folder, or one "
            f"of {sorted(NATIVE_CHANNELS)} (with --root DIR)"
        )
    litdata.optimize(
        fn=fn,
        inputs=inputs,
        output_dir=str(out.resolve()),
        chunk_bytes=chunk_bytes,
        num_workers=workers,
        mode=None,
        start_method="fork",
        keep_data_ordered=True,  # static slices in order: item i is input i
    )
    index = json.loads((out / "index.json").read_text())
    sizes = [int(chunk["chunk_size"]) for chunk in index["chunks"]]
    _check_order(out, len(inputs))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_items": len(inputs),
        "chunk_sizes": sizes,
        "labels": [int(y) for y in labels],
        "num_classes": (max(labels) + 1) if labels else 0,
        "image_size": image_size,
        "source": origin,
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest))
    tmp.replace(out / MANIFEST)  # last: a folder with a manifest holds whole shards
    return manifest


def _check_order(out: Path, count: int) -> None:
    """With ``keep_data_ordered`` litdata keeps the input order; the manifest's labels
    rely on it: checked on the first, last and a spread of items."""
    import litdata

    data = litdata.StreamingDataset(str(out))
    if len(data) != count:
        raise RuntimeError(f"litdata wrote {len(data)} items of {count}")
    for i in sorted({0, count - 1, *range(0, count, max(1, count // 64))}):
        if int(data[i]["index"]) != i:
            raise RuntimeError(f"litdata reordered the items: item {i} is input {data[i]['index']}")


# ---- reading ------------------------------------------------------------------------


def read_manifest(root: str) -> dict[str, Any]:
    """The manifest of the shards at ``root`` (a folder or an object-store URL), refused in
    one line when it is missing, unreadable or of another format version."""
    where = str(root).rstrip("/")
    try:
        if is_remote(where):
            from litdata.streaming.downloader import get_downloader

            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, MANIFEST)
                get_downloader(where, tmp, []).download_file(f"{where}/{MANIFEST}", local)
                text = Path(local).read_text()
        else:
            text = (Path(where).expanduser() / MANIFEST).read_text()
        manifest = json.loads(text)
    except Exception as exc:  # a missing path, no access, not JSON: said in one line
        raise FileNotFoundError(
            f"no readable shards at data.root={root} ({type(exc).__name__}: {exc}); write "
            "them with python -m ddpm.data.shards SRC DST"
        ) from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"the shards at {root} are {manifest.get('format')} version "
            f"{manifest.get('version')}, and this ddpm reads {FORMAT} version {VERSION}: "
            "write them again with python -m ddpm.data.shards SRC DST"
        )
    return manifest


def chunk_of_items(chunk_sizes: Sequence[int]) -> Tensor:
    """The chunk of every item, in item order: [N] int64."""
    sizes = torch.tensor(list(chunk_sizes), dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes)


class ShardImages(Dataset):
    """Items ``indices`` of the shards at ``root``, decoded on access (in the loader's
    workers); the same (image [C, S, S] uint8, label, i) as the other data sets. Each
    process opens its own ``StreamingDataset`` (remote chunks go to ``cache_dir``)."""

    def __init__(
        self,
        root: str,
        indices: Tensor,
        labels: Tensor,
        image_size: int,
        channels: int,
        cache_dir: str | None = None,
    ) -> None:
        import litdata  # noqa: F401 - imported here, so forked loader workers inherit it

        self.root, self.indices, self.labels = str(root), indices, labels
        self.image_size, self.channels, self.cache_dir = image_size, channels, cache_dir
        self._data: Any = None

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}  # each worker opens its own reader

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        if self._data is None:
            import litdata

            root = self.root if is_remote(self.root) else str(Path(self.root).expanduser())
            # batch_decode=0: one item per read (the default decodes a window of up to
            # 256 items around each index: 40x slower for the random order of training)
            self._data = litdata.StreamingDataset(root, cache_dir=self.cache_dir, batch_decode=0)
        item = self._data[int(self.indices[i])]
        return decode_image(item["image"], self.image_size, self.channels), self.labels[i], i


def main(argv: list[str] | None = None) -> None:
    """``python -m ddpm.data.shards SRC DST``: one line and exit 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m ddpm.data.shards", description="Write a data set as litdata shards."
    )
    parser.add_argument("src", help="an image folder, or digits|mnist|fashion_mnist|cifar10")
    parser.add_argument("dst", help="a new folder for the shards")
    parser.add_argument("--root", help="where a named data set's files are (default: data)")
    parser.add_argument("--image-size", type=int, help="store resized crops (PNG) of this size")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--chunk-bytes", default="64MB")
    parser.add_argument("--workers", type=int, help="processes (default: min(8, CPUs))")
    parser.add_argument("--skip-bad-files", action="store_true")
    args = parser.parse_args(argv)
    try:
        manifest = write_shards(
            args.src, args.dst, args.root, args.image_size, args.channels, args.chunk_bytes,
            args.workers, args.skip_bad_files,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"wrote {manifest['num_items']} images in {len(manifest['chunk_sizes'])} chunks to "
        f"{args.dst}; train with: python train.py data=shards data.root={args.dst}"
    )


if __name__ == "__main__":
    main()
