"""The generated VQA suite: determinism, splits, held-out rule, answer correctness and every export format."""

from __future__ import annotations

import base64
import csv
import dataclasses
import importlib.util
import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from masters.data import (
    FAMILIES,
    HELDOUT_COMBINATIONS,
    HELDOUT_FAMILIES,
    MIN_IMAGE_SIZE,
    SUITE_VERSION,
    VOCABULARY,
    VQASample,
    describe,
    make_sample,
    make_split,
    read_parquet,
    text_corpus,
    write_hf_dataset,
    write_lmms_eval,
    write_parquet,
    write_vlmevalkit_tsv,
)
from masters.data.captions import rationale
from masters.data.export import png_bytes
from masters.data.shapes import COLOURS

REPO = Path(__file__).resolve().parents[1]
HELDOUT = {tuple(pair) for pair in HELDOUT_COMBINATIONS}


def fingerprint(sample: VQASample) -> tuple:
    return (sample.id, png_bytes(sample.image), sample.question, sample.answer, json.dumps(sample.meta, sort_keys=True))


def pixels(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


@pytest.fixture(scope="module")
def mixed_samples() -> list[VQASample]:
    """Samples of every family, split and a second seed, for the export tests."""
    return make_split("test", 22, seed=5) + make_split("heldout", 6, seed=5)


# --------------------------------------------------------------------------- determinism


def test_same_arguments_give_identical_bytes_for_every_family():
    for family in FAMILIES:
        for split in ("train", "heldout") if family in HELDOUT_FAMILIES else ("train",):
            first, second = make_sample(family, split, 7, 3), make_sample(family, split, 7, 3)
            assert fingerprint(first) == fingerprint(second)
            assert first.image.mode == "RGB" and first.image.size == (64, 64)
            assert first.id == f"{family}/{split}/7/3"
            json.dumps(first.meta)  # JSON-serialisable


def test_samples_do_not_depend_on_generation_order_or_global_random_state():
    random.seed(1)
    forward = [fingerprint(s) for s in make_split("val", 44, seed=2)]
    random.seed(2)
    n = len(FAMILIES)
    backward = [fingerprint(make_sample(FAMILIES[i % n], "val", 2, i // n)) for i in reversed(range(44))]
    assert forward == backward[::-1]
    # A prefix of a larger split is the smaller split.
    assert [fingerprint(s) for s in make_split("val", 13, seed=2)] == forward[:13]


def test_seeds_and_splits_are_different_streams():
    for family in FAMILIES:
        seed0 = {png_bytes(make_sample(family, "train", 0, i).image) for i in range(5)}
        seed1 = {png_bytes(make_sample(family, "train", 1, i).image) for i in range(5)}
        assert not seed0 & seed1, family
    train = {png_bytes(s.image) for s in make_split("train", 150)}
    test = {png_bytes(s.image) for s in make_split("test", 150)}
    assert len(train) == 150 and len(test) == 150  # no duplicate images within a split either
    assert not train & test


def test_make_split_interleaves_families_round_robin():
    samples = make_split("train", 3 * len(FAMILIES))
    assert [s.family for s in samples] == list(FAMILIES) * 3
    assert [s.id.rsplit("/", 1)[1] for s in samples[: len(FAMILIES)]] == ["0"] * len(FAMILIES)
    heldout = make_split("heldout", 2 * len(HELDOUT_FAMILIES))
    assert [s.family for s in heldout] == list(HELDOUT_FAMILIES) * 2
    chosen = make_split("test", 5, families=["text_sum", "chart_value"])
    assert [s.family for s in chosen] == ["text_sum", "chart_value"] * 2 + ["text_sum"]
    assert {s.difficulty for s in make_split("train", len(FAMILIES))} == {1, 2, 3}


def test_image_size_is_configurable():
    for size in (MIN_IMAGE_SIZE, 96):
        for family in FAMILIES:
            image = make_sample(family, "test", 0, 1, image_size=size).image
            assert image.size == (size, size) and image.mode == "RGB"


# --------------------------------------------------------------------------- held-out rule


def test_heldout_pairs_never_appear_in_train_val_test_and_every_heldout_question_uses_one():
    for split in ("train", "val", "test"):
        for sample in make_split(split, 200, families=HELDOUT_FAMILIES):
            seen = {(o["colour"], o["shape"]) for o in sample.meta["objects"]}
            assert not seen & HELDOUT, (sample.id, seen & HELDOUT)
            assert not {tuple(p) for p in sample.meta["involves"]} & HELDOUT
    for sample in make_split("heldout", 240):
        involved = {tuple(p) for p in sample.meta["involves"]} & HELDOUT
        assert involved, sample.id
        # The held-out pair is named in the question, or it is the object the question asks about.
        target = sample.meta.get("target")
        assert any(
            f"{c} {s}" in sample.question or (target and (target["colour"], target["shape"]) == (c, s))
            for c, s in involved
        ), (sample.id, sample.question, involved)


# --------------------------------------------------------------------------- answers


def matches(query: dict, obj: dict) -> bool:
    return query["colour"] in (None, obj["colour"]) and query["shape"] in (None, obj["shape"])


def relation(name: str, subject: dict, anchor: dict) -> bool:
    return {
        "left of": subject["col"] < anchor["col"],
        "right of": subject["col"] > anchor["col"],
        "above": subject["row"] < anchor["row"],
        "below": subject["row"] > anchor["row"],
    }[name]


def the_one(objects: list[dict], colour: str, shape: str) -> dict:
    found = [o for o in objects if (o["colour"], o["shape"]) == (colour, shape)]
    assert len(found) == 1, f"'{colour} {shape}' must name exactly one object, found {len(found)}"
    return found[0]


def expected_answer(sample: VQASample) -> str:
    """The answer recomputed from the scene/chart/text in meta, independently of the generators."""
    meta, family = sample.meta, sample.family
    objects = meta.get("objects", [])
    if family == "shapes_exist":
        q = meta["query"]
        assert f"{q['colour']} {q['shape']}?" in sample.question
        return "yes" if any(matches(q, o) for o in objects) else "no"
    if family == "shapes_count":
        return str(sum(matches(meta["query"], o) for o in objects))
    if family == "shapes_attribute":
        referenced = [o for o in objects if matches(meta["reference"], o)]
        assert len(referenced) == 1
        return referenced[0][meta["attribute"]]
    if family == "shapes_spatial":
        subject = the_one(objects, meta["subject"]["colour"], meta["subject"]["shape"])
        anchor = the_one(objects, meta["anchor"]["colour"], meta["anchor"]["shape"])
        assert f" {meta['relation']} " in sample.question
        return "yes" if relation(meta["relation"], subject, anchor) else "no"
    if family == "shapes_compare":
        first = sum(matches(meta["first"], o) for o in objects)
        second = sum(matches(meta["second"], o) for o in objects)
        assert first != second
        return "yes" if first > second else "no"
    if family == "shapes_two_hop":
        anchor = the_one(objects, meta["anchor"]["colour"], meta["anchor"]["shape"])
        related = [o for o in objects if o is not anchor and relation(meta["relation"], o, anchor)]
        assert len(related) == 1
        return related[0][meta["attribute"]]
    values = dict(zip(meta.get("labels", []), meta.get("values", [])))
    if family == "chart_value":
        return str(values[meta["query"]])
    if family == "chart_argmax":
        extreme = max(values.values()) if meta["extreme"] == "highest" else min(values.values())
        winners = [label for label, v in values.items() if v == extreme]
        assert len(winners) == 1
        return winners[0]
    if family == "chart_difference":
        first, second = meta["query"]
        return str(abs(values[first] - values[second]))
    if family == "text_read":
        assert meta["kind"] in sample.question
        return meta["text"]
    if family == "text_sum":
        assert meta["lines"] == [f"{i} {a}" for i, a in zip(meta["items"], meta["amounts"])]
        return str(sum(meta["amounts"]))
    raise AssertionError(f"no check for family {family}")


def test_answers_agree_with_meta_for_every_family():
    samples = make_split("train", 40 * len(FAMILIES), seed=11) + make_split("heldout", 40 * len(HELDOUT_FAMILIES))
    for sample in samples:
        assert sample.answer == expected_answer(sample), (sample.id, sample.question, sample.answer, sample.meta)
    yes_no = Counter(s.answer for s in samples if s.answer in ("yes", "no"))
    assert min(yes_no.values()) > 0.35 * sum(yes_no.values())  # balanced, so "yes" is not a free win


def test_descriptions_name_everything_in_the_image_for_every_family():
    assert describe(make_split("train", 3, seed=0, families=["shapes_exist"])[0]) == (
        "large green diamond top middle, small red diamond top right, small blue triangle middle right, "
        "small green square bottom middle, small orange circle bottom right"
    )
    for sample in make_split("train", 10 * len(FAMILIES), seed=5) + make_split("heldout", 20):
        text, meta = describe(sample), sample.meta
        if "objects" in meta:
            assert text.count(",") == len(meta["objects"]) - 1
            for obj in meta["objects"]:
                assert f"{obj['size']} {obj['colour']} {obj['shape']}" in text
        elif "values" in meta:
            assert text.startswith(f"{meta['kind']} chart") and all(f"{l} {v}" in text for l, v in zip(meta["labels"], meta["values"]))
        elif "lines" in meta:
            assert text.split(", ") == meta["lines"]
        else:
            assert text == f"{meta['kind']} {meta['text']}"
        assert describe(sample) == text  # deterministic
    bare = dataclasses.replace(make_split("train", 1, seed=0)[0], meta={})
    with pytest.raises(ValueError, match="has no meta a description can be built from"):
        describe(bare)


def test_scene_images_show_the_objects_in_meta():
    cell = 64 / 3
    for sample in make_split("test", 60, families=HELDOUT_FAMILIES):
        image = sample.image.load()
        occupied = set()
        for obj in sample.meta["objects"]:
            x, y = int((obj["col"] + 0.5) * cell), int((obj["row"] + 0.5) * cell)
            assert image[x, y] == COLOURS[obj["colour"]], (sample.id, obj)
            occupied.add((obj["row"], obj["col"]))
        for row in range(3):
            for col in range(3):
                if (row, col) not in occupied:
                    assert image[int((col + 0.5) * cell), int((row + 0.5) * cell)] not in COLOURS.values()


def test_bar_heights_follow_chart_values():
    # At 64 px the plot spans x 10..62 and y 52 (value 0) .. 5 (value 8).
    left, right, unit = 10, 62, (52 - 5) / 8
    checked = 0
    for sample in make_split("val", 90, families=["chart_value", "chart_argmax", "chart_difference"]):
        if sample.meta["kind"] != "bar":
            continue
        image = sample.image.load()
        values = sample.meta["values"]
        palette = Counter(image[x, y] for x in range(64) for y in range(64) if image[x, y] in COLOURS.values())
        bar_colour = palette.most_common(1)[0][0]
        for i, value in enumerate(values):
            x = int(left + (i + 0.5) * (right - left) / len(values))
            height = sum(image[x, y] == bar_colour for y in range(64))
            assert abs(height - value * unit) <= 1, (sample.id, values, i, height)
        checked += 1
    assert checked > 10


def test_reference_responses_reason_to_the_answer():
    """The rationale before `answer:` is what the answer follows from, family by family."""
    for sample in make_split("train", 20 * len(FAMILIES)) + make_split("heldout", 60):
        written, answer = sample.response.rsplit(". answer: ", 1)
        assert answer == sample.answer and rationale(sample.family, sample.meta) == written
        listed = [] if written == "none" else written.split(", ")
        if sample.family == "shapes_count":
            assert len(listed) == int(sample.answer)
        elif sample.family == "shapes_exist":
            assert (sample.answer == "yes") == bool(listed)
        elif sample.family == "shapes_compare":
            first, second = (int(part.rsplit(" ", 1)[1]) for part in listed)
            assert (sample.answer == "yes") == (first > second)
        elif sample.family == "shapes_attribute":
            assert sample.answer in written.split()[:3]
        elif sample.family == "chart_value":
            assert f"{sample.meta['query']} {sample.answer}" in written
        elif sample.family == "text_sum":
            assert sum(int(line.rsplit(" ", 1)[1]) for line in listed) == int(sample.answer)
        elif sample.family == "text_read":
            assert written.endswith(f" {sample.answer}")


def test_vocabulary_is_small_regular_and_in_the_tokenizer_corpus():
    vocabulary = set(VOCABULARY)
    assert len(vocabulary) < 250
    for sample in make_split("train", 50 * len(FAMILIES)) + make_split("heldout", 60):
        assert re.fullmatch(r"[a-z]+|\d+", sample.answer), sample.answer
        assert sample.question.endswith("?")
        words = set(re.findall(r"[a-z]+|\d+", sample.question + " " + sample.response))
        assert words <= vocabulary, words - vocabulary
        assert sample.response.endswith(f". answer: {sample.answer}")
    corpus = text_corpus(seed=0, size=30)
    assert corpus == text_corpus(seed=0, size=30)
    train = make_split("train", 30)
    assert corpus[:-1] == [text for s in train for text in (s.question, s.response)]
    assert set(corpus[-1].split()) == vocabulary


# --------------------------------------------------------------------------- exports


def test_parquet_round_trip_is_exact(tmp_path, mixed_samples):
    path = write_parquet(mixed_samples, tmp_path / "suite.parquet")
    assert read_parquet(path) == mixed_samples  # images compare by mode, size and pixels
    table = pq.read_table(path)
    assert table.schema.metadata[b"masters_suite_version"] == SUITE_VERSION.encode()
    assert table.column("image")[0].as_py().startswith(b"\x89PNG\r\n\x1a\n")
    assert [p.name for p in tmp_path.iterdir()] == ["suite.parquet"]  # no temporary left behind


def test_a_dataset_without_reference_responses_trains_on_its_answers(tmp_path, mixed_samples):
    path = write_parquet(mixed_samples, tmp_path / "suite.parquet")
    pq.write_table(pq.read_table(path).drop_columns(["response"]), tmp_path / "answers_only.parquet")
    samples = read_parquet(tmp_path / "answers_only.parquet")
    assert [s.response for s in samples] == [s.answer for s in mixed_samples]
    assert all(s.response.endswith(f"answer: {s.answer}") for s in mixed_samples)


def test_failed_write_keeps_the_previous_file(tmp_path, mixed_samples):
    path = write_parquet(mixed_samples[:3], tmp_path / "suite.parquet")
    before = path.read_bytes()
    broken = [*mixed_samples[:2], VQASample("x", "text_sum", "test", "q?", "1", None, 1, {})]
    with pytest.raises(AttributeError):
        write_parquet(broken, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["suite.parquet"]


def test_hf_dataset_loads_with_load_from_disk(tmp_path, mixed_samples):
    datasets = pytest.importorskip("datasets")
    directory = tmp_path / "hf"
    write_hf_dataset(mixed_samples[:5], directory)
    write_hf_dataset(mixed_samples, directory)  # overwriting an earlier export replaces it
    loaded = datasets.load_from_disk(str(directory))
    assert isinstance(loaded.features["image"], datasets.Image)
    assert loaded["id"] == [s.id for s in mixed_samples]
    assert loaded["answer"] == [s.answer for s in mixed_samples]
    for row, sample in zip(loaded, mixed_samples):
        assert pixels(row["image"]) == pixels(sample.image)
        assert json.loads(row["meta"]) == sample.meta
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["num_samples"] == len(mixed_samples) and manifest["suite_version"] == SUITE_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_lmms_eval_task_yaml_references_a_loadable_data_file(tmp_path, mixed_samples):
    datasets = pytest.importorskip("datasets")
    samples = mixed_samples[:22]  # the test split only
    yaml_path = write_lmms_eval(samples, tmp_path / "lmms")
    config = yaml.safe_load(yaml_path.read_text())
    assert yaml_path.stem == config["task"] == "masters_suite_test"
    data_file = Path(config["dataset_kwargs"]["data_files"][config["test_split"]])
    assert data_file.is_file() and data_file.parent == yaml_path.parent
    # What lmms-eval does with this config: load_dataset(dataset_path, **dataset_kwargs)[test_split].
    docs = datasets.load_dataset(
        config["dataset_path"], **config["dataset_kwargs"], cache_dir=str(tmp_path / "cache")
    )[config["test_split"]]
    assert config["doc_to_visual"] in docs.features and config["doc_to_target"] in docs.features
    assert "{{question}}" in config["doc_to_text"]
    assert docs[config["doc_to_target"]] == [s.answer for s in samples]
    assert isinstance(docs[0][config["doc_to_visual"]], Image.Image)
    assert pixels(docs[3]["image"]) == pixels(samples[3].image)


def test_vlmevalkit_tsv_parses_with_csv(tmp_path, mixed_samples):
    path = write_vlmevalkit_tsv(mixed_samples, tmp_path / "masters_suite_test.tsv")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert list(rows[0])[:5] == ["index", "image", "question", "answer", "category"]
    assert [int(r["index"]) for r in rows] == list(range(len(mixed_samples)))
    for row, sample in zip(rows, mixed_samples):
        assert (row["question"], row["answer"], row["category"]) == (sample.question, sample.answer, sample.family)
        decoded = Image.open(io.BytesIO(base64.b64decode(row["image"])))
        assert decoded.format == "PNG" and pixels(decoded) == pixels(sample.image)


def test_make_suite_cli_exports_a_split(tmp_path):
    spec = importlib.util.spec_from_file_location("make_suite", REPO / "jobs" / "make_suite.py")
    make_suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_suite)
    argv = ["--split", "val", "--size", "11", "--format", "parquet", "vlmevalkit", "--out", str(tmp_path)]
    assert make_suite.main(argv) == 0
    assert read_parquet(tmp_path / "val.parquet") == make_split("val", 11)
    assert (tmp_path / "masters_suite_val.tsv").is_file()
    assert make_suite.main(["--split", "heldout", "--families", "text_read", "--out", str(tmp_path)]) == 2
    assert make_suite.main(["--set", "data.val_size=0", "--split", "val", "--out", str(tmp_path)]) == 2


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_sample("shapes_nope", "train", 0, 0), r"family 'shapes_nope' is unknown; choose one of shapes_"),
        (lambda: make_sample("text_read", "dev", 0, 0), r"split 'dev' is unknown; choose one of train, val, test"),
        (lambda: make_sample("text_read", "train", 0, -1), r"index must be an integer >= 0, got -1"),
        (lambda: make_sample("text_read", "train", 0, 0, image_size=32), r"image_size must be an integer >= 56"),
        (lambda: make_sample("chart_value", "heldout", 0, 0), r"no held-out questions.*choose one of shapes_exist"),
        (lambda: make_split("train", -1), r"size must be an integer >= 0, got -1"),
        (lambda: make_split("train", 2, families=[]), r"families must be a non-empty list of distinct names"),
        (lambda: make_split("train", 2, families="text_read"), r"families must be a non-empty list"),
        (lambda: make_split("test", 2, families=["text_read", "nope"]), r"family 'nope' is unknown"),
        (lambda: make_split("heldout", 2, families=["text_sum"]), r"family 'text_sum' has no held-out questions"),
        (lambda: write_parquet([], "unused.parquet"), r"samples is empty"),
        (lambda: read_parquet("/nonexistent/suite.parquet"), r"parquet file '/nonexistent/suite.parquet' does not"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_exports_refuse_to_replace_a_directory_they_did_not_write(tmp_path, mixed_samples):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a suite export"):
        write_hf_dataset(mixed_samples, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    table = pq.read_table(write_parquet(mixed_samples, tmp_path / "full.parquet"))
    pq.write_table(table.drop_columns(["meta"]), tmp_path / "partial.parquet")
    with pytest.raises(ValueError, match=r"lacks the suite columns \['meta'\]"):
        read_parquet(tmp_path / "partial.parquet")


def test_load_split_reads_the_suite_a_directory_or_a_file(tmp_path):
    from masters.config import DataConfig
    from masters.data import load_split

    suite = load_split(DataConfig(), "val", 6)
    assert [s.id for s in suite] == [s.id for s in make_split("val", 6, seed=0)]
    write_parquet(make_split("test", 5, seed=0) + suite, tmp_path / "all.parquet")
    write_parquet(suite, tmp_path / "val.parquet")
    from_dir = load_split(DataConfig(dataset=str(tmp_path)), "val", 6)
    from_file = load_split(DataConfig(dataset=str(tmp_path / "all.parquet")), "val", 4)
    assert [s.id for s in from_dir] == [s.id for s in suite]
    assert [s.id for s in from_file] == [s.id for s in suite[:4]]
    with pytest.raises(ValueError, match="no train.parquet there"):
        load_split(DataConfig(dataset=str(tmp_path)), "train", 1)
    with pytest.raises(ValueError, match="has 6 'val' samples; the config asks for 7"):
        load_split(DataConfig(dataset=str(tmp_path / "all.parquet")), "val", 7)


# --------------------------------------------------------------------------- the train split, read by row group


def test_the_suite_is_written_once_in_row_groups_and_indexed_without_images(tmp_path):
    from masters.config import DataConfig
    from masters.data.source import QuestionIndex, question_ids, read_questions

    data = DataConfig(families=["shapes_count", "text_read", "chart_value"])
    index = QuestionIndex.open(data, "train", 150, tmp_path)
    samples = make_split("train", 150, seed=0, families=data.families)
    assert index.ids == [s.id for s in samples] == question_ids(data, "train", 150)
    parquet = pq.ParquetFile(index.path)
    assert [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)] == [64, 64, 22]
    manifest = json.loads((Path(index.path).parent / "manifest.json").read_text())
    assert manifest["size"] == 150 and manifest["families"] == data.families
    mtime = Path(index.path).stat().st_mtime_ns
    assert QuestionIndex.open(data, "train", 150, tmp_path).ids == index.ids
    assert Path(index.path).stat().st_mtime_ns == mtime  # found, not rewritten

    # A stage's questions in any order come back grouped by row group, each group read once.
    wanted = [149, 3, 70, 64, 5]
    reads = index.row_group_reads(wanted)
    assert [(r["row_group"], r["rows"]) for r in reads] == [(0, [3, 5]), (1, [0, 6]), (2, [21])]
    read_back = {}
    for read in reads:
        table = read_questions(index.path, read["row_group"], read["rows"], read["question_ids"])
        read_back.update({row["id"]: row for row in table.to_pylist()})
    for i in wanted:
        row, sample = read_back[samples[i].id], samples[i]
        assert (row["question"], row["answer"], row["response"]) == (sample.question, sample.answer, sample.response)
        assert row["image"] == png_bytes(sample.image)


def test_a_dataset_file_is_indexed_by_split_and_family_and_guarded_against_changes(tmp_path):
    from masters.config import DataConfig
    from masters.data.source import QuestionIndex, read_questions

    train = make_split("train", 100, seed=4)
    write_parquet(make_split("val", 30, seed=4) + train, tmp_path / "all.parquet")
    data = DataConfig(dataset=str(tmp_path / "all.parquet"), families=["text_read", "text_sum"])
    index = QuestionIndex.open(data, "train", 12, tmp_path / "unused")
    assert index.ids == [s.id for s in train if s.family in data.families][:12]
    assert not (tmp_path / "unused").exists()  # a user dataset is read where it is
    with pytest.raises(ValueError, match=r"has 18 'train' questions; the config asks for 19"):
        QuestionIndex.open(data, "train", 19, tmp_path)

    (read,) = index.row_group_reads([0])
    write_parquet(make_split("train", 100, seed=5), tmp_path / "all.parquet")  # replaced under the run
    with pytest.raises(ValueError, match="changed since the run indexed it"):
        read_questions(index.path, read["row_group"], read["rows"], read["question_ids"])

    table = pq.read_table(tmp_path / "all.parquet")
    pq.write_table(table.drop_columns(["question"]), tmp_path / "no_question.parquet")
    with pytest.raises(ValueError, match=r"lacks the columns \['question'\]"):
        QuestionIndex.open(DataConfig(dataset=str(tmp_path / "no_question.parquet")), "train", 1, tmp_path)


def test_a_split_with_repeated_ids_is_refused_before_anything_reads_it(tmp_path):
    from masters.config import DataConfig
    from masters.data.source import QuestionIndex

    train = make_split("train", 5, seed=1)
    write_parquet(train + train[:1], tmp_path / "train.parquet")
    with pytest.raises(ValueError, match="question ids repeat in 'train'"):
        QuestionIndex.open(DataConfig(dataset=str(tmp_path)), "train", 6, tmp_path)
