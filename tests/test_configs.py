"""Every config in conf/ composes against the schema and builds a model, optimizer and
dataset; bad values are rejected by the schema."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

hydra = pytest.importorskip("hydra")
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import ConfigCompositionException  # noqa: E402
from omegaconf.errors import ValidationError  # noqa: E402

from gpucnn.array.backend import BACKEND_NAMES, DTYPES  # noqa: E402
from gpucnn.config import build_layer, build_optimizer, to_containers  # noqa: E402
from gpucnn.data import DATASETS, write_idx  # noqa: E402
from gpucnn.data.sources import SOURCES  # noqa: E402
from gpucnn.nn.layers import LAYER_TYPES  # noqa: E402
from gpucnn.nn.losses import HEAD_TYPES  # noqa: E402
from gpucnn.nn.optim import OPTIMIZER_TYPES  # noqa: E402
from gpucnn.train import CONF_DIR, prepare  # noqa: E402
from tests.published_data import write_cifar, write_mnist  # noqa: E402

CONF = Path(CONF_DIR)


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """Tiny 28x28 IDX and npz datasets, so lenet and the file formats can be built."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = (np.arange(40) % 10).astype(np.uint8)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", images[:n])
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels[:n])
    np.savez(root / "data.npz", x=images.astype(np.float32), y=labels.astype(np.int64))
    write_mnist(root / "mnist", n_train=60, n_test=20)
    write_cifar(root / "cifar-10-binary.tar.gz", n_per_batch=12, n_test=12)
    return root


def published_path(data: str, root: Path) -> list[str]:
    """data.path for MNIST and CIFAR-10, to files made here in their formats.
    Fashion-MNIST's content is pinned: only its real files (Debian's package) will do."""
    if data == "fashion_mnist" and not Path(SOURCES[data].system_dir).is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (CI installs it)")
    paths = {"mnist": root / "mnist", "cifar10": root}
    return [f"data.path={paths[data]}"] if data in paths else []


