"""Demo data, dataset scanning, buckets, augmentation and the seeded, resumable data order."""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from sdcompress.errors import SdcError
from sdcompress.training.data import (
    DataConfig,
    ResumableBatchSampler,
    _bucket_ladder,
    bucket_sizes,
    build_dataset,
    collate,
    crop_and_resize,
    epoch_batches,
    rank_batches,
    scan,
)
from sdcompress.training.demo_data import demo_samples, write_demo_dataset


def test_demo_data_is_deterministic_and_captioned(tmp_path):
    a = demo_samples(6, seed=3, size=32)
    b = demo_samples(6, seed=3, size=32)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b, strict=True))
    assert a[0].caption.startswith("a ") and "background" in a[0].caption
    assert [s.caption for s in demo_samples(6, seed=4, size=32)] != [s.caption for s in a]


def test_demo_data_layouts(tmp_path):
    kohya = write_demo_dataset(tmp_path / "k", 3, size=32)
    assert len(list(kohya.glob("*.png"))) == 3 and len(list(kohya.glob("*.txt"))) == 3
    folder = write_demo_dataset(tmp_path / "i", 3, size=32, layout="imagefolder")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert {r["file_name"] for r in rows} == {p.name for p in folder.glob("*.png")}
    for config in (DataConfig(data_dir=kohya, resolution=32), DataConfig(data_dir=folder, resolution=32)):
        records, stats, _ = scan(config)
        assert stats.images == 3 and stats.missing_captions == 0
        assert all(r.caption and "background" in r.caption for r in records)
    with pytest.raises(SdcError, match="already exists"):
        write_demo_dataset(tmp_path / "k", 3, size=32)


def test_demo_photos_from_scikit_image():
    pytest.importorskip("skimage")
    samples = demo_samples(0, size=32, photos=True)
    assert {s.name for s in samples} == {"photo_astronaut", "photo_chelsea", "photo_coffee", "photo_rocket"}
    assert all(s.image.size == (32, 32) for s in samples)


def test_unreadable_images_skipped_and_missing_captions_counted(tmp_path):
    data = write_demo_dataset(tmp_path / "d", 4, size=32)
    (data / "broken.png").write_bytes(b"not a png at all")
    Image.new("RGB", (40, 24), "red").save(data / "uncaptioned.png")
    dataset, stats = build_dataset(DataConfig(data_dir=data, resolution=32), seed=0)
    assert (stats.images, stats.unreadable, stats.missing_captions) == (5, 1, 1)
    captions = {r.source.rsplit("/", 1)[-1]: r.caption for r in dataset.records}
    assert captions["uncaptioned.png"] is None
    index = [r.source for r in dataset.records].index(str(data / "uncaptioned.png"))
    assert dataset[(index, 0)]["caption"] == ""
    with pytest.raises(SdcError, match="no caption.*--require-captions"):
        scan(DataConfig(data_dir=data, resolution=32, require_captions=True))


def test_empty_or_missing_data_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdcError, match="no usable images"):
        scan(DataConfig(data_dir=tmp_path / "empty"))
    with pytest.raises(SdcError, match="does not exist"):
        scan(DataConfig(data_dir=tmp_path / "nope"))
    with pytest.raises(SdcError, match="multiple of 8"):
        scan(DataConfig(data_dir=tmp_path / "empty", resolution=30))


def test_hf_dataset_without_datasets_package_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(SdcError, match="pip install datasets"):
        scan(DataConfig(dataset_name="someone/pokemon"))


