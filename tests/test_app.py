"""The command line (real Hydra runs in subprocesses), the concept world and its CNN."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import FASHION_OVERRIDES, cli

from crp_toolkit.data.world import (
    CLASS_RULES,
    CLASSES,
    CONCEPTS,
    ConceptWorld,
    WorldObject,
    class_of,
    distractor,
    draw,
    matches,
)

ROOT = Path(__file__).resolve().parents[1]


def test_explain_runs_the_default_and_records_its_config(tmp_path):
    run = cli("explain", f"hydra.run.dir={tmp_path}", "explain.indices=[0,1,2]")
    assert run.returncode == 0, run.stderr
    assert f"results in {tmp_path}" in run.stdout
    for name in ("heatmaps.png", "concepts.png", "heatmaps/heatmap_002.png"):
        assert (tmp_path / name).stat().st_size > 1000
    config = yaml.safe_load((tmp_path / ".hydra" / "config.yaml").read_text())
    assert config["stage"] == "explain"
    assert config["model"]["_target_"] == "crp_toolkit.data.training.load_world_model"
    assert config["explain"]["indices"] == [0, 1, 2]


def test_a_typo_in_a_key_fails_at_start_naming_it(tmp_path):
    run = cli("explain", f"hydra.run.dir={tmp_path}", "explain.indicez=[0]")
    assert run.returncode != 0
    assert "indicez" in run.stderr
    assert not (tmp_path / "heatmaps.png").exists()


def test_a_wrong_type_fails_at_start(tmp_path):
    run = cli("explain", f"hydra.run.dir={tmp_path}", "explain.top_concepts=many")
    assert run.returncode != 0
    assert "top_concepts" in run.stderr


def test_an_unknown_choice_lists_the_valid_ones(tmp_path):
    run = cli("explain", f"hydra.run.dir={tmp_path}", "composite=epsilon_magic")
    assert run.returncode != 0
    assert "epsilon_plus_flat" in run.stderr


def test_an_unknown_stage_prints_the_usage():
    run = cli("explian")
    assert run.returncode == 2
    assert "stages: explain" in run.stderr


def test_hydra_flags_keep_their_values(tmp_path):
    """``--cfg job`` prints the composed config (the stage and overrides in it) and runs
    nothing; the flag's value is not taken for an override."""
    run = cli("explain", "--cfg", "job", f"hydra.run.dir={tmp_path}", "explain.indices=[3]")
    assert run.returncode == 0, run.stderr
    assert "stage: explain" in run.stdout and "- 3" in run.stdout
    assert not list(tmp_path.iterdir())


@pytest.mark.fashion
def test_the_fashion_fixture_runs_through_the_same_command_line(tmp_path):
    """A user's own model class and .npz data, given only by config overrides."""
    run = cli(
        "explain",
        f"hydra.run.dir={tmp_path}",
        *FASHION_OVERRIDES,
        "concepts.layers=[conv2]",
        "explain.indices=[0,1]",
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "concepts.png").exists()


@pytest.mark.fashion(ROOT.parent / "shared" / "data" / "fashion")  # the config's own paths
def test_experiment_configs_in_the_project_conf_folder_extend_the_defaults(tmp_path):
    run = cli("explain", f"hydra.run.dir={tmp_path}", "+experiment=fashion", "explain.indices=[3]")
    assert run.returncode == 0, run.stderr
    config = yaml.safe_load((tmp_path / ".hydra" / "config.yaml").read_text())
    assert config["model"]["module"]["_target_"] == "crp_toolkit.data.fashion.FashionCNN"


def test_a_missing_weights_file_is_a_clear_error(tmp_path):
    run = cli(
        "explain",
        f"hydra.run.dir={tmp_path}",
        "model=torchvision",
        "model.name=resnet18",
        f"model.weights={tmp_path / 'nope.pth'}",
    )
    assert run.returncode != 0
    assert "nope.pth does not exist" in run.stderr


def test_the_world_is_deterministic_and_carries_its_ground_truth():
    world = ConceptWorld(n=40, seed=3)
    again = ConceptWorld(n=40, seed=3)
    for i in range(40):
        a, b = world.sample(i), again.sample(i)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.masks, b.masks)
        assert a.label == b.label
        assert a.image.shape == (3, 64, 64) and a.image.min() >= 0 and a.image.max() <= 1
        np.testing.assert_array_equal(a.concepts, a.masks.reshape(len(CONCEPTS), -1).any(1))
    other = ConceptWorld(n=40, seed=4)
    assert any(not np.array_equal(world.sample(i).image, other.sample(i).image) for i in range(5))


def test_class_rules_are_unambiguous():
    """Every possible object matches at most one class rule; some match none (distractors)."""
    objects = [
        WorldObject(s, c, t, p)
        for s in ("circle", "square", "triangle")
        for c in ("red", "green", "blue")
        for t in ("plain", "stripes", "dots")
        for p in (None, "stem")
    ]
    matched = [sum(matches(obj, rule) for rule in CLASS_RULES) for obj in objects]
    assert max(matched) == 1
    assert matched.count(0) >= 5
    assert {class_of(obj) for obj in objects} == {None, *range(len(CLASS_RULES))}
    assert any(obj.part and class_of(obj) is None for obj in objects)  # stemmed distractors