def composed(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# Each model with a dataset it fits.
MODEL_DATA = {
    "seed_8x8": ["data=digits", "data.positive_class=0"],
    "seed_20x20": ["data=seed_20x20"],
    "small_cnn": ["data=digits"],
    "lenet": ["data=idx"],
    "fashion_cnn": ["data=idx"],
    "vgg_small": ["data=cifar10"],
}


def test_every_option_is_covered():
    assert set(options("model")) == set(MODEL_DATA)
    assert set(options("data")) == {
        "seed_20x20",
        "digits",
        "idx",
        "npz",
        "mnist",
        "fashion_mnist",
        "cifar10",
    }
    assert set(options("optimizer")) == {"ascent", "momentum", "adam"}
    assert set(options("experiment")) >= {"seed_20x20", "digits"}


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_model_and_optimizer_configs_build(model, optimizer, data_files):
    overrides = [f"model={model}", f"optimizer={optimizer}", "backend=numpy", *MODEL_DATA[model]]
    if "data=idx" in overrides:
        overrides.append(f"data.path={data_files}")
    overrides += published_path(MODEL_DATA[model][0].split("=")[1], data_files)
    backend, dataset, built, opt = prepare(to_containers(composed(overrides)))
    assert built.input_shape == dataset.input_shape
    assert opt.type == optimizer
    out = built.forward(dataset.x_train[:3].astype(np.float32))
    assert out.shape[0] == 3


@pytest.mark.parametrize("data", options("data"))
def test_data_configs_build(data, data_files):
    path = {"idx": [f"data.path={data_files}"], "npz": [f"data.path={data_files / 'data.npz'}"]}
    model = "seed_20x20" if data == "seed_20x20" else "small_cnn"
    overrides = [f"data={data}", "backend=numpy", *path.get(data, [])]
    overrides += published_path(data, data_files)
    if data in ("idx", "npz", "mnist", "fashion_mnist"):
        model = "lenet"
    if data == "cifar10":
        model = "vgg_small"
    _, dataset, _, _ = prepare(to_containers(composed([f"model={model}", *overrides])))
    assert len(dataset.y_train) > 0 and len(dataset.y_test) > 0


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_build(experiment, data_files):
    data = experiment if experiment in ("mnist", "fashion_mnist", "cifar10") else ""
    paths = published_path(data, data_files)
    cfg = to_containers(composed([f"experiment={experiment}", "backend=numpy", *paths]))
    prepare(cfg)
    if experiment == "seed_20x20":  # the lecture's run: 1000 iterations, eta 0.1, L2 0.1
        assert cfg["optimizer"] == {**cfg["optimizer"], "name": "ascent", "lr": 0.1}
        assert cfg["trainer"]["l2"] == 0.1 and cfg["trainer"]["epochs"] == 1000
        assert cfg["trainer"]["batch_size"] >= 2 * cfg["data"]["n_per_class"]  # full batch


@pytest.mark.parametrize(
    "override",
    [
        "trainer.epochs=abc",
        "backend=tpu",
        "optimizer.name=rmsprop",
        "model.head=hinge",
        "trainer.dtype=float16",
    ],
)
def test_schema_rejects_bad_values(override):
    with pytest.raises((ValidationError, ConfigCompositionException)):
        composed([override])


@pytest.mark.parametrize(
    "key, registry",
    [
        ("model.layers.0.type", LAYER_TYPES),
        ("model.head", HEAD_TYPES),
        ("optimizer.name", OPTIMIZER_TYPES),
        ("data.name", DATASETS),
        ("backend", BACKEND_NAMES),
        ("trainer.dtype", DTYPES),
    ],
)
def test_the_schemas_choices_are_the_engines_registries(key, registry):
    """Each enum of the schema is made from the registry it names: every entry composes,
    and a value outside it is refused with exactly the registry's entries listed."""
    for value in registry:
        composed([f"{key}={value}"])
    with pytest.raises(ConfigCompositionException) as refused:
        composed([f"{key}=no_such_choice"])
    listed = re.search(r"expected one of \[(.*?)\]", str(refused.value.__cause__)).group(1)
    assert listed.split(", ") == list(registry)


@pytest.mark.parametrize("name", list(OPTIMIZER_TYPES))
def test_each_optimizer_gets_only_its_own_options(name):
    overrides = [f"optimizer.name={name}", "optimizer.lr=0.05", "optimizer.momentum=0.5"]
    built = build_optimizer(to_containers(composed(overrides))["optimizer"])
    assert built.type == name and built.lr == 0.05
    assert built.config().get("momentum", 0.5) == 0.5  # only momentum has one
    assert ("beta1" in built.config()) == (name == "adam")


def test_a_layer_field_left_unset_takes_the_layers_default_or_is_named():
    spec = {"type": "pool", "kind": "l2", "window": None, "stride": None}
    pool = build_layer(spec, 3)
    assert (pool.kind, pool.window, pool.stride) == ("l2", (2, 2), (2, 2))  # Pool2D's defaults
    with pytest.raises(ValueError, match=r"^model.layers\[1\] \(conv\) needs kernel_size$"):
        build_layer({"type": "conv", "out_channels": 4, "kernel_size": None}, 1)


@pytest.mark.parametrize("override", ["trainer.epoch=3", "data.pth=x", "model.layers.0.kernel=3"])
def test_schema_rejects_unknown_keys(override):
    with pytest.raises((ValidationError, ConfigCompositionException)):
        composed([override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("+trainer.epoch=3", "trainer.epoch"),
        ("+lr=0.1", "lr"),
        ("+optimizer.momentm=0.5", "optimizer.momentm"),
        ("+model.layers.2.windw=3", "model.layers.2.windw"),
        ("+data.pth=x", "data.pth"),
    ],
)
def test_keys_added_with_plus_are_rejected_before_anything_is_built(override, key):
    # Hydra composes these without complaint: the schema has no say over '+' additions.
    config = to_containers(composed(["experiment=digits", override]))
    with pytest.raises(ValueError, match=f"^unknown config key '{re.escape(key)}' "):
        prepare(config)


def test_logistic_model_on_multiclass_data_is_a_clear_error():
    with pytest.raises(
        ValueError, match="logistic \\(binary\\) head but data 'digits' has 10 classes"
    ):
        prepare(to_containers(composed(["model=seed_8x8", "data=digits", "backend=numpy"])))


def test_every_config_file_ships_in_the_wheel():
    """pyproject's package-data patterns cover every YAML under conf/, reached through the
    package's gpucnn/conf link, so an installed (non-editable) gpucnn finds its configs."""
    import re

    root = Path(__file__).resolve().parents[1]
    package_conf = root / "gpucnn" / "conf"
    assert package_conf.is_dir() and package_conf.resolve() == (root / "conf").resolve()
    text = (root / "pyproject.toml").read_text()
    patterns = re.search(r"\[tool\.setuptools\.package-data\]\ngpucnn = \[(.*?)\]", text).group(1)
    globs = [g.strip().strip('"') for g in patterns.split(",")]
    shipped = {p.relative_to(root / "gpucnn") for g in globs for p in (root / "gpucnn").glob(g)}
    on_disk = {p.relative_to(root) for p in (root / "conf").rglob("*.yaml")}
    assert shipped == on_disk  # a YAML the patterns miss would be left out of the wheel


@pytest.mark.parametrize("preset, net", [("small_cnn", "digits32"), ("lenet", "lenet256")])
def test_benchmark_nets_are_the_presets(preset, net, data_files, bench):
    """docs/performance.md says the benchmark times the presets: keep that true."""
    data = ["data=digits"] if preset == "small_cnn" else ["data=idx", f"data.path={data_files}"]
    _, dataset, built, _ = prepare(
        to_containers(composed([f"model={preset}", "backend=numpy", *data]))
    )
    timed = bench.build_gpucnn(bench.NETS[net], "numpy")
    assert timed.input_shape == built.input_shape
    assert [layer.config() for layer in timed.layers] == [layer.config() for layer in built.layers]
    assert timed.head.config() == built.head.config()