def test_epoch_order_is_seeded_and_sharded():
    targets = [(32, 32)] * 7 + [(32, 64)] * 3
    a = epoch_batches(targets, 2, seed=1, epoch=0)
    assert a == epoch_batches(targets, 2, seed=1, epoch=0)
    assert a != epoch_batches(targets, 2, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10))
    assert all(len({targets[i] for i in b}) == 1 for b in a)  # a batch never mixes buckets
    r0, r1 = rank_batches(a, 0, 2), rank_batches(a, 1, 2)
    assert len(r0) == len(r1) and not {i for b in r0 for i in b} & {i for b in r1 for i in b}
    sampler = ResumableBatchSampler(a, epoch=5, skip=3)
    assert [k for k in sampler][0] == [(i, 5) for i in a[3]]
    with pytest.raises(SdcError, match="fewer than"):
        rank_batches(a[:1], 0, 2)


def test_bucket_ladder_spans_the_ratios_at_the_pixel_budget():
    sizes = bucket_sizes(1024, 64)
    assert sizes[0] == (1024, 1024) and (1152, 896) in sizes and (896, 1152) in sizes
    assert all(h % 64 == 0 and w % 64 == 0 and abs(h * w / 1024**2 - 1) < 0.1 for h, w in sizes)
    assert len(set(sizes)) == len(sizes) == 9  # 3:4 and 1:2 round onto 4:5 and 9:16 at this size
    assert _bucket_ladder(8, 16) == [(16, 16)]  # never a side under one step


def test_bucket_ladder_fallback_is_the_ladder_diffusers_builds():
    """diffusers < 0.40 has no `generate_aspect_ratio_buckets`; our fallback must give its buckets."""
    from diffusers import training_utils

    if not hasattr(training_utils, "generate_aspect_ratio_buckets"):
        pytest.skip("this diffusers (< 0.40) has no ladder to compare with; the other bucket tests run ours")
    for resolution in (64, 72, 120, 256, 512, 768, 1000, 1024, 1536):
        for step in (8, 16, 64):
            expected = training_utils.generate_aspect_ratio_buckets(resolution, divisibility=step)
            assert _bucket_ladder(resolution, step) == expected, (resolution, step)


def test_buckets_crop_and_flip(tmp_path):
    Image.new("RGB", (128, 64), "blue").save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("wide")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "square.png")
    (tmp_path / "square.txt").write_text("square")
    dataset, _ = build_dataset(
        DataConfig(data_dir=tmp_path, resolution=64, buckets=True, bucket_step=16), seed=0
    )
    by_name = {r.source.rsplit("/", 1)[-1]: t for r, t in zip(dataset.records, dataset.targets, strict=True)}
    assert by_name["square.png"] == (64, 64)
    h, w = by_name["wide.png"]
    assert w > h and h % 16 == 0 and w % 16 == 0
    sample = dataset[(0, 0)]
    assert sample["pixel_values"].shape[1:] == sample["target_size"]
    assert float(sample["pixel_values"].min()) >= -1.0 and float(sample["pixel_values"].max()) <= 1.0
    batch = collate([dataset[(0, 0)]])
    assert batch["original_sizes"].shape == (1, 2) and batch["crop_top_lefts"].shape == (1, 2)

    image = Image.new("RGB", (100, 50))
    _, corner = crop_and_resize(image, (50, 50), center=True, flip=False, rng=random.Random(0))
    assert corner == (0, 25)
    _, flipped = crop_and_resize(image, (50, 50), center=False, flip=True, rng=random.Random(0))
    _, plain = crop_and_resize(image, (50, 50), center=False, flip=False, rng=random.Random(0))
    assert flipped[1] == 100 - plain[1] - 50


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    data = write_demo_dataset(tmp_path / "d", 4, size=48)
    config = DataConfig(
        data_dir=data, resolution=32, center_crop=False, random_flip=True, caption_dropout=0.5
    )
    d1, _ = build_dataset(config, seed=7)
    d2, _ = build_dataset(config, seed=7)
    for key in [(0, 0), (1, 0), (1, 3)]:
        assert d1[key]["pixel_values"].equal(d2[key]["pixel_values"])
        assert d1[key]["caption"] == d2[key]["caption"]
    drops = [d1[(i, e)]["caption"] == "" for i in range(4) for e in range(8)]
    assert any(drops) and not all(drops)