def test_a_stem_turns_a_distractor_square_into_a_stemmed_square():
    rng = np.random.default_rng(0)
    squares = [d for d in (distractor(rng) for _ in range(300)) if d.shape == "square"]
    assert squares and all(d.part is None for d in squares)
    assert {CLASSES[class_of(replace(d, part="stem"))] for d in squares} == {"stemmed square"}
    blue = WorldObject("square", "blue", "dots")
    assert class_of(blue) == class_of(replace(blue, part="stem")) == CLASSES.index("blue square")


def test_the_same_square_with_and_without_a_stem_differs_only_in_the_stem():
    square = WorldObject("square", "green", "stripes")
    stemmed = replace(square, part="stem")
    assert class_of(square) is None and CLASSES[class_of(stemmed)] == "stemmed square"
    image, masks = draw(np.random.default_rng(7), [square], 64, watermark=False)
    stem_image, stem_masks = draw(np.random.default_rng(7), [stemmed], 64, watermark=False)
    k = CONCEPTS.index("stem")
    assert stem_masks[k].any() and not masks[k].any()
    np.testing.assert_array_equal((image != stem_image).any(0), stem_masks[k])
    np.testing.assert_array_equal(np.delete(masks, k, 0), np.delete(stem_masks, k, 0))


def test_stem_masks_hold_only_drawn_stems():
    k = CONCEPTS.index("stem")
    bodies = [CONCEPTS.index(shape) for shape in ("circle", "square", "triangle")]
    world = ConceptWorld(n=80, seed=2)
    samples = [world.sample(i) for i in range(80)]
    assert all(s.concepts[k] for s in samples if s.label == CLASSES.index("stemmed square"))
    assert any(s.concepts[k] for s in samples if s.label != CLASSES.index("stemmed square"))
    assert any(not s.concepts[k] for s in samples)
    for s in samples:
        assert s.concepts[k] == s.masks[k].any()
        assert not (s.masks[k] & s.masks[bodies].any(0)).any()
        assert (s.image[:, s.masks[k]] < 0.3).all()  # dark grey wherever the mask says stem


def test_the_watermark_correlates_with_its_class():
    world = ConceptWorld(n=600, seed=0)
    marked = np.array([world.sample(i).concepts[CONCEPTS.index("watermark")] for i in range(600)])
    labels = world.labels()
    assert marked[labels == 0].mean() > 0.6
    assert marked[labels != 0].mean() < 0.15


def _image_folder(root: Path, classes: int, per_class: int = 2, corrupt: bool = False) -> Path:
    from PIL import Image

    world = ConceptWorld(n=classes * per_class * 4, seed=5)
    for k in range(classes):
        (root / f"class_{k}").mkdir(parents=True)
    written = dict.fromkeys(range(classes), 0)
    for i in range(len(world)):
        sample = world.sample(i)
        if sample.label < classes and written[sample.label] < per_class:
            pixels = (sample.image.transpose(1, 2, 0) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{sample.label}" / f"{i:03d}.png")
            written[sample.label] += 1
    if corrupt:
        (root / "class_0" / "000_corrupt.png").write_bytes(b"not an image at all")
    return root


def _folder_overrides(root: Path) -> list[str]:
    return [
        "dataset=image_folder",
        f"dataset.root={root}",
        "dataset.resize=64",
        "dataset.crop=64",
        "dataset.mean=[0,0,0]",
        "dataset.std=[1,1,1]",
    ]


def test_unreadable_images_are_skipped_and_listed(tmp_path):
    root = _image_folder(tmp_path / "data", classes=6, corrupt=True)
    out = tmp_path / "run"
    run = cli(
        "explain", f"hydra.run.dir={out}", *_folder_overrides(root), "explain.indices=[0,1,2]"
    )
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["explained"] == [1, 2]
    assert report["skipped"][0]["index"] == 0  # the corrupt file sorts first in class_0
    assert "UnidentifiedImageError" in report["skipped"][0]["error"]


def test_unreadable_images_fail_the_run_when_asked(tmp_path):
    root = _image_folder(tmp_path / "data", classes=6, corrupt=True)
    run = cli(
        "explain",
        f"hydra.run.dir={tmp_path / 'run'}",
        *_folder_overrides(root),
        "loader.on_error=fail",
        "explain.indices=[0,1]",
    )
    assert run.returncode != 0
    assert "sample 0 could not be read" in run.stderr


def test_a_class_count_that_does_not_match_the_model_fails_at_start(tmp_path):
    root = _image_folder(tmp_path / "data", classes=3)
    run = cli("explain", f"hydra.run.dir={tmp_path / 'run'}", *_folder_overrides(root))
    assert run.returncode != 0
    assert "3 classes but the model has 6 outputs" in run.stderr
    assert not (tmp_path / "run" / "heatmaps.png").exists()
